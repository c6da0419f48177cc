"""``--set KEY=VALUE`` settings: read as each default's type, and refused with a message
that names the setting when a role does not take it or the value is not of its type."""

from __future__ import annotations

import pytest

from nerve import ConfigError, read_setting, read_settings

DEFAULTS = {"ttl": 2.0, "instances": 1, "budget": True, "backend": ""}


def test_values_are_read_as_their_defaults_type_and_the_rest_defaulted() -> None:
    got = read_settings("gateway", {"ttl": "0.5", "instances": " 3", "budget": "off"}, DEFAULTS)
    assert got == {"ttl": 0.5, "instances": 3, "budget": False, "backend": ""}
    assert read_settings("gateway", {}, DEFAULTS) == DEFAULTS
    # Values that already have the type pass as they are (roles built in code).
    assert read_settings("gateway", {"instances": 2, "budget": False}, DEFAULTS)["instances"] == 2
    for text, flag in [("1", True), ("yes", True), ("ON", True), ("true", True),
                       ("0", False), ("no", False), ("Off", False), ("false", False)]:
        assert read_setting("s", "budget", text, True) is flag


@pytest.mark.parametrize(("raw", "message"), [
    ({"tll": "1"}, "gateway has no setting 'tll'; it takes: backend, budget, instances, ttl"),
    ({"ttl": "abc"}, "gateway setting ttl='abc' must be a number"),
    ({"ttl": "nan"}, "gateway setting ttl='nan' must be a number"),
    ({"ttl": "inf"}, "gateway setting ttl='inf' must be a number"),
    ({"instances": "2.5"}, "gateway setting instances='2.5' must be a whole number"),
    ({"instances": True}, "gateway setting instances=True must be a whole number"),
    ({"budget": "maybe"}, "gateway setting budget='maybe' must be on or off"),
])
def test_unknown_settings_and_values_of_the_wrong_type_are_refused(raw, message) -> None:
    with pytest.raises(ConfigError) as info:
        read_settings("gateway", raw, DEFAULTS)
    assert info.value.message.startswith(message)
    assert info.value.setting == next(iter(raw))


def test_a_role_that_takes_no_settings_says_so() -> None:
    with pytest.raises(ConfigError, match="activity has no setting 'x'; it takes: no settings"):
        read_settings("activity", {"x": "1"}, {})
