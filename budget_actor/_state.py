"""What a ledger key holds, and the pure operations on it (no I/O, no clocks of its own).

A tenant's ledger is one KV value (``tenant.<tenant>``), msgpack-encoded with short keys
because every reservation rewrites it whole:

* ``l`` limits (only what differs from the defaults), ``k`` the kill-switch,
* ``w`` spend per calendar window (start, nano-dollars, tokens),
* ``s`` runs started this minute, ``n`` the next reservation sequence,
* ``o`` open reservations ``seq -> [nanos, tokens, expires_ms, run_id, key, created_ms]``,
* ``x`` expired-reservation tombstones ``seq -> expired_ms`` (a late settle still charges),
* ``h`` runs the breaker halted, ``t`` lifetime totals.

Size stays bounded: open reservations are capped (``Limits.max_in_flight``), tombstones and
halted runs are capped and age out, and settled reservations leave no trace: a reservation
id is ``<epoch>-<seq>``, and a sequence below ``n`` that is neither open nor a tombstone is
closed, which is what makes settle idempotent without remembering every settlement.

The invariant every operation keeps (and the property test checks on every stored
revision): for each window with a limit, ``spent + reserved <= limit``. Only a settle whose
real cost exceeds its reservation (a wrong input estimate) or a settle that arrives after
its reservation expired can break it; both are real money, charged and counted as overrun.
"""

from __future__ import annotations

import datetime as _dt
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgpack

from budget_actor._limits import WINDOWS, Limits
from budget_actor._prices import NANOS_PER_USD, usd_to_nanos
from nerve import BudgetExceeded, CodecError, ReservationNotFound, RunHalted, TenantKilled

SCHEMA = 1
TOMBSTONE_TTL_MS = 3600_000
MAX_TOMBSTONES = 256
MAX_HALTED = 512
HALTED_TTL = 7 * 86400.0
EXHAUSTED_FRACTION = 0.9


