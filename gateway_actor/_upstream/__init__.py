"""The local upstream: Anthropic Messages and OpenAI chat completions, with prompt caches."""

from gateway_actor._upstream._cache import CacheResult, PrefixCache
from gateway_actor._upstream._server import (
    Fault,
    LocalUpstream,
    Replica,
    ReplicaStats,
    UpstreamConfig,
    load_ratio,
)

__all__ = [
    "CacheResult",
    "Fault",
    "LocalUpstream",
    "PrefixCache",
    "Replica",
    "ReplicaStats",
    "UpstreamConfig",
    "load_ratio",
]
