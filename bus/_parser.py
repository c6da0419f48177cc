"""The NATS wire protocol parser nerve's connections use.

nats-py's parser tries two regular expressions on every incoming message line and awaits a
coroutine per message; reading a long run history spends a third of its time there. This
one splits ``MSG``/``HMSG`` lines by hand, walks the buffer by offset (one compaction per
read, not one per message), and calls raw sinks (see ``Bus.raw_subscribe``) synchronously.
The rare control lines (``INFO``, ``PING``, ``PONG``, ``+OK``, ``-ERR``) go through
nats-py's own expressions and handlers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from nats.errors import ProtocolError
from nats.protocol.parser import (
    AWAITING_CONTROL_LINE,
    AWAITING_MSG_PAYLOAD,
    ERR_RE,
    INFO_RE,
    MAX_CONTROL_LINE_SIZE,
    OK_RE,
    PING_RE,
    PONG_RE,
    Parser,
)

_CRLF = b"\r\n"
_M, _H = ord("M"), ord("H")

# sink(subject, reply, header block or None, payload)
RawSink = Callable[[bytes, bytes, bytes | None, bytes], None]


class WireParser(Parser):
    """A drop-in for ``nats.protocol.parser.Parser`` (same state, same client callbacks).

    ``nc.raw_sinks`` maps subscription ids to plain callbacks that get ``(subject, reply,
    headers, payload)`` of each message without a ``Msg`` object or a coroutine.
    """

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        nc: Any = self.nc
        sinks: dict[int, RawSink] = nc.raw_sinks
        end = len(buf)
        pos = 0
        try:
            while pos < end:
                if self.state == AWAITING_MSG_PAYLOAD:
                    needed = self.needed
                    if end - pos < needed + 2:
                        break
                    hsize = self.header_needed
                    if hsize:
                        headers: bytes | None = bytes(buf[pos:pos + hsize])
                        payload = bytes(buf[pos + hsize:pos + needed])
                        self.header_needed = 0
                    else:
                        headers = None
                        payload = bytes(buf[pos:pos + needed])
                    pos += needed + 2
                    self.state = AWAITING_CONTROL_LINE
                    arg = self.msg_arg
                    sink = sinks.get(arg["sid"])
                    if sink is not None:
                        sink(arg["subject"], arg["reply"], headers, payload)
                    else:
                        await nc._process_msg(arg["sid"], arg["subject"], arg["reply"],
                                              payload, headers)
                        if self.buf is not buf:  # the client reset the parser meanwhile
                            pos = 0
                            return
                    continue
                head = buf[pos]
                if head == _M or head == _H:
                    eol = buf.find(_CRLF, pos)
                    if eol < 0:
                        if end - pos > MAX_CONTROL_LINE_SIZE:
                            raise ProtocolError("nats: control line too long")
                        break
                    self._message_line(bytes(buf[pos:eol]).split(), head == _H)
                    pos = eol + 2
                    continue
                # A rare control line: compact, then let nats-py's expressions have it.
                del buf[:pos]
                end -= pos
                pos = 0
                used = await self._control_line()
                if self.buf is not buf:
                    return
                if used == 0:
                    break
                pos = used
        finally:
            if pos:
                del buf[:pos]

    def _message_line(self, parts: list[bytes], has_headers: bool) -> None:
        # MSG <subject> <sid> [reply-to] <#bytes>
        # HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
        bare = 5 if has_headers else 4  # the length without a reply subject
        if parts[0] != (b"HMSG" if has_headers else b"MSG") or len(parts) not in (bare,
                                                                                  bare + 1):
            raise ProtocolError(f"nats: malformed message line {b' '.join(parts)[:200]!r}")
        try:
            arg = self.msg_arg
            arg["subject"] = parts[1]
            arg["sid"] = int(parts[2])
            arg["reply"] = parts[3] if len(parts) > bare else b""
            self.needed = int(parts[-1])
            self.header_needed = int(parts[-2]) if has_headers else 0
        except ValueError:
            raise ProtocolError(
                f"nats: malformed message line {b' '.join(parts)[:200]!r}") from None
        self.state = AWAITING_MSG_PAYLOAD

    async def _control_line(self) -> int:
        """Handle one non-message line at the start of the buffer; bytes used (0: need more)."""
        buf, nc = self.buf, self.nc
        assert nc is not None
        if m := OK_RE.match(buf):
            return m.end()
        if m := ERR_RE.match(buf):
            await nc._process_err((m.group(1) or b"").decode().lower())
            return m.end()
        if m := PING_RE.match(buf):
            await nc._process_ping()
            return m.end()
        if m := PONG_RE.match(buf):
            await nc._process_pong()
            return m.end()
        if m := INFO_RE.match(buf):
            await nc._process_info(json.loads(m.groups()[0].decode()))
            return m.end()
        if len(buf) < MAX_CONTROL_LINE_SIZE and _CRLF in buf:
            raise ProtocolError("nats: unknown protocol")
        return 0


class RawHeaders:
    """A message's NATS header block, parsed only for the names asked for."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes | None) -> None:
        self.raw = raw or b""

    def get(self, name: str, default: str | None = None) -> str | None:
        key = b"\r\n" + name.encode() + b":"
        i = self.raw.find(key)
        if i < 0:
            return default
        start = i + len(key)
        end = self.raw.find(b"\r\n", start)
        return self.raw[start:end].strip().decode("utf-8", "replace")

    def status(self) -> str | None:
        """The inline status of a control message (``NATS/1.0 404 ...``), if any."""
        line = self.raw[: self.raw.find(b"\r\n")] if self.raw else b""
        parts = line.split(None, 2)
        return parts[1].decode() if len(parts) > 1 else None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value
