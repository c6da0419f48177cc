"""Settings given as ``--set KEY=VALUE`` strings, read against what a role takes.

A role states its settings once, as their defaults; a value is read as its default's type.
A setting the role does not take, or a value that is not of its type, is a
:class:`~nerve.ConfigError` that names it: a typo must not be ignored, and a bad value must
not surface later as a crash the supervisor restarts over and over.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from nerve._errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def read_setting(scope: str, key: str, raw: Any, default: Any) -> Any:
    """``raw`` as the type of ``default`` (``bool``, ``int``, ``float`` or ``str``)."""
    if type(raw) is type(default):
        return raw
    text = str(raw).strip()
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        want = "on or off (1/0, true/false, yes/no, on/off)"
    elif isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            want = "a whole number"
    elif isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return value
        want = "a number"
    else:
        return text
    raise ConfigError(f"{scope} setting {key}={raw!r} must be {want}", setting=key)


def read_settings(scope: str, raw: Mapping[str, Any], defaults: Mapping[str, Any],
                  ) -> dict[str, Any]:
    """Every setting of ``defaults``: from ``raw`` where given, read as the default's type.

    Raises :class:`~nerve.ConfigError` for a key ``defaults`` does not have, or a value
    that is not of its type.
    """
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        takes = ", ".join(sorted(defaults)) or "no settings"
        raise ConfigError(f"{scope} has no setting {', '.join(map(repr, unknown))}; it takes: "
                          f"{takes}", setting=unknown[0])
    return {key: read_setting(scope, key, raw[key], default) if key in raw else default
            for key, default in defaults.items()}
