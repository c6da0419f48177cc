"""The price table, and the budget package's public face."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

import budget_actor
from budget_actor import BUILTIN_PRICES, PRICES, ModelPrice, PriceTable, Usage
from nerve import ConfigError, UnknownModel


def test_public_api_is_pinned() -> None:
    assert sorted(budget_actor.__all__) == sorted([
        "BUILTIN_PRICES", "DEFAULT_LIMITS", "NANOS_PER_USD", "PRICES", "REQUEST_ADAPTER",
        "BreakerPolicy", "BreakerState", "BudgetActor", "BudgetReport", "BudgetRequest",
        "CostEvent", "CostEvents", "KillNotice", "KillNotices", "KillRequest", "Ledger", "Limits",
        "ModelPrice", "PriceTable", "Reservation", "ResetNotice", "ResetRequest",
        "ResumeRunRequest", "SetLimitsRequest", "Settlement", "ShowRequest", "Trip",
        "TripEvent", "Usage", "WindowReport", "kill_notices", "parse_kill_message",
    ])
    for name in budget_actor.__all__:
        assert getattr(budget_actor, name) is not None


def test_cost_prices_every_token_category() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000,
                  cache_read_input_tokens=1_000_000, cache_creation_input_tokens=2_000_000,
                  cache_creation_5m_input_tokens=1_000_000,
                  cache_creation_1h_input_tokens=1_000_000)
    # Sonnet: $3 in, $15 out, read 0.1x, 5-minute write 1.25x, 1-hour write 2x
    assert PRICES.cost("claude-sonnet-4-5", usage) == pytest.approx(3 + 15 + 0.3 + 3.75 + 6)
    # A write without a TTL breakdown is a 5-minute write.
    assert PRICES.cost("claude-sonnet-4-5", Usage(cache_creation_input_tokens=1_000_000)) \
        == pytest.approx(3.75)
    # Haiku 3's cache prices are not the round multiples.
    haiku3 = Usage(cache_read_input_tokens=1_000_000, cache_creation_input_tokens=1_000_000)
    assert PRICES.cost("claude-3-haiku-20240307", haiku3) == pytest.approx(0.03 + 0.30)
    assert PRICES.cost("claude-opus-4-1", Usage(output_tokens=1000)) == pytest.approx(0.075)
    assert PRICES.cost("claude-opus-4-5", Usage(output_tokens=1000)) == pytest.approx(0.025)


def test_costs_round_up_to_the_nano_dollar() -> None:
    # One cache-read token of Haiku 3: $0.03 / MTok = 30 nano-dollars, exactly.
    assert PRICES.cost_nanos("claude-3-haiku", Usage(cache_read_input_tokens=1)) == 30
    # $0.0001 / MTok is a tenth of a nano-dollar per token: one token costs 1, ten cost 1.
    cheap = PRICES.with_model("cheap", ModelPrice(Decimal("0.0001"), Decimal(0)))
    assert cheap.cost_nanos("cheap", Usage(input_tokens=1)) == 1
    assert cheap.cost_nanos("cheap", Usage(input_tokens=10)) == 1
    assert cheap.cost_nanos("cheap", Usage(input_tokens=11)) == 2
    assert PRICES.cost_nanos("claude-sonnet-4-5", Usage()) == 0


def test_worst_case_is_never_below_any_real_cost() -> None:
    for model in ("claude-sonnet-4-5", "claude-3-haiku", "claude-fable-5-1"):
        worst = PRICES.worst_case_nanos(model, 1000, 500)
        for usage in (Usage(input_tokens=1000, output_tokens=500),
                      Usage(cache_creation_1h_input_tokens=1000,
                            cache_creation_input_tokens=1000, output_tokens=500),
                      Usage(cache_creation_input_tokens=1000, output_tokens=500),
                      Usage(cache_read_input_tokens=1000, output_tokens=500)):
            assert PRICES.cost_nanos(model, usage) <= worst
    assert PRICES.worst_case_nanos("claude-sonnet-4-5", 1000, 0, "none") == 3_000_000


def test_model_names_resolve_with_snapshot_suffixes() -> None:
    assert PRICES.price("claude-sonnet-4-5-20250929") == PRICES.price("claude-sonnet-4-5")
    assert PRICES.price("claude-3-5-haiku-latest").input == Decimal("0.8")
    assert PRICES.price("CLAUDE-HAIKU-4-5").output == Decimal("5")
    # The offline scripted model costs play money at Sonnet's rates.
    assert PRICES.price("scripted") == PRICES.price("claude-sonnet-4-5")
    # No loose prefix matching: opus-4 must not price opus-4-5 (a 3x difference).
    assert PRICES.price("claude-opus-4-5").input == Decimal("5")
    assert PRICES.price("claude-opus-4").input == Decimal("15")


def test_unknown_model_is_an_error_unless_a_default_is_set() -> None:
    with pytest.raises(UnknownModel) as exc:
        PRICES.cost("gpt-17", Usage(output_tokens=1))
    assert "gpt-17" in exc.value.message and BUILTIN_PRICES.version in exc.value.message
    table = BUILTIN_PRICES.with_default(ModelPrice(Decimal(1), Decimal(2)))
    assert table.cost("gpt-17", Usage(output_tokens=1_000_000)) == pytest.approx(2)
    assert table.with_model("mine", ModelPrice(Decimal(0), Decimal(0))).cost(
        "mine", Usage(output_tokens=5)) == 0


def test_price_tables_load_from_json_and_refuse_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"version": "v7", "models": {
        "m": {"input": "1", "output": 2, "cache_read": 0.5}}}))
    table = PriceTable.load(path)
    assert table.version == "v7" and table.price("m").cache_read == Decimal("0.5")
    assert PriceTable.from_dict(table.to_dict()) == table
    for bad in ({"models": {}}, {"version": "x"}, {"version": "x", "models": {"m": {}}},
                {"version": "x", "models": {"m": {"input": -1, "output": 1}}},
                {"version": "x", "models": {"m": {"input": "lots", "output": 1}}},
                {"version": "x", "models": {"m": {"input": 1, "output": 1, "tip": 1}}}):
        with pytest.raises(ConfigError):
            PriceTable.from_dict(bad)
    path.write_text("{not json")
    with pytest.raises(ConfigError):
        PriceTable.load(path)
