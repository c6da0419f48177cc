"""Workspace snapshots in the ``nerve-snapshots`` object store: chunks plus a manifest.

A snapshot is a **manifest** (``sandbox.<sandbox_id>.<seq>``, via
:class:`persistence.SnapshotStore`) listing every workspace entry with the content digests
of its data, plus **chunks** (``chunk.<blake2b-256>``), each file cut at 4 MiB and zstd
compressed. Chunks are content-addressed and shared by every snapshot of every sandbox, so
a snapshot uploads only what changed since any earlier one (plus its manifest): the cost
follows the size of the change, not of the workspace. gVisor checkpoint images are stored
the same way, as chunks of the image file.

``seq`` numbers are ``generation * 1_000_000 + n``: a new owner (after a host failure)
starts a higher generation, so a fenced-off old owner can never overwrite its snapshots.

The manifest of a snapshot taken after a step records that step's key, index and result:
a redelivered step that finds its own key on the restored snapshot answers with the
recorded result instead of running twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack
import zstandard

from bus import Bus, Names
from nerve import SandboxError
from persistence import SnapshotStore
from sandbox_actor._types import SnapshotRef

CHUNK_SIZE = 4 << 20
MANIFEST_VERSION = 1
GENERATION_STRIDE = 1_000_000
_ZSTD_LEVEL = 3


def chunk_name(digest: str) -> str:
    return Names.snapshot_chunk(digest)


def digest_of(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


@dataclass(slots=True)
class Manifest:
    """What one snapshot holds. ``entries`` rows: ``[path, kind, mode, size, mtime_ns,
    digests-or-symlink-target]``."""

    sandbox_id: str
    seq: int
    kind: Literal["files", "gvisor"] = "files"
    parent: str | None = None
    step_index: int | None = None
    step_key: str | None = None
    result: Any = None
    created_at: float = field(default_factory=time.time)
    entries: list[list[Any]] = field(default_factory=list)
    image: list[str] = field(default_factory=list)  # gvisor: checkpoint image chunks
    image_size: int = 0
    spec: dict[str, Any] = field(default_factory=dict)
    host: str = ""

    @property
    def name(self) -> str:
        return Names.snapshot_name(self.sandbox_id, self.seq)

    @property
    def total_size(self) -> int:
        return self.image_size if self.kind == "gvisor" else sum(
            e[3] for e in self.entries if e[1] == "file")

    def encode(self) -> bytes:
        doc = {"v": MANIFEST_VERSION, "sandbox_id": self.sandbox_id, "seq": self.seq,
               "kind": self.kind, "parent": self.parent, "step_index": self.step_index,
               "step_key": self.step_key, "result": self.result,
               "created_at": self.created_at, "entries": self.entries, "image": self.image,
               "image_size": self.image_size, "spec": self.spec, "host": self.host}
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(
            msgpack.packb(doc, use_bin_type=True))

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(raw), raw=False)
        if doc.get("v") != MANIFEST_VERSION:
            raise SandboxError(f"snapshot manifest version {doc.get('v')} is not supported",
                               version=doc.get("v"))
        return cls(sandbox_id=doc["sandbox_id"], seq=doc["seq"], kind=doc["kind"],
                   parent=doc.get("parent"), step_index=doc.get("step_index"),
                   step_key=doc.get("step_key"), result=doc.get("result"),
                   created_at=doc.get("created_at", 0.0), entries=doc.get("entries") or [],
                   image=doc.get("image") or [], image_size=doc.get("image_size", 0),
                   spec=doc.get("spec") or {}, host=doc.get("host", ""))

    def ref(self, uploaded: int = 0) -> SnapshotRef:
        return SnapshotRef(name=self.name, sandbox_id=self.sandbox_id, seq=self.seq,
                           kind=self.kind, step_index=self.step_index, step_key=self.step_key,
                           size=uploaded, total=self.total_size)


def parse_name(name: str) -> tuple[str, int]:
    """(sandbox_id, seq) from ``sandbox.<id>.<seq>``."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "sandbox" or not parts[2].isdigit():
        raise SandboxError(f"{name!r} is not a snapshot name (sandbox.<id>.<seq>)", name=name)
    return parts[1], int(parts[2])


