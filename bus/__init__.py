"""The bus: NATS connection, the embedded server, provisioning, and every name in one place."""

from bus._connect import NATS_URL_ENV, Bus, ConnectOptions, connect
from bus._embedded import EmbeddedNats, EmbeddedNatsConfig, ServerState, find_nats_server
from bus._parser import RawHeaders
from bus._pidlock import PidLock, pid_alive
from bus._provision import StreamLimits, provision, stream_configs
from bus._replies import Reply, ReplyInbox, StoredAck
from bus._subjects import Names, check_token

__all__ = [
    "NATS_URL_ENV",
    "Bus",
    "ConnectOptions",
    "EmbeddedNats",
    "EmbeddedNatsConfig",
    "Names",
    "PidLock",
    "RawHeaders",
    "Reply",
    "ReplyInbox",
    "ServerState",
    "StoredAck",
    "StreamLimits",
    "check_token",
    "connect",
    "find_nats_server",
    "pid_alive",
    "provision",
    "stream_configs",
]
