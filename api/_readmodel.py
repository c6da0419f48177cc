"""``ReadModel``: the aiosqlite database the list, search and console endpoints read.

It holds the projections of :mod:`api._projections` and, per projection, the stream
sequence of the last history record applied to it (table ``positions``). Applying a batch
is one transaction: the rows it changes and the new positions commit together, so a crash
at any point leaves the database at a batch boundary, and re-applying a record the database
has seen changes nothing (its sequence is not past the projection's position).

The database runs in WAL mode with one connection for writes (the projector) and one for
reads, so reads never wait for a batch to commit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiosqlite

from api._projections import (
    PROJECTIONS,
    ApprovalRow,
    Batch,
    Record,
    RunRow,
    SpendRow,
    StepRow,
    ToolUseRow,
    fold,
    keys_of,
)
from nerve._errors import InvalidRequest, ReadModelError

SCHEMA_VERSION = 2  # 2: run_text and its trigram index (migrated from 1 in place)
_CHUNK = 400  # keys per IN (...) query; well under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS positions (projection TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, workflow TEXT NOT NULL,
    version TEXT NOT NULL, status TEXT NOT NULL, phase TEXT NOT NULL, task TEXT,
    labels TEXT NOT NULL, parent_run_id TEXT, forked_from TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, ended_at REAL,
    steps INTEGER NOT NULL, events INTEGER NOT NULL, llm_calls INTEGER NOT NULL,
    cost_usd REAL NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL,
    result TEXT, error TEXT, waits TEXT NOT NULL, blocked TEXT,
    cancel_requested INTEGER NOT NULL, segments INTEGER NOT NULL, last_seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS runs_by_tenant ON runs (tenant, created_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS runs_by_tenant_status
    ON runs (tenant, status, created_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_at DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL, attempt INTEGER NOT NULL, scheduled_at REAL, ended_at REAL,
    duration_ms REAL, cost_usd REAL, error TEXT,
    PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (
    run_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, digest TEXT,
    requested_at REAL NOT NULL, status TEXT NOT NULL, tool TEXT, args TEXT,
    deadline REAL, decided_at REAL, decided_by TEXT, reason TEXT,
    PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS approvals_by_status ON approvals (status, run_id);
CREATE TABLE IF NOT EXISTS tool_uses (
    run_id TEXT NOT NULL, digest TEXT NOT NULL, tool TEXT NOT NULL, args TEXT,
    llm_index INTEGER NOT NULL,
    PRIMARY KEY (run_id, digest)
) WITHOUT ROWID;
-- Search: what a run is found by (its id and task) is kept apart from the run's row, which
-- is rewritten on every change, and indexed by trigrams: a substring search is an index
-- lookup instead of a scan of every run. Written once per run; changed only if the task is.
CREATE TABLE IF NOT EXISTS run_text (run_id TEXT PRIMARY KEY, task TEXT);
CREATE VIRTUAL TABLE IF NOT EXISTS run_text_index
    USING fts5(run_id, task, content='run_text', tokenize='trigram');
CREATE TRIGGER IF NOT EXISTS run_text_added AFTER INSERT ON run_text BEGIN
    INSERT INTO run_text_index (rowid, run_id, task) VALUES (new.rowid, new.run_id, new.task);
END;
CREATE TRIGGER IF NOT EXISTS run_text_changed AFTER UPDATE ON run_text BEGIN
    INSERT INTO run_text_index (run_text_index, rowid, run_id, task)
        VALUES ('delete', old.rowid, old.run_id, old.task);
    INSERT INTO run_text_index (rowid, run_id, task) VALUES (new.rowid, new.run_id, new.task);
END;
CREATE TABLE IF NOT EXISTS spend (
    tenant TEXT PRIMARY KEY, cost_usd REAL NOT NULL, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL, llm_calls INTEGER NOT NULL, runs INTEGER NOT NULL
);
"""

_RUN_COLUMNS = ("run_id", "tenant", "workflow", "version", "status", "phase", "task", "labels",
                "parent_run_id", "forked_from", "created_at", "updated_at", "ended_at", "steps",
                "events", "llm_calls", "cost_usd", "input_tokens", "output_tokens",
                "cache_read_tokens", "cache_write_tokens", "result", "error", "waits",
                "blocked", "cancel_requested", "segments", "last_seq")
