"""The price table: what one model call costs, from its :class:`Usage`.

Prices are per million tokens (MTok) in USD and are kept as :class:`~decimal.Decimal` so a
cost is exact; ledgers count integer **nano-dollars** (``NANOS_PER_USD``) and every cost is
rounded *up* to the next nano-dollar, so rounding can never let spend slip under a limit.

Prompt caching is priced from the base input price with multipliers (Anthropic's): a cache
read costs 0.1x, a 5-minute cache write 1.25x and a 1-hour write 2x. A model may override
any of them (Haiku 3's cache prices are not the round multiples; Fable 5.1 reads at 0.025x).

Unknown models raise :class:`~nerve.UnknownModel` unless the table has a ``default`` price:
refusing a call nobody can price is the fail-closed choice; a deployment that prefers to
meter unknown models at a known rate sets ``PriceTable.with_default(...)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, Literal

from budget_actor._usage import Usage
from nerve import ConfigError, UnknownModel

NANOS_PER_USD = 1_000_000_000
_MTOK = Decimal(1_000_000)
_NANOS = Decimal(NANOS_PER_USD)
# A trailing snapshot date or "-latest" names the same model family's price.
_SUFFIX_RE = re.compile(r"-(\d{8}|latest)$")

CacheWrite = Literal["none", "5m", "1h"]
PRICES_ENV = "NERVE_PRICES"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens for one model, and its prompt-cache multipliers."""

    input: Decimal
    output: Decimal
    cache_read: Decimal = Decimal("0.1")
    cache_write_5m: Decimal = Decimal("1.25")
    cache_write_1h: Decimal = Decimal("2")

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h"):
            value = getattr(self, name)
            if not isinstance(value, Decimal):
                object.__setattr__(self, name, value := Decimal(str(value)))
            if not value.is_finite() or value < 0 or value > 100_000:
                raise ConfigError(f"price field {name}={value} must be a finite number in "
                                  "[0, 100000] (USD per MTok, or a multiplier)", field=name)

    @property
    def max_input_multiplier(self) -> Decimal:
        return max(Decimal(1), self.cache_write_5m, self.cache_write_1h)

    def to_dict(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in
                ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")}


def _ceil_nanos(usd_times_mtok: Decimal) -> int:
    """USD*1e6 (a sum of tokens x price-per-MTok) to nano-dollars, rounded up."""
    return int((usd_times_mtok * _NANOS / _MTOK).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class PriceTable:
    """A versioned map from model name to :class:`ModelPrice`.

    Lookup: the exact name, then the name without a snapshot suffix
    (``claude-sonnet-4-5-20250929`` -> ``claude-sonnet-4-5``), then ``default``.
    """

    version: str
    models: dict[str, ModelPrice]
    default: ModelPrice | None = None
    source: str = ""
    _index: dict[str, ModelPrice] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({k.lower(): v for k, v in self.models.items()})

    # -- lookup ------------------------------------------------------------------------
    def price(self, model: str) -> ModelPrice:
        """The price of ``model``; :class:`~nerve.UnknownModel` if it has none."""
        name = (model or "").strip().lower()
        found = self._index.get(name) or self._index.get(_SUFFIX_RE.sub("", name))
        if found is not None:
            return found
        if self.default is not None:
            return self.default
        raise UnknownModel(
            f"no price for model {model!r} in price table {self.version}: add it "
            f"(a JSON file named by ${PRICES_ENV}, or PriceTable.with_model) or set a "
            "default price (PriceTable.with_default)", model=model, version=self.version)

    def knows(self, model: str) -> bool:
        try:
            self.price(model)
        except UnknownModel:
            return False
        return True

    # -- costs -------------------------------------------------------------------------
    def cost_nanos(self, model: str, usage: Usage) -> int:
        """Exact cost of ``usage`` on ``model`` in nano-dollars (rounded up)."""
        p = self.price(model)
        written = max(usage.cache_creation_input_tokens,
                      usage.cache_creation_5m_input_tokens + usage.cache_creation_1h_input_tokens)
        # Writes the provider did not break down are 5-minute writes (the API's default TTL).
        w5 = written - usage.cache_creation_1h_input_tokens
        total = (usage.input_tokens * p.input
                 + usage.cache_read_input_tokens * p.input * p.cache_read
                 + w5 * p.input * p.cache_write_5m
                 + usage.cache_creation_1h_input_tokens * p.input * p.cache_write_1h
                 + usage.output_tokens * p.output)
        return _ceil_nanos(total)

    def cost(self, model: str, usage: Usage) -> float:
        """Cost of ``usage`` on ``model`` in USD."""
        return self.cost_nanos(model, usage) / NANOS_PER_USD

    def worst_case_nanos(self, model: str, input_tokens: int, max_output_tokens: int,
                         cache_write: CacheWrite = "1h") -> int:
        """The most a call can cost: every input token at the dearest rate the call may
        incur (a 1-hour cache write by default), plus ``max_output_tokens`` of output."""
        p = self.price(model)
        mult = {"none": Decimal(1), "5m": max(Decimal(1), p.cache_write_5m),
                "1h": p.max_input_multiplier}[cache_write]
        return _ceil_nanos(input_tokens * p.input * mult + max_output_tokens * p.output)

    # -- building ----------------------------------------------------------------------
    def with_model(self, name: str, price: ModelPrice) -> PriceTable:
        return replace(self, models={**self.models, name: price}, _index={})

    def with_default(self, price: ModelPrice | None) -> PriceTable:
        return replace(self, default=price, _index={})

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source,
                "default": self.default.to_dict() if self.default else None,
                "models": {k: v.to_dict() for k, v in sorted(self.models.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriceTable:
        """Build a table from ``{"version", "models": {name: {"input", "output", ...}},
        "default"?}``; a bad entry raises :class:`~nerve.ConfigError` naming it."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ConfigError("a price table needs a 'models' object")
        version = str(data.get("version") or "")
        if not version:
            raise ConfigError("a price table needs a 'version'")

        def one(name: str, raw: Any) -> ModelPrice:
            if not isinstance(raw, dict) or "input" not in raw or "output" not in raw:
                raise ConfigError(f"price of {name!r} needs 'input' and 'output' (USD per MTok)",
                                  model=name)
            unknown = set(raw) - {"input", "output", "cache_read", "cache_write_5m",
                                  "cache_write_1h"}
            if unknown:
                raise ConfigError(f"price of {name!r} has unknown fields {sorted(unknown)}",
                                  model=name)
            try:
                return ModelPrice(**{k: Decimal(str(v)) for k, v in raw.items()})
            except (ArithmeticError, ValueError) as exc:
                raise ConfigError(f"price of {name!r} is not a number: {exc}",
                                  model=name) from None

        models = {str(k): one(str(k), v) for k, v in data["models"].items()}
        default = one("default", data["default"]) if data.get("default") else None
        return cls(version=version, models=models, default=default,
                   source=str(data.get("source") or ""))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PriceTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read price table {path}: {exc}", path=str(path)) from None
        return cls.from_dict(data)


def _p(inp: str, out: str, **kw: str) -> ModelPrice:
    return ModelPrice(Decimal(inp), Decimal(out), **{k: Decimal(v) for k, v in kw.items()})


_OPUS_45 = _p("5", "25")
_OPUS_4 = _p("15", "75")
_SONNET = _p("3", "15")

#: Anthropic list prices, USD per MTok (platform.claude.com/docs/en/about-claude/pricing).
#: Long-context surcharges (Sonnet 4/4.5 above 200K input tokens) are not modelled: the
#: gateway should reserve with the long-context model name if it uses one.
BUILTIN_PRICES = PriceTable(
    version="anthropic-2026-11",
    source="https://platform.claude.com/docs/en/about-claude/pricing",
    models={
        "claude-fable-5-1": _p("10", "50", cache_read="0.025"),
        "claude-mythos-5-1": _p("10", "50", cache_read="0.025"),
        "claude-fable-5": _p("10", "50"),
        "claude-mythos-5": _p("10", "50"),
        "claude-opus-5": _OPUS_45,
        "claude-opus-4-8": _OPUS_45,
        "claude-opus-4-7": _OPUS_45,
        "claude-opus-4-6": _OPUS_45,
        "claude-opus-4-5": _OPUS_45,
        "claude-opus-4-1": _OPUS_4,
        "claude-opus-4-0": _OPUS_4,
        "claude-opus-4": _OPUS_4,
        "claude-3-opus": _OPUS_4,
        "claude-sonnet-4-6": _SONNET,
        "claude-sonnet-4-5": _SONNET,
        "claude-sonnet-4-0": _SONNET,
        "claude-sonnet-4": _SONNET,
        "claude-3-7-sonnet": _SONNET,
        "claude-3-5-sonnet": _SONNET,
        "claude-haiku-4-5": _p("1", "5"),
        "claude-3-5-haiku": _p("0.8", "4"),
        # Haiku 3's cache prices are not the usual multiples: $0.30 / $0.50 / $0.03 per MTok.
        "claude-3-haiku": _p("0.25", "1.25", cache_read="0.12", cache_write_5m="1.2",
                             cache_write_1h="2"),
        # The gateway's offline scripted model (the demo's default) is metered at Sonnet's
        # rates, so budgets, limits and the breaker behave offline as they would on Claude.
        "scripted": _SONNET,
    },
)


def _from_env() -> PriceTable:
    path = os.environ.get(PRICES_ENV)
    return PriceTable.load(path) if path else BUILTIN_PRICES


#: The table every ledger uses unless given another: ``$NERVE_PRICES`` (a JSON file) or the
#: built-in Anthropic list prices.
PRICES: PriceTable = _from_env()


def usd_to_nanos(usd: float) -> int:
    """A USD amount (a limit) to nano-dollars, rounded down (limits never grow by rounding)."""
    if not math.isfinite(usd):
        raise ConfigError(f"amount {usd!r} is not a finite number")
    return int(Decimal(str(usd)) * _NANOS)


def nanos_to_usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD
