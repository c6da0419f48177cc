"""``ApiConfig``: where the API listens and how it behaves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nerve._errors import ConfigError
from nerve._settings import read_setting


@dataclass(slots=True)
class ApiConfig:
    """Settings of one API server (``--set api.KEY=VALUE`` under ``nerve up``).

    * ``db_path``: the read model's SQLite file (``None``: a fresh temporary one, rebuilt
      from the streams at every start).
    * ``instance``: names this read model's durable consumer (``readmodel-<instance>``);
      every API process with its own database needs its own.
    * ``heartbeat``: seconds of silence after which an SSE stream gets a comment line (well
      under the 15 s that proxies and clients tolerate).
    * ``retry_ms``: the reconnect delay SSE clients are told (the ``retry:`` field).
    * ``max_body``: largest request body, in bytes (413 beyond).
    * ``max_streams`` / ``max_streams_per_tenant``: concurrent SSE streams (503 beyond).
    * ``submit_wait``: how long ``POST /v1/runs`` waits for the run to start before it
      answers 202 (queued) instead of 201.
    """

    host: str = "127.0.0.1"
    port: int = 0
    db_path: Path | None = None
    instance: str = "api"
    admin_keys: list[str] = field(default_factory=list)
    heartbeat: float = 10.0
    retry_ms: int = 1000
    max_body: int = 1 << 20
    max_streams: int = 5000
    max_streams_per_tenant: int = 1000
    submit_wait: float = 5.0
    ring_size: int = 2048
    tail_linger: float = 30.0
    key_cache_ttl: float = 1.0
    console: bool = True

    @classmethod
    def from_settings(cls, settings: dict[str, Any], **base: Any) -> ApiConfig:
        """From ``--set`` strings (``port=8080``, ``heartbeat=5``...)."""
        config = cls(**base)
        for key, raw in settings.items():
            if key not in cls.__dataclass_fields__ or key == "admin_keys":
                known = ", ".join(k for k in cls.__dataclass_fields__ if k != "admin_keys")
                raise ConfigError(f"unknown API setting {key!r}; known: {known}")
            if key == "db_path":
                value: Any = Path(raw) if raw else None
            else:
                value = read_setting("API", key, raw, getattr(config, key))
            setattr(config, key, value)
        if not 0 < config.heartbeat <= 14:
            raise ConfigError("API setting heartbeat must be between 0 and 14 seconds (SSE "
                              "streams must never be silent for 15 s)")
        return config


__all__ = ["ApiConfig"]
