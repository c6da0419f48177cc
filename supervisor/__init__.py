"""Supervision: OTP-style trees, OS-process children, and leases over the KV bucket."""

from supervisor._events import bus_event_sink
from supervisor._lease import Lease, LeaseChange, LeaseRecord, lease_entries, watch_leases
from supervisor._process import OsProcess
from supervisor._tree import ChildSpec, Restart, Strategy, Supervisor, SupervisorEvent

__all__ = [
    "ChildSpec",
    "Lease",
    "LeaseChange",
    "LeaseRecord",
    "OsProcess",
    "Restart",
    "Strategy",
    "Supervisor",
    "SupervisorEvent",
    "bus_event_sink",
    "lease_entries",
    "watch_leases",
]
