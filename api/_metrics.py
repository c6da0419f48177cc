"""Prometheus text exposition for ``GET /metrics``: counters, gauges and histograms.

Labels never carry tenant names or run ids (a scrape must not leak who uses the system, and
label sets must stay bounded): requests are labelled by route template.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(slots=True)
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1


class Metrics:
    """A tiny registry: ``inc``, ``set``, ``observe``, gauges computed at scrape time."""

    def __init__(self) -> None:
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hists: dict[str, dict[Labels, _Histogram]] = defaultdict(dict)
        self._live: dict[str, Callable[[], float]] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        self._gauges[name][tuple(sorted(labels.items()))] = value

    def gauge_fn(self, name: str, fn: Callable[[], float]) -> None:
        """A gauge read when scraped."""
        self._live[name] = fn

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        hist = self._hists[name].get(key)
        if hist is None:
            hist = self._hists[name][key] = _Histogram(LATENCY_BUCKETS)
        hist.observe(value)

    def render(self) -> str:
        lines: list[str] = []

        def head(name: str, kind: str) -> None:
            text = self._help.get(name, (kind, name))[1]
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        for name, series in sorted(self._counters.items()):
            head(name, "counter")
            for labels, value in sorted(series.items()):
                lines.append(f"{name}{_labels(labels)} {value:g}")
        gauges = {name: dict(series) for name, series in self._gauges.items()}
        for name, fn in self._live.items():
            gauges.setdefault(name, {})[()] = float(fn())
        for name, series in sorted(gauges.items()):
            head(name, "gauge")
            for labels, value in sorted(series.items()):
                lines.append(f"{name}{_labels(labels)} {value:g}")
        for name, series in sorted(self._hists.items()):
            head(name, "histogram")
            for labels, hist in sorted(series.items()):
                cumulative = 0
                for bound, count in zip(hist.buckets, hist.counts or [0] * len(hist.buckets),
                                        strict=True):
                    cumulative += count
                    lines.append(f"{name}_bucket{_labels((*labels, ('le', f'{bound:g}')))} "
                                 f"{cumulative}")
                lines.append(f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {hist.n}")
                lines.append(f"{name}_sum{_labels(labels)} {hist.total:g}")
                lines.append(f"{name}_count{_labels(labels)} {hist.n}")
        return "\n".join(lines) + "\n"


__all__ = ["Metrics"]
