"""The gateway's configuration: pools of upstreams, models, retries, planner and streaming.

Three ways to get one:

* :meth:`GatewayConfig.from_env` (what ``nerve gateway`` and ``nerve up`` use):
  ``NERVE_GATEWAY_CONFIG`` names a JSON file (the shape of :meth:`from_dict`); else
  ``NERVE_LLM_UPSTREAMS=anthropic:http://127.0.0.1:8600,http://127.0.0.1:8601`` (or
  ``openai:...``) makes one pool of those replicas; else ``ANTHROPIC_API_KEY`` makes one
  Anthropic pool (``ANTHROPIC_BASE_URL`` optional); else the offline scripted model.
  ``NERVE_LLM_MODEL`` sets the default model.
* :meth:`GatewayConfig.scripted`, :meth:`GatewayConfig.for_urls` in code and tests.
* :meth:`GatewayConfig.from_dict` from JSON.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway_actor._planner import PlannerConfig
from gateway_actor._router import BreakerConfig, Policy
from nerve import ConfigError

ProviderKind = Literal["anthropic", "openai", "scripted"]
ANTHROPIC_API = "https://api.anthropic.com"
DEFAULT_CLAUDE = "claude-sonnet-4-6"
SCRIPTED_MODEL = "scripted"


@dataclass(slots=True)
class UpstreamSpec:
    """One endpoint: a replica's base URL, or an API key/workspace of a hosted API."""

    name: str
    base_url: str = ""
    api_key_env: str | None = None  # the key is read from this variable at start
    api_key: str | None = None
    weight: float = 1.0

    def key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or self.api_key
        return self.api_key


@dataclass(slots=True)
class PoolConfig:
    """Interchangeable upstreams of one provider, serving the models matching ``models``."""

    name: str
    provider: ProviderKind
    upstreams: list[UpstreamSpec]
    models: list[str] = field(default_factory=lambda: ["*"])  # globs
    policy: Policy = "affinity"
    load_factor: float = 1.25  # a new run spills over above this x the fair share in flight
    stay_factor: float = 2.0  # a run with a cached prefix moves only above this

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(slots=True)
class RetryPolicy:
    """How hard one call tries before its step fails (retryable) back to the workflow."""

    max_attempts: int = 6
    base_delay: float = 0.2  # backoff after the n-th failure: base * 2^(n-1), capped
    max_delay: float = 10.0
    max_wait: float = 120.0  # longest single wait for a parked / open upstream

    def backoff(self, failures: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** max(0, failures - 1))