def window_start(kind: str, now: float) -> int:
    """Start (epoch seconds, UTC) of the calendar window of ``kind`` containing ``now``."""
    if kind == "minute":
        return int(now // 60) * 60
    if kind == "hour":
        return int(now // 3600) * 3600
    if kind == "day":
        return int(now // 86400) * 86400
    t = _dt.datetime.fromtimestamp(now, _dt.UTC)
    return int(_dt.datetime(t.year, t.month, 1, tzinfo=_dt.UTC).timestamp())


def window_end(kind: str, start: int) -> int:
    if kind == "minute":
        return start + 60
    if kind == "hour":
        return start + 3600
    if kind == "day":
        return start + 86400
    t = _dt.datetime.fromtimestamp(start, _dt.UTC)
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return int(_dt.datetime(year, month, 1, tzinfo=_dt.UTC).timestamp())


def fmt_usd(nanos: int) -> str:
    return f"${nanos / NANOS_PER_USD:,.6f}".rstrip("0").rstrip(".")


def reservation_id(epoch: str, seq: int, run_id: str | None = None) -> str:
    """``<epoch>-<seq>``, plus ``~<run_id>`` when the run has its own ledger to settle."""
    return f"{epoch}-{seq}" + (f"~{run_id}" if run_id else "")


def parse_reservation_id(res_id: str) -> tuple[str, int, str | None]:
    """``(epoch, seq, run_id)`` of a reservation id; :class:`ReservationNotFound` if malformed."""
    head, _, run_id = str(res_id).partition("~")
    epoch, _, seq = head.partition("-")
    if not epoch or not seq.isdigit() or len(seq) > 18:
        raise ReservationNotFound(f"malformed reservation id {res_id!r}",
                                  reservation_id=str(res_id))
    return epoch, int(seq), (run_id or None)


@dataclass(slots=True, frozen=True)
class OpenReservation:
    amount: int  # nano-dollars
    tokens: int
    expires_ms: int
    run_id: str | None
    key: str | None
    created_ms: int


@dataclass(slots=True, frozen=True)
class KillState:
    """The kill-switch. ``until`` (epoch seconds) lifts it by itself (exhaustion kills)."""

    reason: str
    by: str
    at: float
    policy: str  # "kill" | "pause"
    until: float | None = None
    source: str = "manual"  # manual | breaker | exhaustion | notice

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def wire(self) -> list[Any]:
        return [self.reason, self.by, self.at, self.policy, self.until, self.source]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> KillState:
        return cls(str(raw[0]), str(raw[1]), float(raw[2]), str(raw[3]),
                   None if raw[4] is None else float(raw[4]), str(raw[5]))


@dataclass(slots=True, frozen=True)
class HaltState:
    at: float
    policy: str
    reason: str
    trip_id: str = ""


@dataclass(slots=True)
class Window:
    start: int
    nanos: int = 0
    tokens: int = 0


@dataclass(slots=True)
class SettleOutcome:
    cost: int
    tokens: int
    status: str  # settled | late | duplicate
    released: int = 0
    overrun: int = 0
    run_id: str | None = None


@dataclass(slots=True)
class TenantState:
    """One tenant's ledger. Mutators check first and change second: an operation that
    raises leaves the state as it was, except for the kill-switch it may turn on."""

    tenant: str
    epoch: str
    limits: Limits
    kill: KillState | None = None
    windows: dict[str, Window] = field(default_factory=dict)
    spawn_start: int = 0  # runs started in the calendar minute starting here
    spawn_count: int = 0
    next_seq: int = 1
    open: dict[int, OpenReservation] = field(default_factory=dict)
    expired: dict[int, int] = field(default_factory=dict)
    halted: dict[str, HaltState] = field(default_factory=dict)
    lifetime_nanos: int = 0
    lifetime_tokens: int = 0
    calls: int = 0
    overrun_nanos: int = 0
    updated_at: float = 0.0
    # derived, not stored
    reserved_nanos: int = 0
    reserved_tokens: int = 0
    keys: dict[str, int] = field(default_factory=dict)
    usd_limits: dict[str, int] = field(default_factory=dict)
    # what the last operations did that others must hear about (not stored)
    kill_events: list[KillState | None] = field(default_factory=list)
    dirty: bool = False

    # -- construction -------------------------------------------------------------------
    @classmethod
    def new(cls, tenant: str, limits: Limits, now: float) -> TenantState:
        state = cls(tenant=tenant, epoch=secrets.token_hex(4), limits=limits)
        state.windows = {w: Window(window_start(w, now)) for w in WINDOWS}
        state._derive()
        state.dirty = True
        return state

    def _derive(self) -> None:
        self.reserved_nanos = sum(r.amount for r in self.open.values())
        self.reserved_tokens = sum(r.tokens for r in self.open.values())
        self.keys = {r.key: seq for seq, r in self.open.items() if r.key}
        self._derive_limits()

    def _derive_limits(self) -> None:
        self.usd_limits = {w: usd_to_nanos(v) for w in WINDOWS
                           if (v := self.limits.usd_limit(w)) is not None}

    def clone(self) -> TenantState:
        """A copy to apply a batch to (open reservations are immutable, so shallow)."""
        return TenantState(
            tenant=self.tenant, epoch=self.epoch, limits=self.limits, kill=self.kill,
            windows={k: Window(w.start, w.nanos, w.tokens) for k, w in self.windows.items()},
            spawn_start=self.spawn_start, spawn_count=self.spawn_count, next_seq=self.next_seq,
            open=dict(self.open), expired=dict(self.expired), halted=dict(self.halted),
            lifetime_nanos=self.lifetime_nanos, lifetime_tokens=self.lifetime_tokens,
            calls=self.calls, overrun_nanos=self.overrun_nanos, updated_at=self.updated_at,
            reserved_nanos=self.reserved_nanos, reserved_tokens=self.reserved_tokens,
            keys=dict(self.keys), usd_limits=self.usd_limits,
        )

    # -- wire ----------------------------------------------------------------------------
    def encode(self) -> bytes:
        return msgpack.packb({
            "v": SCHEMA, "e": self.epoch, "T": self.tenant, "l": self.limits.compact(),
            "k": self.kill.wire() if self.kill else None,
            "w": {k: [w.start, w.nanos, w.tokens] for k, w in self.windows.items()},
            "s": [self.spawn_start, self.spawn_count], "n": self.next_seq,
            "o": {seq: [r.amount, r.tokens, r.expires_ms, r.run_id, r.key, r.created_ms]
                  for seq, r in self.open.items()},
            "x": self.expired,
            "h": {run: [h.at, h.policy, h.reason, h.trip_id] for run, h in self.halted.items()},
            "t": [self.lifetime_nanos, self.lifetime_tokens, self.calls, self.overrun_nanos],
            "u": self.updated_at,
        }, use_bin_type=True)

    @classmethod
    def decode(cls, tenant: str, data: bytes) -> TenantState:
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(d, dict) or d.get("v") != SCHEMA:
                version = d.get("v") if isinstance(d, dict) else d
                raise ValueError(f"unknown ledger schema {version!r}")
            state = cls(
                tenant=tenant, epoch=str(d["e"]), limits=Limits.model_validate(d["l"]),
                kill=KillState.from_wire(d["k"]) if d.get("k") else None,
                windows={k: Window(int(v[0]), int(v[1]), int(v[2])) for k, v in d["w"].items()},
                spawn_start=int(d["s"][0]), spawn_count=int(d["s"][1]), next_seq=int(d["n"]),
                open={int(seq): OpenReservation(int(r[0]), int(r[1]), int(r[2]), r[3], r[4],
                                                int(r[5])) for seq, r in d["o"].items()},
                expired={int(k): int(v) for k, v in d["x"].items()},
                halted={str(run): HaltState(float(h[0]), str(h[1]), str(h[2]), str(h[3]))
                        for run, h in d["h"].items()},
                lifetime_nanos=int(d["t"][0]), lifetime_tokens=int(d["t"][1]),
                calls=int(d["t"][2]), overrun_nanos=int(d["t"][3]), updated_at=float(d["u"]),
            )
        except (ValueError, KeyError, TypeError, IndexError, msgpack.ExtraData,
                msgpack.FormatError, msgpack.StackError) as exc:
            raise CodecError(f"corrupt ledger for tenant {tenant}: {exc}", tenant=tenant) from None
        for w in WINDOWS:
            state.windows.setdefault(w, Window(0))
        state._derive()
        return state

    # -- housekeeping --------------------------------------------------------------------
    def roll(self, now: float) -> None:
        """Start new calendar windows. Only forwards: a writer whose clock lags must not
        wipe the current window's spend."""
        for kind, w in self.windows.items():
            start = window_start(kind, now)
            if start > w.start:
                self.windows[kind] = Window(start)
                self.dirty = True

    def expire(self, now: float) -> list[int]:
        """Release reservations past their expiry (keeping tombstones for late settles)."""
        now_ms = int(now * 1000)
        gone = [seq for seq, r in self.open.items() if r.expires_ms <= now_ms]
        for seq in gone:
            r = self.open.pop(seq)
            self.reserved_nanos -= r.amount
            self.reserved_tokens -= r.tokens
            if r.key and self.keys.get(r.key) == seq:
                del self.keys[r.key]
            self.expired[seq] = now_ms
        old = [seq for seq, at in self.expired.items() if at + TOMBSTONE_TTL_MS <= now_ms]
        for seq in old:
            del self.expired[seq]
        if len(self.expired) > MAX_TOMBSTONES:
            for seq in sorted(self.expired, key=self.expired.__getitem__)[:-MAX_TOMBSTONES]:
                del self.expired[seq]
        if gone or old:
            self.dirty = True
        if self.kill is not None and not self.kill.active(now):
            self.kill = None  # an exhaustion kill whose window has ended
            self.kill_events.append(None)
            self.dirty = True
        return gone

    def next_expiry(self) -> float | None:
        if not self.open:
            return None
        return min(r.expires_ms for r in self.open.values()) / 1000

    # -- checks --------------------------------------------------------------------------
    def check_kill(self, now: float) -> None:
        if self.kill is not None and self.kill.active(now):
            k = self.kill
            until = (f" until {_dt.datetime.fromtimestamp(k.until, _dt.UTC):%Y-%m-%d %H:%M:%S}Z"
                     if k.until else "")
            raise TenantKilled(
                f"tenant {self.tenant} is killed{until} ({k.reason}, by {k.by}); nothing of "
                f"theirs runs until `nerve kill --tenant {self.tenant} --reset`",
                tenant=self.tenant, reason=k.reason, by=k.by, policy=k.policy, until=k.until)

    def _set_kill(self, kill: KillState) -> bool:
        current = self.kill
        if current is not None and current.until is None and kill.until is not None:
            return False  # a permanent kill is not weakened by a timed one
        if current == kill:
            return False
        self.kill = kill
        self.kill_events.append(kill)
        self.dirty = True
        return True

    def _exhausted(self, kind: str, what: str, now: float) -> None:
        """A window refused a call. If it is (nearly) all settled spend, the budget is
        exhausted, not just busy: turn the kill-switch on until the window ends."""
        if self.limits.on_exhaustion == "refuse":
            return
        w = self.windows[kind]
        if what == "usd":
            limit = self.usd_limits[kind]
            spent = w.nanos
        else:
            limit = self.limits.token_limit(kind) or 0
            spent = w.tokens
        if spent < EXHAUSTED_FRACTION * limit:
            return
        unit = fmt_usd if what == "usd" else (lambda n: f"{n:,} tokens")
        self._set_kill(KillState(
            reason=f"{what}_per_{kind} exhausted ({unit(spent)} of {unit(limit)})",
            by="budget", at=now, policy=self.limits.on_exhaustion,
            until=float(window_end(kind, w.start)), source="exhaustion"))

    def _refuse(self, message: str, **fields: Any) -> BudgetExceeded:
        return BudgetExceeded(message, tenant=self.tenant, **fields)

    # -- operations ----------------------------------------------------------------------
    def reserve(self, *, amount: int, tokens: int, run_id: str | None, key: str | None,
                now: float) -> tuple[int, OpenReservation, bool]:
        """Admit a reservation: ``(seq, reservation, created)``; ``created`` is False when
        an open reservation with the same ``key`` is returned instead."""
        self.check_kill(now)
        if run_id is not None and run_id in self.halted:
            h = self.halted[run_id]
            raise RunHalted(f"run {run_id} of tenant {self.tenant} was stopped by the runaway "
                            f"breaker ({h.reason}); resume it with `nerve budget resume "
                            f"--tenant {self.tenant} --run {run_id}`", tenant=self.tenant,
                            run_id=run_id, reason=h.reason, policy=h.policy)
        if key is not None and key in self.keys:
            seq = self.keys[key]
            return seq, self.open[seq], False
        if len(self.open) >= self.limits.max_in_flight:
            raise self._refuse(
                f"tenant {self.tenant} has {len(self.open)} reservations in flight, the most "
                "its limits allow (max_in_flight)", scope="in_flight", limit=len(self.open))
        for kind in WINDOWS:
            limit = self.usd_limits.get(kind)
            if limit is not None:
                w = self.windows[kind]
                if w.nanos + self.reserved_nanos + amount > limit:
                    self._exhausted(kind, "usd", now)
                    alone = (" (this call alone exceeds it: lower max_tokens)"
                             if amount > limit else "")
                    raise self._refuse(
                        f"tenant {self.tenant}: a call of up to {fmt_usd(amount)} does not fit "
                        f"usd_per_{kind} {fmt_usd(limit)}{alone}: {fmt_usd(w.nanos)} spent, "
                        f"{fmt_usd(self.reserved_nanos)} reserved in flight",
                        scope=kind, unit="usd", limit_usd=limit / NANOS_PER_USD,
                        spent_usd=w.nanos / NANOS_PER_USD,
                        reserved_usd=self.reserved_nanos / NANOS_PER_USD,
                        requested_usd=amount / NANOS_PER_USD)
            tlimit = self.limits.token_limit(kind)
            if tlimit is not None:
                w = self.windows[kind]
                if w.tokens + self.reserved_tokens + tokens > tlimit:
                    self._exhausted(kind, "tokens", now)
                    raise self._refuse(
                        f"tenant {self.tenant}: a call of up to {tokens:,} tokens does not fit "
                        f"tokens_per_{kind} {tlimit:,}: {w.tokens:,} used, "
                        f"{self.reserved_tokens:,} reserved in flight",
                        scope=kind, unit="tokens", limit=tlimit, spent=w.tokens,
                        reserved=self.reserved_tokens, requested=tokens)
        seq = self.next_seq
        now_ms = int(now * 1000)
        r = OpenReservation(amount, tokens, now_ms + int(self.limits.reservation_ttl * 1000),
                            run_id, key, now_ms)
        self.next_seq += 1
        self.open[seq] = r
        self.reserved_nanos += amount
        self.reserved_tokens += tokens
        if key is not None:
            self.keys[key] = seq
        self.dirty = True
        return seq, r, True

    def _charge(self, cost: int, tokens: int, now: float) -> None:
        for w in self.windows.values():
            w.nanos += cost
            w.tokens += tokens
        self.lifetime_nanos += cost
        self.lifetime_tokens += tokens
        self.calls += 1
        for kind, limit in self.usd_limits.items():
            if self.windows[kind].nanos >= limit:
                self._exhausted(kind, "usd", now)
        for kind in WINDOWS:
            tlimit = self.limits.token_limit(kind)
            if tlimit is not None and self.windows[kind].tokens >= tlimit:
                self._exhausted(kind, "tokens", now)

    def settle(self, seq: int, *, cost: int, tokens: int, now: float) -> SettleOutcome:
        r = self.open.pop(seq, None)
        if r is not None:
            self.reserved_nanos -= r.amount
            self.reserved_tokens -= r.tokens
            if r.key and self.keys.get(r.key) == seq:
                del self.keys[r.key]
            overrun = max(0, cost - r.amount)
            self.overrun_nanos += overrun
            self._charge(cost, tokens, now)
            self.dirty = True
            return SettleOutcome(cost, tokens, "settled", max(0, r.amount - cost), overrun,
                                 r.run_id)
        if seq in self.expired:
            # Its reservation expired and was released; the money was still spent.
            del self.expired[seq]
            self.overrun_nanos += cost
            self._charge(cost, tokens, now)
            self.dirty = True
            return SettleOutcome(cost, tokens, "late", 0, cost)
        if seq >= self.next_seq:
            raise ReservationNotFound(
                f"tenant {self.tenant} never issued reservation {self.epoch}-{seq}",
                tenant=self.tenant, reservation_id=f"{self.epoch}-{seq}")
        return SettleOutcome(cost, tokens, "duplicate")

    def charge_unreserved(self, *, cost: int, tokens: int, now: float) -> None:
        """Record spend that had no reservation (a call admitted while the ledger was away,
        with fail-open on, or a reservation from a ledger that was since recreated)."""
        self.overrun_nanos += cost
        self._charge(cost, tokens, now)
        self.dirty = True

    def release(self, seq: int) -> bool:
        r = self.open.pop(seq, None)
        if r is not None:
            self.reserved_nanos -= r.amount
            self.reserved_tokens -= r.tokens
            if r.key and self.keys.get(r.key) == seq:
                del self.keys[r.key]
            self.dirty = True
            return True
        if self.expired.pop(seq, None) is not None:
            self.dirty = True
            return True
        return False

    def spawn_run(self, now: float) -> None:
        self.check_kill(now)
        for kind, limit in self.usd_limits.items():
            if self.windows[kind].nanos >= limit:
                raise self._refuse(
                    f"tenant {self.tenant} has spent its usd_per_{kind} "
                    f"({fmt_usd(self.windows[kind].nanos)} of {fmt_usd(limit)}); no new runs "
                    "until the window ends", scope=kind, unit="usd")
        limit = self.limits.runs_per_minute
        if limit is None:
            return
        start = window_start("minute", now)
        if start > self.spawn_start:
            self.spawn_start, self.spawn_count = start, 0
        if self.spawn_count >= limit:
            raise self._refuse(
                f"tenant {self.tenant} started {self.spawn_count} runs this minute, the most "
                f"runs_per_minute ({limit}) allows", scope="spawn", limit=limit)
        self.spawn_count += 1
        self.dirty = True

    def set_limits(self, limits: Limits) -> None:
        if limits != self.limits:
            self.limits = limits
            self._derive_limits()
            self.dirty = True

    def set_kill(self, kill: KillState) -> bool:
        return self._set_kill(kill)

    def reset(self, clear_runs: bool = False) -> bool:
        changed = self.kill is not None or (clear_runs and bool(self.halted))
        if self.kill is not None:
            self.kill = None
            self.kill_events.append(None)
        if clear_runs:
            self.halted.clear()
        if changed:
            self.dirty = True
        return changed

    def halt_run(self, run_id: str, halt: HaltState, now: float) -> bool:
        if run_id in self.halted:
            return False
        self.halted[run_id] = halt
        for run in [r for r, h in self.halted.items() if h.at + HALTED_TTL <= now]:
            del self.halted[run]
        if len(self.halted) > MAX_HALTED:
            for run in sorted(self.halted, key=lambda r: self.halted[r].at)[:-MAX_HALTED]:
                del self.halted[run]
        self.dirty = True
        return True

    def resume_run(self, run_id: str) -> bool:
        if self.halted.pop(run_id, None) is None:
            return False
        self.dirty = True
        return True

    # -- reading -------------------------------------------------------------------------
    def is_killed(self, now: float) -> bool:
        return self.kill is not None and self.kill.active(now)

    def violations(self) -> list[str]:
        """Windows where settled + reserved exceeds the limit (none, unless overrun)."""
        out = []
        for kind, limit in self.usd_limits.items():
            w = self.windows[kind]
            if w.nanos + self.reserved_nanos > limit:
                out.append(f"usd_per_{kind}: {w.nanos} + {self.reserved_nanos} > {limit}")
            tlimit = self.limits.token_limit(kind)
            if tlimit is not None and w.tokens + self.reserved_tokens > tlimit:
                out.append(f"tokens_per_{kind}: {w.tokens} + {self.reserved_tokens} > {tlimit}")
        return out


@dataclass(slots=True)
class RunState:
    """A run's own ledger (``run.<tenant>.<run_id>``), kept only for per-run limits.

    It mirrors the run's reservations from the tenant ledger (by reservation id) and its
    lifetime spend; limits come from the tenant ledger at reservation time.
    """

    tenant: str
    run_id: str
    nanos: int = 0
    tokens: int = 0
    open: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # id -> amount, tokens, exp
    expired: dict[str, int] = field(default_factory=dict)
    updated_at: float = 0.0
    dirty: bool = False
    kill_events: list[Any] = field(default_factory=list)

    @classmethod
    def new(cls, tenant: str, run_id: str, now: float) -> RunState:
        return cls(tenant, run_id, dirty=True)

    def clone(self) -> RunState:
        return RunState(self.tenant, self.run_id, self.nanos, self.tokens, dict(self.open),
                        dict(self.expired), self.updated_at)

    def encode(self) -> bytes:
        return msgpack.packb({"v": SCHEMA, "T": self.tenant, "r": self.run_id,
                              "t": [self.nanos, self.tokens],
                              "o": {k: list(v) for k, v in self.open.items()},
                              "x": self.expired, "u": self.updated_at}, use_bin_type=True)

    @classmethod
    def decode(cls, tenant: str, run_id: str, data: bytes) -> RunState:
        try:
            d = msgpack.unpackb(data, raw=False)
            return cls(tenant, run_id, int(d["t"][0]), int(d["t"][1]),
                       {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in d["o"].items()},
                       {str(k): int(v) for k, v in d["x"].items()}, float(d["u"]))
        except (ValueError, KeyError, TypeError, IndexError, msgpack.ExtraData,
                msgpack.FormatError) as exc:
            raise CodecError(f"corrupt run ledger {tenant}/{run_id}: {exc}") from None

    @property
    def reserved(self) -> tuple[int, int]:
        return (sum(v[0] for v in self.open.values()), sum(v[1] for v in self.open.values()))

    def roll(self, now: float) -> None:
        """Runs have no calendar windows."""

    def expire(self, now: float) -> list[str]:
        now_ms = int(now * 1000)
        gone = [k for k, v in self.open.items() if v[2] <= now_ms]
        for k in gone:
            del self.open[k]
            self.expired[k] = now_ms
        old = [k for k, at in self.expired.items() if at + TOMBSTONE_TTL_MS <= now_ms]
        for k in old:
            del self.expired[k]
        if gone or old:
            self.dirty = True
        return gone

    def next_expiry(self) -> float | None:
        if not self.open:
            return None
        return min(v[2] for v in self.open.values()) / 1000

    def reserve(self, res_id: str, *, amount: int, tokens: int, expires_ms: int,
                usd_limit: int | None, token_limit: int | None) -> None:
        if res_id in self.open:
            return
        r_nanos, r_tokens = self.reserved
        if usd_limit is not None and self.nanos + r_nanos + amount > usd_limit:
            raise BudgetExceeded(
                f"run {self.run_id} of tenant {self.tenant}: a call of up to {fmt_usd(amount)} "
                f"does not fit usd_per_run {fmt_usd(usd_limit)}: {fmt_usd(self.nanos)} spent, "
                f"{fmt_usd(r_nanos)} reserved", tenant=self.tenant, run_id=self.run_id,
                scope="run", unit="usd", limit_usd=usd_limit / NANOS_PER_USD)
        if token_limit is not None and self.tokens + r_tokens + tokens > token_limit:
            raise BudgetExceeded(
                f"run {self.run_id} of tenant {self.tenant}: a call of up to {tokens:,} tokens "
                f"does not fit tokens_per_run {token_limit:,}: {self.tokens:,} used, "
                f"{r_tokens:,} reserved", tenant=self.tenant, run_id=self.run_id,
                scope="run", unit="tokens", limit=token_limit)
        self.open[res_id] = (amount, tokens, expires_ms)
        self.dirty = True

    def settle(self, res_id: str, *, cost: int, tokens: int) -> bool:
        if self.open.pop(res_id, None) is not None or self.expired.pop(res_id, None) is not None:
            self.nanos += cost
            self.tokens += tokens
            self.dirty = True
            return True
        return False

    def release(self, res_id: str) -> bool:
        if self.open.pop(res_id, None) is not None or self.expired.pop(res_id, None) is not None:
            self.dirty = True
            return True
        return False
