"""Cache-aware routing: which upstream of a pool serves a call.

A pool is a set of interchangeable upstreams: replicas of a self-hosted model (each with its
own prefix cache) or API keys / workspaces of a hosted one (each with its own cache and rate
limits). The ``affinity`` policy sends every call of a run to the upstream that already
holds its prefix:

* **Rendezvous hashing** on the run's stable prefix (tools, system, first message): every
  gateway, before and after a restart, ranks the upstreams the same way for the same key, so
  affinity needs no shared state.
* **Bounded load** (consistent hashing with bounded loads, Mirrokni et al. 2018): a new run
  skips an upstream that already has more than ``load_factor`` x its fair share of the calls
  in flight for the next one in its ranking, so a hot spot spills over instead of queueing.
  A run whose prefix is already cached somewhere stays there up to ``stay_factor`` x the
  fair share (moving it costs its whole context again), and a spilled run stays where it
  spilled to. The load seen is this gateway's own.
* **Health**: each upstream has a circuit breaker. A refused connection opens it at once,
  server errors after ``failure_threshold`` in a row; an open breaker lets one probe through
  after its cool-down (doubling up to ``max_open``) and closes on success. A 429 or 529
  with ``retry-after`` parks the upstream until then. Calls of a sick upstream move to the
  next upstream in their ranking, and come back when it heals (the ranking never changed).

``round_robin``, ``least_loaded`` and ``random`` exist as baselines for the benchmark.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["affinity", "round_robin", "least_loaded", "random"]
PROBE_POLL = 0.05


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class BreakerConfig:
    failure_threshold: int = 3
    open_for: float = 1.0
    max_open: float = 30.0


@dataclass(slots=True)
class CircuitBreaker:
    """Per-upstream health: closed (healthy), open (skipped), half-open (one probe)."""

    config: BreakerConfig
    clock: Callable[[], float]
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    open_for: float = 0.0
    probing: bool = False
    parked_until: float = 0.0  # a 429/529's retry-after

    def available(self, now: float) -> bool:
        if now < self.parked_until:
            return False
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.open_for:
            self.state = BreakerState.HALF_OPEN
            self.probing = False
        return self.state is BreakerState.HALF_OPEN and not self.probing

    def ready_at(self, now: float) -> float:
        """When this upstream may be tried again (``now`` or earlier: at once)."""
        at = self.parked_until
        if self.state is BreakerState.OPEN:
            at = max(at, self.opened_at + self.open_for)
        elif self.state is BreakerState.HALF_OPEN and self.probing:
            at = max(at, now + PROBE_POLL)  # someone else's probe decides; look again soon
        return at

    def on_pick(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.probing = True

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.probing = False
        self.open_for = 0.0

    def failure(self, *, hard: bool, retry_after: float | None = None) -> None:
        """Record a failed call. ``hard``: the upstream is unreachable (open at once)."""
        now = self.clock()
        if retry_after is not None and retry_after > 0:
            self.parked_until = max(self.parked_until, now + retry_after)
        self.failures += 1
        if self.state is BreakerState.OPEN:
            return  # a call picked before the breaker opened: the verdict stands
        if self.state is BreakerState.HALF_OPEN or hard or (
                self.failures >= self.config.failure_threshold):
            self.open_for = min(self.config.max_open,
                                self.open_for * 2 if self.open_for else self.config.open_for)
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.probing = False

    def throttled(self, retry_after: float | None) -> None:
        """A rate limit: park the upstream without counting it as unhealthy."""
        if retry_after is not None and retry_after > 0:
            self.parked_until = max(self.parked_until, self.clock() + retry_after)
        if self.state is BreakerState.HALF_OPEN:
            self.probing = False


@dataclass(slots=True)
class Upstream:
    """One endpoint of a pool, with its live state in this gateway."""

    name: str
    base_url: str = ""
    api_key: str | None = None
    weight: float = 1.0
    in_flight: int = 0
    served: int = 0
    breaker: CircuitBreaker | None = None
    _seed: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self._seed = self.name.encode()


def rendezvous_score(key: bytes, upstream: Upstream) -> float:
    """Weighted rendezvous (highest random weight) score of ``upstream`` for ``key``."""
    h = int.from_bytes(hashlib.blake2b(key + b"\0" + upstream._seed, digest_size=8).digest(),
                       "big")
    u = (h + 0.5) / 2.0**64  # in (0, 1)
    return -upstream.weight / math.log(u)


class NoUpstream(Exception):
    """Every upstream of the pool is parked or open; ``retry_at`` says when one may be back."""

    def __init__(self, retry_at: float) -> None:
        super().__init__(f"no upstream available before {retry_at:.3f}")
        self.retry_at = retry_at


class Router:
    """Picks upstreams of one pool by policy, tracking load and health."""

    def __init__(self, upstreams: list[Upstream], *, policy: Policy = "affinity",
                 load_factor: float = 1.25, stay_factor: float = 2.0, min_load: int = 2,
                 breaker: BreakerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                 memory: int = 100_000) -> None:
        if not upstreams:
            raise ValueError("a pool needs at least one upstream")
        names = [u.name for u in upstreams]
        if len(set(names)) != len(names):
            raise ValueError(f"upstream names must be unique: {names}")
        self.upstreams = upstreams
        self.policy: Policy = policy
        self.load_factor = load_factor
        self.stay_factor = max(stay_factor, load_factor)
        self.min_load = min_load
        self.memory = memory
        self.clock = clock
        # affinity key -> (upstream it last went to, whether it spilled there from home)
        self._placed: OrderedDict[bytes, tuple[str, bool]] = OrderedDict()
        for u in upstreams:
            u.breaker = CircuitBreaker(breaker or BreakerConfig(), clock)
        self._rr = itertools.count()
        self._random = random.Random(seed)

    def ranking(self, key: bytes) -> list[Upstream]:
        """The upstreams in ``key``'s rendezvous order (the same in every gateway)."""
        return sorted(self.upstreams, key=lambda u: rendezvous_score(key, u), reverse=True)

    def pick(self, key: bytes, exclude: set[str] | frozenset[str] = frozenset()) -> Upstream:
        """The upstream for the next call with ``key``; raises :class:`NoUpstream`."""
        now = self.clock()
        live = [u for u in self.upstreams if u.name not in exclude
                and u.breaker is not None and u.breaker.available(now)]
        if not live:
            live = [u for u in self.upstreams
                    if u.breaker is not None and u.breaker.available(now)]
        if not live:
            raise NoUpstream(min(u.breaker.ready_at(now) for u in self.upstreams
                                 if u.breaker is not None))
        if self.policy == "affinity":
            chosen = self._bounded(key, live)
        elif self.policy == "round_robin":
            chosen = live[next(self._rr) % len(live)]
        elif self.policy == "least_loaded":
            low = min(u.in_flight for u in live)
            ties = [u for u in live if u.in_flight == low]
            chosen = ties[next(self._rr) % len(ties)]
        else:
            chosen = self._random.choice(live)
        assert chosen.breaker is not None
        chosen.breaker.on_pick()
        return chosen

    def _cap(self, u: Upstream, total: int, weight: float, factor: float) -> int:
        # Each live upstream may hold up to ``factor`` x its weighted share of the calls in
        # flight (this one included). Below ``min_load`` nothing counts as overloaded: at
        # a handful of calls in flight the share is noise, and moving a run costs its cache.
        return max(self.min_load, math.ceil(factor * total * u.weight / weight))

    def _bounded(self, key: bytes, live: list[Upstream]) -> Upstream:
        total = sum(u.in_flight for u in self.upstreams) + 1
        weight = sum(u.weight for u in live)
        home = max(self.upstreams, key=lambda u: rendezvous_score(key, u))
        placed = self._placed.get(key)
        if placed is not None:
            # The run's prefix is cached where its last call went: it stays there unless
            # that upstream is clearly overloaded (stay_factor), because moving re-computes
            # the whole context. A run that went elsewhere only because home was down goes
            # home as soon as home is back and has room.
            current = next((u for u in live if u.name == placed[0]), None)
            displaced = current is not home and not placed[1]
            if displaced and home in live and \
                    home.in_flight < self._cap(home, total, weight, self.load_factor):
                return self._place(key, home, spilled=False)
            if current is not None and \
                    current.in_flight < self._cap(current, total, weight, self.stay_factor):
                self._placed.move_to_end(key)
                return current
        # A new run (or one whose upstream is gone or overloaded): its rendezvous ranking,
        # skipping upstreams above load_factor x their share (bounded-load hashing).
        ranked = sorted(live, key=lambda u: rendezvous_score(key, u), reverse=True)
        chosen = next((u for u in ranked
                       if u.in_flight < self._cap(u, total, weight, self.load_factor)),
                      ranked[0])
        # Spilled (home alive but full) runs stick to their new place; failed-over runs
        # (home unavailable) go home as soon as it is back.
        return self._place(key, chosen, spilled=chosen is not home and home in live)

    def _place(self, key: bytes, upstream: Upstream, *, spilled: bool) -> Upstream:
        self._placed[key] = (upstream.name, spilled)
        self._placed.move_to_end(key)
        while len(self._placed) > self.memory:
            self._placed.popitem(last=False)
        return upstream

    @contextmanager
    def using(self, upstream: Upstream) -> Iterator[Upstream]:
        """Count a call in flight on ``upstream`` for as long as the block runs."""
        upstream.in_flight += 1
        upstream.served += 1
        try:
            yield upstream
        finally:
            upstream.in_flight -= 1