@dataclass(slots=True)
class GatewayConfig:
    """Everything the gateway needs to know; see the module docstring for the sources."""

    pools: list[PoolConfig]
    default_model: str = SCRIPTED_MODEL
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    coalesce_ms: float = 15.0  # token deltas are batched this long per stream event
    timeout: float = 600.0  # per upstream attempt
    scripted_token_delay: float = 0.0
    scripted_min_cacheable_tokens: int = 1024

    def __post_init__(self) -> None:
        if not self.pools:
            raise ConfigError("the gateway needs at least one pool of upstreams")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError(f"pool names must be unique: {names}")
        for pool in self.pools:
            if not pool.upstreams:
                raise ConfigError(f"pool {pool.name!r} has no upstreams")
            if pool.provider not in ("anthropic", "openai", "scripted"):
                raise ConfigError(f"pool {pool.name!r}: unknown provider {pool.provider!r} "
                                  "(anthropic, openai or scripted)")
            if pool.provider == "openai" and any(not u.base_url for u in pool.upstreams):
                raise ConfigError(f"pool {pool.name!r}: every openai upstream needs a base_url")

    def pool_for(self, model: str) -> PoolConfig | None:
        for pool in self.pools:
            if pool.serves(model):
                return pool
        return None

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def scripted(cls, replicas: int = 1, *, token_delay: float = 0.0,
                 min_cacheable_tokens: int = 1024, **kwargs: Any) -> GatewayConfig:
        """The offline scripted model (``replicas`` independent caches)."""
        pool = PoolConfig("scripted", "scripted",
                          [UpstreamSpec(f"scripted-{i}") for i in range(replicas)])
        return cls([pool], default_model=SCRIPTED_MODEL, scripted_token_delay=token_delay,
                   scripted_min_cacheable_tokens=min_cacheable_tokens, **kwargs)

    @classmethod
    def for_urls(cls, urls: list[str], *, provider: ProviderKind = "anthropic",
                 model: str = DEFAULT_CLAUDE, policy: Policy = "affinity",
                 api_key: str | None = None, **kwargs: Any) -> GatewayConfig:
        """One pool of replicas at ``urls`` serving every model, ``model`` the default."""
        pool = PoolConfig(provider, provider,
                          [UpstreamSpec(f"{provider}-{i}", base_url=url, api_key=api_key)
                           for i, url in enumerate(urls)], policy=policy)
        return cls([pool], default_model=model, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatewayConfig:
        """From JSON: ``{"default_model", "pools": [{"name", "provider", "models",
        "policy", "load_factor", "upstreams": [{"name", "base_url", "api_key_env",
        "weight"}]}], "retry": {...}, "breaker": {...}, "planner": {...}, "coalesce_ms"}``."""
        try:
            pools = [PoolConfig(
                name=p["name"], provider=p["provider"],
                upstreams=[UpstreamSpec(**u) for u in p["upstreams"]],
                models=list(p.get("models", ["*"])), policy=p.get("policy", "affinity"),
                load_factor=float(p.get("load_factor", 1.25)),
                stay_factor=float(p.get("stay_factor", 2.0))) for p in data["pools"]]
            planner = PlannerConfig(**{k: v for k, v in (data.get("planner") or {}).items()
                                       if k in ("anchor_every", "max_breakpoints")})
            return cls(pools, default_model=data.get("default_model", SCRIPTED_MODEL),
                       planner=planner, retry=RetryPolicy(**(data.get("retry") or {})),
                       breaker=BreakerConfig(**(data.get("breaker") or {})),
                       coalesce_ms=float(data.get("coalesce_ms", 15.0)),
                       timeout=float(data.get("timeout", 600.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid gateway config: {exc!r}; see "
                              "GatewayConfig.from_dict for the shape") from None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> GatewayConfig:
        env = dict(os.environ if env is None else env)
        model = env.get("NERVE_LLM_MODEL")
        if env.get("NERVE_GATEWAY_CONFIG"):
            path = Path(env["NERVE_GATEWAY_CONFIG"])
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read gateway config {path}: {exc}") from None
            config = cls.from_dict(data)
        elif env.get("NERVE_LLM_UPSTREAMS"):
            kind, _, urls = env["NERVE_LLM_UPSTREAMS"].partition(":")
            if kind not in ("anthropic", "openai") or not urls:
                raise ConfigError("NERVE_LLM_UPSTREAMS must look like "
                                  "'anthropic:http://host:port,http://host:port' (or openai:)")
            config = cls.for_urls([u.strip() for u in urls.split(",") if u.strip()],
                                  provider=kind,  # type: ignore[arg-type]
                                  model=model or DEFAULT_CLAUDE)
            for upstream in config.pools[0].upstreams:
                upstream.api_key_env = ("ANTHROPIC_API_KEY" if kind == "anthropic"
                                        else "OPENAI_API_KEY")
        elif env.get("ANTHROPIC_API_KEY"):
            config = cls([PoolConfig("anthropic", "anthropic", [UpstreamSpec(
                "anthropic", base_url=env.get("ANTHROPIC_BASE_URL", ANTHROPIC_API),
                api_key_env="ANTHROPIC_API_KEY")], models=["claude-*", "*"])],
                default_model=model or DEFAULT_CLAUDE)
        else:
            config = cls.scripted()
        if model:
            config.default_model = model
        return config
