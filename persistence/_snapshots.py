"""``SnapshotStore``: named blobs (workspace snapshots, large payloads) in the object store."""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.js.api import ObjectInfo, ObjectMeta
from nats.js.errors import NotFoundError, ObjectNotFoundError

from bus import Bus
from nerve import HistoryError


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What is known about a stored snapshot without fetching it."""

    name: str
    size: int
    digest: str | None
    tags: dict[str, str] = field(default_factory=dict)


def _info(obj: ObjectInfo) -> SnapshotInfo:
    headers = obj.headers or {}
    tags = {k: (v[0] if isinstance(v, list) else v) for k, v in headers.items()}
    return SnapshotInfo(name=obj.name, size=obj.size or 0, digest=obj.digest, tags=tags)


class SnapshotStore:
    """Put, get, find the latest under a prefix, and prune old snapshots.

    Names sort in the order they were taken when the caller uses
    :meth:`bus.Names.snapshot_name` (zero-padded sequence numbers).
    """

    def __init__(self, bus: Bus, bucket: str | None = None) -> None:
        self.bus = bus
        self.bucket = bucket or bus.names.snapshots_bucket

    async def _store(self):
        return await self.bus.object_store(self.bucket)

    async def put(self, name: str, data: bytes, tags: dict[str, str] | None = None,
                  ) -> SnapshotInfo:
        store = await self._store()
        meta = ObjectMeta(name=name, headers={k: str(v) for k, v in (tags or {}).items()} or None)
        info = await store.put(name, data, meta=meta)
        return _info(info)

    async def get(self, name: str) -> bytes:
        store = await self._store()
        try:
            result = await store.get(name)
        except (ObjectNotFoundError, NotFoundError):
            raise HistoryError(f"snapshot {name} does not exist in {self.bucket}",
                               name=name) from None
        return result.data or b""

    async def info(self, name: str) -> SnapshotInfo | None:
        store = await self._store()
        try:
            return _info(await store.get_info(name))
        except (ObjectNotFoundError, NotFoundError):
            return None

    async def list(self, prefix: str = "") -> list[SnapshotInfo]:
        store = await self._store()
        try:
            objs = await store.list(ignore_deletes=True)
        except NotFoundError:  # an empty store
            return []
        return sorted((_info(o) for o in objs if o.name.startswith(prefix)),
                      key=lambda i: i.name)

    async def latest(self, prefix: str) -> SnapshotInfo | None:
        found = await self.list(prefix)
        return found[-1] if found else None

    async def delete(self, name: str) -> None:
        store = await self._store()
        try:
            await store.delete(name)
        except (ObjectNotFoundError, NotFoundError):
            pass

    async def delete_older(self, prefix: str, keep: int) -> int:
        """Delete all but the newest ``keep`` snapshots under ``prefix``; return how many."""
        found = await self.list(prefix)
        doomed = found[:-keep] if keep > 0 else found
        for info in doomed:
            await self.delete(info.name)
        return len(doomed)