_RUN_JSON = {"labels", "forked_from", "result", "error", "waits", "blocked"}
_STEP_COLUMNS = ("run_id", "idx", "kind", "name", "status", "attempt", "scheduled_at",
                 "ended_at", "duration_ms", "cost_usd", "error")
_APPROVAL_COLUMNS = ("run_id", "idx", "name", "digest", "requested_at", "status", "tool",
                     "args", "deadline", "decided_at", "decided_by", "reason")
_TOOL_USE_COLUMNS = ("run_id", "digest", "tool", "args", "llm_index")
_SPEND_COLUMNS = ("tenant", "cost_usd", "input_tokens", "output_tokens", "cache_read_tokens",
                  "cache_write_tokens", "llm_calls", "runs")
_TABLES = {"runs": "run_id", "steps": "run_id, idx", "approvals": "run_id, idx",
           "tool_uses": "run_id, digest", "spend": "tenant", "positions": "projection",
           "run_text": "run_id"}
_TRIGRAM = 3  # the shortest search the trigram index can answer; shorter ones scan


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"),
                                                 default=str)


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _run_values(run: RunRow) -> tuple[Any, ...]:
    # getattr, not dataclasses.asdict: asdict deep-copies every field, which was most of
    # the time a batch took.
    out = []
    for c in _RUN_COLUMNS:
        v = getattr(run, c)
        if c in _RUN_JSON:
            v = _dumps(v)
        elif c == "cancel_requested":
            v = int(v)
        out.append(v)
    return tuple(out)


def _values(row: Any, columns: Sequence[str]) -> tuple[Any, ...]:
    return tuple(getattr(row, c) for c in columns)


def _run_from(row: sqlite3.Row) -> RunRow:
    d = {c: row[c] for c in _RUN_COLUMNS if c != "status"}
    for c in _RUN_JSON:
        d[c] = _loads(d[c])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return RunRow(**d)


def run_view(row: sqlite3.Row | RunRow) -> dict[str, Any]:
    """A run row as the API shows it."""
    run = row if isinstance(row, RunRow) else _run_from(row)
    return {
        "run_id": run.run_id, "tenant": run.tenant, "workflow": run.workflow,
        "version": run.version, "status": run.status, "task": run.task, "labels": run.labels,
        "parent_run_id": run.parent_run_id, "forked_from": run.forked_from,
        "created_at": run.created_at, "updated_at": run.updated_at, "ended_at": run.ended_at,
        "steps": run.steps, "events": run.events, "llm_calls": run.llm_calls,
        "cost_usd": run.cost_usd, "tokens": {
            "input": run.input_tokens, "output": run.output_tokens,
            "cache_read": run.cache_read_tokens, "cache_write": run.cache_write_tokens},
        "result": run.result, "error": run.error, "waiting_for": run.waiting_for,
        "blocked": run.blocked, "cancel_requested": run.cancel_requested,
        "segments": run.segments, "history_seq": run.last_seq,
    }


