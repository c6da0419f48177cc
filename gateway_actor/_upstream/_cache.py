"""One replica's prompt cache, with Anthropic's documented rules.

* An entry is the KV state of a prompt prefix ending at a block, keyed by the digest of that
  prefix (``cache_control`` markers excluded). It is written at a breakpoint whose prefix is
  at least the minimum cacheable length.
* A request reads the longest cached prefix found by looking back at most ``lookback``
  blocks (20) from each of its breakpoints.
* Entries live 5 minutes or 1 hour from their last use (a hit refreshes them); the cache
  holds at most ``capacity_tokens`` of newly computed tokens and evicts the least recently
  used entries first.
* Usage follows the Messages API: ``cache_read_input_tokens`` (the prefix read),
  ``cache_creation_input_tokens`` split by TTL (tokens written, each segment at its
  breakpoint's TTL), and ``input_tokens`` (everything after the last written breakpoint).

The same class models an OpenAI-compatible server's automatic prefix caching (vLLM, SGLang):
every message boundary is a breakpoint, without lookback limit, and writes are free.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


@dataclass(slots=True)
class _Entry:
    size: int
    ttl: float
    expires: float


@dataclass(slots=True)
class CacheResult:
    """What one request read from and wrote to the cache, in tokens."""

    total: int
    read: int = 0
    write_5m: int = 0
    write_1h: int = 0

    @property
    def written(self) -> int:
        return self.write_5m + self.write_1h

    @property
    def uncached(self) -> int:
        """Tokens the replica had to compute (not read from the cache)."""
        return self.total - self.read

    @property
    def input_tokens(self) -> int:
        """Anthropic's ``input_tokens``: neither read from nor written to the cache."""
        return self.total - self.read - self.written


class PrefixCache:
    """An LRU + TTL prefix cache over digest chains."""

    def __init__(self, capacity_tokens: int = 2_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity_tokens = capacity_tokens
        self.clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._used = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_tokens(self) -> int:
        return self._used

    def clear(self) -> None:
        self._entries.clear()
        self._used = 0

    def _live(self, digest: bytes, now: float) -> _Entry | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[digest]
            self._used -= entry.size
            return None
        return entry

    def process(self, digests: list[bytes], cum_tokens: list[int],
                breakpoints: list[tuple[int, str]], *, min_tokens: int,
                lookback: int | None = 20) -> CacheResult:
        """Look up and write the cache for one request; returns its token accounting.

        ``breakpoints`` are ``(block position, ttl)`` pairs, ``ttl`` being ``"5m"`` or
        ``"1h"``. ``lookback=None`` searches the whole prefix (automatic prefix caching).
        """
        now = self.clock()
        total = cum_tokens[-1] if cum_tokens else 0
        result = CacheResult(total=total)
        if not digests:
            return result
        read_pos = -1
        for pos, _ in breakpoints:
            stop = -1 if lookback is None else max(-1, pos - lookback)
            for p in range(pos, stop, -1):
                if p <= read_pos:
                    break
                entry = self._live(digests[p], now)
                if entry is not None:
                    read_pos = p
                    entry.expires = now + entry.ttl  # a hit refreshes the entry's TTL
                    self._entries.move_to_end(digests[p])
                    break
        result.read = cum_tokens[read_pos] if read_pos >= 0 else 0

        covered = read_pos
        for pos, ttl in sorted(breakpoints):
            if cum_tokens[pos] < min_tokens:
                continue  # below the minimum cacheable length: silently not cached
            seconds = TTL_SECONDS[ttl]
            existing = self._live(digests[pos], now)
            if pos <= covered:
                if existing is None:
                    # Computed as part of the prefix read; recording it costs nothing.
                    self._entries[digests[pos]] = _Entry(0, seconds, now + seconds)
                else:
                    existing.expires = max(existing.expires, now + seconds)
                continue
            segment = cum_tokens[pos] - (cum_tokens[covered] if covered >= 0 else 0)
            if ttl == "1h":
                result.write_1h += segment
            else:
                result.write_5m += segment
            if existing is not None:
                self._used -= existing.size
                del self._entries[digests[pos]]
            self._entries[digests[pos]] = _Entry(segment, seconds, now + seconds)
            self._used += segment
            covered = pos
        self._evict()
        return result

    def _evict(self) -> None:
        while self._used > self.capacity_tokens and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._used -= entry.size
            self.evictions += 1
