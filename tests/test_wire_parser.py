"""nerve's NATS wire parser against nats-py's own, on any protocol stream cut anywhere."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from bus._parser import WireParser

RAW_SID = 7  # a raw subscription in the nerve parser, a plain one in the reference


class Recorder:
    """Stands in for the client: records every callback a parser makes."""

    def __init__(self, raw: bool) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.raw_sinks = {RAW_SID: self._sink} if raw else {}

    def _sink(self, subject: bytes, reply: bytes, headers: bytes | None, payload: bytes,
              ) -> None:
        self.seen.append(("msg", RAW_SID, subject, reply, payload, headers))

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        self.seen.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))


tokens = st.text(alphabet="abcXYZ09._-$>*", min_size=1, max_size=12)
payloads = st.binary(max_size=64) | st.sampled_from([b"", b"\r\n", b"MSG a 1 2\r\n", b"PING\r\n"])


@st.composite
def operations(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["MSG", "HMSG", "PING", "PONG", "+OK", "INFO", "-ERR"]))
    if kind in ("MSG", "HMSG"):
        subject = draw(tokens).encode()
        sid = draw(st.sampled_from([1, 2, RAW_SID, 123456]))
        reply = draw(st.none() | tokens)
        args = [kind.encode(), subject, str(sid).encode()] + ([reply.encode()] if reply else [])
        payload = draw(payloads)
        if kind == "MSG":
            return b" ".join([*args, str(len(payload)).encode()]) + b"\r\n" + payload + b"\r\n"
        header = b"NATS/1.0" + draw(st.sampled_from([b"", b" 404 No Messages"])) + b"\r\n"
        for name, value in draw(st.lists(st.tuples(tokens, tokens), max_size=3)):
            header += f"{name}: {value}\r\n".encode()
        header += b"\r\n"
        sizes = [str(len(header)).encode(), str(len(header) + len(payload)).encode()]
        return b" ".join([*args, *sizes]) + b"\r\n" + header + payload + b"\r\n"
    if kind == "INFO":
        return b"INFO " + json.dumps({"server_id": draw(tokens), "max_payload": 1024}).encode() \
            + b"\r\n"
    if kind == "-ERR":
        return b"-ERR 'Permissions Violation for Subscription'\r\n"
    return kind.encode() + b"\r\n"


async def feed(parser: Parser, wire: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        await parser.parse(wire[last:cut])
        last = cut


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(operations(), min_size=1, max_size=12), data=st.data())
async def test_every_callback_matches_nats_py_wherever_the_stream_is_cut(ops: list[bytes],
                                                                         data: st.DataObject,
                                                                         ) -> None:
    wire = b"".join(ops)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    reference, ours = Recorder(raw=False), Recorder(raw=True)
    await feed(Parser(reference), wire, cuts)
    await feed(WireParser(ours), wire, cuts)
    assert ours.seen == reference.seen
    assert len(ours.seen) == sum(not op.startswith(b"+OK") for op in ops)  # +OK: no callback


@pytest.mark.parametrize("line", [b"MSG a\r\n", b"MSG a b 3\r\nabc\r\n", b"HMSG a 1 x\r\n",
                                  b"MSG a 1 r q 3\r\nabc\r\n", b"BOGUS\r\n"])
async def test_a_malformed_line_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        await WireParser(Recorder(raw=True)).parse(line)


async def test_a_control_line_split_mid_way_waits_for_the_rest() -> None:
    rec = Recorder(raw=True)
    parser = WireParser(rec)
    await parser.parse(b"MSG a.b 1 1")
    await parser.parse(b"1\r\nhello world")
    assert rec.seen == []
    await parser.parse(b"\r\nPI")
    await parser.parse(b"NG\r\n")
    assert rec.seen == [("msg", 1, b"a.b", b"", b"hello world", None), ("ping",)]