def encode_cursor(created_at: float, run_id: str) -> str:
    raw = json.dumps([created_at, run_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = json.loads(raw)
        return float(created_at), str(run_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidRequest(f"invalid cursor {cursor[:64]!r}: pass the next_cursor of the "
                             "previous page unchanged", field="cursor") from None


class ReadModel:
    """The projections in one SQLite file (see the module docstring).

    ``open()`` before use, ``close()`` after. Every method is a coroutine; the writes of one
    :meth:`apply` are one transaction.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._positions: dict[str, int] = {}
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    async def open(self) -> ReadModel:
        if self._writer is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await aiosqlite.connect(self.path)
            await self._writer.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode; a power cut may lose the
            # last batches, which the projector re-reads from the stream (the DB's position
            # is committed with the rows, so it can never be ahead of them).
            await self._writer.execute("PRAGMA synchronous=NORMAL")
            await self._writer.executescript(_SCHEMA)
            await self._check_schema()
            await self._writer.commit()
            self._reader = await aiosqlite.connect(self.path)
            self._reader.row_factory = sqlite3.Row
            await self._reader.execute("PRAGMA query_only=1")
            async with self._writer.execute("SELECT projection, seq FROM positions") as cur:
                self._positions = {p: 0 for p in PROJECTIONS}
                self._positions.update({r[0]: int(r[1]) for r in await cur.fetchall()})
        except sqlite3.Error as exc:
            await self.close()
            if "trigram" in str(exc) or "fts5" in str(exc):
                raise ReadModelError(
                    f"this Python's SQLite ({sqlite3.sqlite_version}) has no FTS5 trigram "
                    "tokenizer, which run search needs: use a Python built with SQLite 3.34 "
                    "or newer", path=str(self.path)) from None
            raise ReadModelError(f"cannot open the read model at {self.path}: {exc}; delete "
                                 "the file and run `nerve reindex` to rebuild it",
                                 path=str(self.path)) from None
        return self

    async def _check_schema(self) -> None:
        assert self._writer is not None
        async with self._writer.execute("SELECT value FROM meta WHERE key='schema'") as cur:
            row = await cur.fetchone()
        if row is None:
            await self._writer.execute("INSERT INTO meta VALUES ('schema', ?)",
                                       (str(SCHEMA_VERSION),))
        elif row[0] == "1":  # the schema has just created run_text: fill it from the runs
            await self._writer.execute(
                "INSERT OR IGNORE INTO run_text (run_id, task) SELECT run_id, task FROM runs")
            await self._writer.execute("UPDATE meta SET value = ? WHERE key = 'schema'",
                                       (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise ReadModelError(
                f"the read model at {self.path} has schema {row[0]}, this nerve writes "
                f"{SCHEMA_VERSION}: delete it and run `nerve reindex`", path=str(self.path))

    async def close(self) -> None:
        for attr in ("_reader", "_writer"):
            conn = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.close()

    async def __aenter__(self) -> ReadModel:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _conn(self, write: bool = False) -> aiosqlite.Connection:
        conn = self._writer if write else self._reader
        if conn is None:
            raise ReadModelError("the read model is closed (it may be being rebuilt); retry",
                                 path=str(self.path))
        return conn

    # -- positions ------------------------------------------------------------------------
    @property
    def positions(self) -> dict[str, int]:
        """Each projection's stream position (the last history record applied)."""
        return dict(self._positions)

    @property
    def position(self) -> int:
        """The position every projection has reached."""
        return min(self._positions.values()) if self._positions else 0

    # -- writing ----------------------------------------------------------------------------
    async def apply(self, records: Sequence[Record]) -> int:
        """Apply history records (in stream order) in one transaction; returns the position.

        Records at or before a projection's position are skipped for that projection, so
        applying the same records again changes nothing.
        """
        async with self._write_lock:
            todo = [r for r in records if r.seq > self.position]
            if not todo:
                return self.position
            conn = self._conn(write=True)
            try:
                batch = await self._load(conn, todo)
                positions = dict(self._positions)
                for rec in todo:
                    fold(batch, rec, positions)
                    for p in PROJECTIONS:
                        positions[p] = max(positions[p], rec.seq)
                await self._store(conn, batch, positions)
                await conn.commit()
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    await conn.rollback()
                raise ReadModelError(f"applying {len(todo)} history records to the read "
                                     f"model failed: {exc}", path=str(self.path)) from None
            self._positions = positions
            return self.position

    async def _load(self, conn: aiosqlite.Connection, records: list[Record]) -> Batch:
        keys = keys_of(records)
        batch = Batch()
        for rows in await _select_in(conn, "runs", "run_id", _RUN_COLUMNS, keys.runs):
            run = _run_from(rows)
            batch.runs[run.run_id] = run
        for row in await _select_pairs(conn, "steps", ("run_id", "idx"), _STEP_COLUMNS,
                                       keys.steps):
            step = StepRow(*row)
            batch.steps[(step.run_id, step.idx)] = step
        for row in await _select_pairs(conn, "approvals", ("run_id", "idx"), _APPROVAL_COLUMNS,
                                       keys.approvals):
            batch.add_approval(_approval_from(row))
        for row in await _select_in(conn, "approvals", "run_id", _APPROVAL_COLUMNS,
                                    keys.ending_runs, extra="AND status = 'pending'"):
            batch.add_approval(_approval_from(row))
        for row in await _select_pairs(conn, "tool_uses", ("run_id", "digest"),
                                       _TOOL_USE_COLUMNS, keys.tool_uses):
            use = ToolUseRow(row["run_id"], row["digest"], row["tool"], _loads(row["args"]),
                             row["llm_index"])
            batch.tool_uses[(use.run_id, use.digest)] = use
        tenants = keys.tenants | {r.tenant for r in batch.runs.values()}
        for row in await _select_in(conn, "spend", "tenant", _SPEND_COLUMNS, tenants):
            batch.spend[row["tenant"]] = SpendRow(*row)
        return batch

    async def _store(self, conn: aiosqlite.Connection, batch: Batch,
                     positions: dict[str, int]) -> None:
        async def upsert(table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]],
                         ) -> None:
            rows = list(rows)
            if rows:
                marks = ", ".join("?" * len(columns))
                await conn.executemany(
                    f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                    rows)

        changed_runs = sorted(batch.changed_runs)
        await upsert("runs", _RUN_COLUMNS, (_run_values(batch.runs[k]) for k in changed_runs))
        if changed_runs:
            texts = [(k, batch.runs[k].task) for k in changed_runs]
            await conn.executemany(
                "INSERT INTO run_text (run_id, task) VALUES (?, ?) ON CONFLICT (run_id) "
                "DO UPDATE SET task = excluded.task WHERE task IS NOT excluded.task", texts)
        await upsert("steps", _STEP_COLUMNS,
                     (_values(batch.steps[k], _STEP_COLUMNS) for k in sorted(batch.changed_steps)))
        await upsert("approvals", _APPROVAL_COLUMNS, (
            _approval_values(batch.approvals[k]) for k in sorted(batch.changed_approvals)))
        await upsert("tool_uses", _TOOL_USE_COLUMNS, (
            (u.run_id, u.digest, u.tool, _dumps(u.args), u.llm_index)
            for u in (batch.tool_uses[k] for k in sorted(batch.changed_tool_uses))))
        await upsert("spend", _SPEND_COLUMNS,
                     (_values(batch.spend[k], _SPEND_COLUMNS) for k in sorted(batch.changed_spend)))
        await upsert("positions", ("projection", "seq"), sorted(positions.items()))

    # -- reading ----------------------------------------------------------------------------
    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._read_lock:
            try:
                async with self._conn().execute(sql, params) as cur:
                    return list(await cur.fetchall())
            except sqlite3.Error as exc:
                raise ReadModelError(f"read model query failed: {exc}",
                                     path=str(self.path)) from None

    async def list_runs(self, *, tenant: str | None = None, status: str | None = None,
                        workflow: str | None = None, q: str | None = None, limit: int = 50,
                        cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Runs newest first, filtered; returns a page and the cursor of the next one."""
        where, params = [], []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if workflow is not None:
            where.append("workflow = ?")
            params.append(workflow)
        if q and len(q) >= _TRIGRAM:
            # The same substring match as the LIKE below, answered by the trigram index.
            where.append("run_id IN (SELECT run_id FROM run_text WHERE rowid IN "
                         "(SELECT rowid FROM run_text_index WHERE run_text_index MATCH ?))")
            params.append('"' + q.replace('"', '""') + '"')
        elif q:
            where.append("(run_id LIKE ? ESCAPE '\\' OR task LIKE ? ESCAPE '\\')")
            like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            params += [like, like]
        if cursor is not None:
            created_at, run_id = decode_cursor(cursor)
            where.append("(created_at, run_id) < (?, ?)")
            params += [created_at, run_id]
        sql = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
        rows = await self._fetch(sql, [*params, limit + 1])
        page = [run_view(r) for r in rows[:limit]]
        more = len(rows) > limit
        next_cursor = encode_cursor(page[-1]["created_at"], page[-1]["run_id"]) \
            if more and page else None
        return page, next_cursor

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?",
                                 (run_id,))
        return run_view(rows[0]) if rows else None

    async def run_tenant(self, run_id: str) -> str | None:
        rows = await self._fetch("SELECT tenant FROM runs WHERE run_id = ?", (run_id,))
        return rows[0]["tenant"] if rows else None

    async def steps(self, run_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch(f"SELECT {', '.join(_STEP_COLUMNS)} FROM steps "
                                 "WHERE run_id = ? ORDER BY idx", (run_id,))
        return [dict(r) for r in rows]

    async def approvals(self, *, run_id: str | None = None, tenant: str | None = None,
                        status: str | None = "pending", limit: int = 200,
                        ) -> list[dict[str, Any]]:
        cols = ", ".join(f"a.{c}" for c in _APPROVAL_COLUMNS)
        sql = f"SELECT {cols}, r.tenant FROM approvals a JOIN runs r ON r.run_id = a.run_id"
        where, params = [], []
        if run_id is not None:
            where.append("a.run_id = ?")
            params.append(run_id)
        if tenant is not None:
            where.append("r.tenant = ?")
            params.append(tenant)
        if status is not None:
            where.append("a.status = ?")
            params.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY a.requested_at, a.run_id, a.idx LIMIT ?"
        rows = await self._fetch(sql, [*params, limit])
        out = []
        for r in rows:
            d = asdict(_approval_from(r))
            d["tenant"] = r["tenant"]
            out.append(d)
        return out

    async def spend(self, tenant: str) -> dict[str, Any]:
        rows = await self._fetch(f"SELECT {', '.join(_SPEND_COLUMNS)} FROM spend "
                                 "WHERE tenant = ?", (tenant,))
        row = SpendRow(*rows[0]) if rows else SpendRow(tenant)
        return asdict(row)

    async def counts(self, tenant: str | None = None) -> dict[str, int]:
        """Runs by status (for the console and ``/metrics``)."""
        sql = "SELECT status, COUNT(*) FROM runs"
        params: list[Any] = []
        if tenant is not None:
            sql += " WHERE tenant = ?"
            params.append(tenant)
        rows = await self._fetch(sql + " GROUP BY status", params)
        return {r[0]: int(r[1]) for r in rows}

    async def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's rows in key order: two models are equal when their dumps are."""
        out = {}
        for table, key in _TABLES.items():
            rows = await self._fetch(f"SELECT * FROM {table} ORDER BY {key}")
            out[table] = [tuple(r) for r in rows]
        return out


def _approval_values(a: ApprovalRow) -> tuple[Any, ...]:
    return tuple(_dumps(a.args) if c == "args" else getattr(a, c) for c in _APPROVAL_COLUMNS)


def _approval_from(row: sqlite3.Row) -> ApprovalRow:
    d = {c: row[c] for c in _APPROVAL_COLUMNS}
    d["args"] = _loads(d["args"])
    return ApprovalRow(**d)


async def _select_in(conn: aiosqlite.Connection, table: str, column: str,
                     columns: Sequence[str], values: Iterable[Any], extra: str = "",
                     ) -> list[sqlite3.Row]:
    values = sorted(values)
    out: list[sqlite3.Row] = []
    conn.row_factory = sqlite3.Row
    for i in range(0, len(values), _CHUNK):
        chunk = values[i:i + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        async with conn.execute(f"SELECT {', '.join(columns)} FROM {table} "
                                f"WHERE {column} IN ({marks}) {extra}", chunk) as cur:
            out.extend(await cur.fetchall())
    return out


async def _select_pairs(conn: aiosqlite.Connection, table: str, key: tuple[str, str],
                        columns: Sequence[str], pairs: Iterable[tuple[Any, Any]],
                        ) -> list[sqlite3.Row]:
    pairs = sorted(pairs)
    out: list[sqlite3.Row] = []
    conn.row_factory = sqlite3.Row
    for i in range(0, len(pairs), _CHUNK // 2):
        chunk = pairs[i:i + _CHUNK // 2]
        marks = ", ".join("(?, ?)" for _ in chunk)
        flat = [v for pair in chunk for v in pair]
        async with conn.execute(f"SELECT {', '.join(columns)} FROM {table} "
                                f"WHERE ({key[0]}, {key[1]}) IN (VALUES {marks})",
                                flat) as cur:
            out.extend(await cur.fetchall())
    return out


__all__ = ["ReadModel", "decode_cursor", "encode_cursor", "run_view"]