class WorkspaceStore:
    """Chunks and manifests over :class:`persistence.SnapshotStore`, with a local cache.

    ``cache_dir`` keeps fetched chunks (decompressed) on this host, so forking the same
    snapshot twice downloads it once. Chunks known to exist are remembered, so an
    unchanged file costs no round trip.
    """

    def __init__(self, bus: Bus, cache_dir: Path | None = None) -> None:
        self.bus = bus
        self.blobs = SnapshotStore(bus)
        self.cache_dir = cache_dir
        self._known: set[str] = set()
        self._lock = asyncio.Lock()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    # -- chunks ---------------------------------------------------------------------------
    async def put_chunk(self, data: bytes, digest: str | None = None) -> tuple[str, int]:
        """Store ``data`` unless it is already there; return (digest, bytes uploaded)."""
        digest = digest or digest_of(data)
        if digest in self._known:
            return digest, 0
        name = chunk_name(digest)
        if await self.blobs.info(name) is not None:
            self._known.add(digest)
            return digest, 0
        packed = await asyncio.to_thread(_compress, data)
        await self.blobs.put(name, packed)
        self._known.add(digest)
        self._cache_put(digest, data)
        return digest, len(packed)

    async def get_chunk(self, digest: str) -> bytes:
        cached = self._cache_get(digest)
        if cached is not None:
            return cached
        packed = await self.blobs.get(chunk_name(digest))
        data = await asyncio.to_thread(_decompress, packed)
        if digest_of(data) != digest:
            raise SandboxError(f"snapshot chunk {digest} is corrupt (digest mismatch)",
                               digest=digest)
        self._known.add(digest)
        self._cache_put(digest, data)
        return data

    async def get_chunks(self, digests: list[str]) -> list[bytes]:
        # A few at a time: the object store round trip dominates for small chunks.
        sem = asyncio.Semaphore(8)

        async def one(d: str) -> bytes:
            async with sem:
                return await self.get_chunk(d)

        return list(await asyncio.gather(*(one(d) for d in digests)))

    def _cache_path(self, digest: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / digest[:2] / digest

    def _cache_get(self, digest: str) -> bytes | None:
        path = self._cache_path(digest)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError:
            return None

    def _cache_put(self, digest: str, data: bytes) -> None:
        path = self._cache_path(digest)
        if path is None or path.exists():
            return
        with contextlib.suppress(OSError):
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

    # -- manifests ------------------------------------------------------------------------
    async def put_manifest(self, manifest: Manifest) -> int:
        raw = manifest.encode()
        tags = {"sandbox_id": manifest.sandbox_id, "seq": str(manifest.seq),
                "kind": manifest.kind}
        if manifest.step_index is not None:
            tags["step_index"] = str(manifest.step_index)
        if manifest.step_key is not None:
            tags["step_key"] = manifest.step_key
        await self.blobs.put(manifest.name, raw, tags=tags)
        return len(raw)

    async def get_manifest(self, name: str) -> Manifest:
        return Manifest.decode(await self.blobs.get(name))

    async def list(self, sandbox_id: str) -> list[SnapshotRef]:
        """Every snapshot of a sandbox, oldest first (from the object store's metadata)."""
        refs = []
        for info in await self.blobs.list(f"sandbox.{sandbox_id}."):
            _sid, seq = parse_name(info.name)
            step = info.tags.get("step_index")
            refs.append(SnapshotRef(
                name=info.name, sandbox_id=sandbox_id, seq=seq,
                kind="gvisor" if info.tags.get("kind") == "gvisor" else "files",
                step_index=int(step) if step is not None else None,
                step_key=info.tags.get("step_key"), size=info.size))
        return refs

    async def latest(self, sandbox_id: str) -> SnapshotRef | None:
        refs = await self.list(sandbox_id)
        return refs[-1] if refs else None

    async def at_step(self, sandbox_id: str, index: int) -> SnapshotRef | None:
        """The newest snapshot taken after a step whose index is ``<= index``."""
        found = None
        for ref in await self.list(sandbox_id):
            if ref.step_index is not None and ref.step_index <= index:
                if found is None or (ref.step_index, ref.seq) >= (found.step_index or -1,
                                                                    found.seq):
                    found = ref
        return found


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)


def _decompress(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data)
