"""The in-sandbox agent: runs as the sandbox's first process, inside the isolation boundary.

This file is executed by the sandbox's own ``python3`` (``python3 -I -S agent.py``): it must
import nothing but the standard library, and it is read-only inside the sandbox.

It is *untrusted by the host*: code in the sandbox runs as the same user and can kill it
(which crashes the sandbox; the host restores it). Nothing the host relies on for
isolation is done here: limits, timeouts, OOM detection and teardown are enforced by the
host from outside. The agent makes itself non-dumpable so same-user code cannot read or
write its memory or steal its file descriptors through ``/proc``.

Protocol on fd 0 (requests) and fd 1 (replies): frames of
``u32 header length | u32 body length | header (JSON) | body (bytes)``.

Requests: ``exec`` {id, argv, cwd, env, stdin?} (body = stdin bytes), ``kill`` {id},
``read`` {id, path, limit}, ``write`` {id, path, mode} (body = content), ``list`` {id, path},
``ping`` {id}. Replies carry the request id and an ``ev``: ``started`` {pid}, ``out``
{fd} (body = bytes), ``exit`` {code, signal}, ``ok`` {...}, ``err`` {errno, msg}.
"""

import json
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

WORKSPACE = "/workspace"
PROXY_SOCK = "/run/nerve/proxy.sock"
PROXY_PORT = 3128
_HDR = struct.Struct(">II")
_MAX_HEADER = 1 << 20
_MAX_BODY = 256 << 20

_out_lock = threading.Lock()
_out = None  # the reply stream (fd 1), set in main
_execs = {}  # request id -> Popen
_execs_lock = threading.Lock()


def send(header, body=b""):
    data = json.dumps(header, separators=(",", ":")).encode()
    with _out_lock:
        _out.write(_HDR.pack(len(data), len(body)))
        _out.write(data)
        if body:
            _out.write(body)
        _out.flush()


def read_exact(stream, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _harden():
    # Non-dumpable: /proc/<agent>/mem, fd/ and environ become unreadable to same-user code.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception as exc:  # the sandbox still holds: this only narrows what code sees
        sys.stderr.write(f"agent: could not become non-dumpable: {exc!r}\n")


def _child_setup():
    # Children are more OOM-killable than the agent (the host set ours low), and lead their
    # own session so a timeout kills their whole process group.
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("300")
    except OSError:
        pass


def _resolve(path):
    return path if os.path.isabs(path) else os.path.join(WORKSPACE, path)


def do_exec(req, body):
    rid = req["id"]
    argv = req["argv"]
    env = req.get("env") or {}
    cwd = _resolve(req.get("cwd") or WORKSPACE)
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.PIPE if body else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_child_setup, close_fds=True,
        )
    except OSError as exc:
        send({"id": rid, "ev": "err", "errno": exc.errno or 0, "msg": str(exc)})
        return
    with _execs_lock:
        _execs[rid] = proc
    send({"id": rid, "ev": "started", "pid": proc.pid})
    if body:
        threading.Thread(target=_feed, args=(proc, body), daemon=True).start()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, 1)
    sel.register(proc.stderr, selectors.EVENT_READ, 2)
    open_count = 2
    drain_until = None
    # The command is done when its process exits, not when every copy of its pipes is
    # closed: a daemon it left running (``server &``) keeps them open. After the exit we
    # drain what is already written for a moment, then stop listening.
    while open_count:
        ready = sel.select(timeout=0.05)
        for key, _ in ready:
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_count -= 1
                continue
            send({"id": rid, "ev": "out", "fd": key.data}, chunk)
        if drain_until is None:
            if proc.poll() is not None:
                drain_until = time.monotonic() + 0.1
        elif not ready or time.monotonic() > drain_until:
            break
    sel.close()
    proc.stdout.close()
    proc.stderr.close()
    code = proc.wait()
    with _execs_lock:
        _execs.pop(rid, None)
    send({"id": rid, "ev": "exit", "code": code if code >= 0 else None,
          "signal": -code if code < 0 else None})


def _feed(proc, body):
    try:
        proc.stdin.write(body)
        proc.stdin.close()
    except OSError:
        pass


def do_kill(req):
    with _execs_lock:
        proc = _execs.get(req.get("target"))
    if proc is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    # Then everything else the code started (daemons that left the group included):
    # kill(-1) reaches every process we may signal except ourselves and the namespace's
    # init.
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    send({"id": req["id"], "ev": "ok"})


def do_read(req):
    path = _resolve(req["path"])
    limit = int(req.get("limit") or (64 << 20))
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(21, "not a regular file", path)
        data = fh.read(limit + 1)
    if len(data) > limit:
        send({"id": req["id"], "ev": "err", "errno": 27, "msg": f"{path} is over {limit} bytes"})
        return
    send({"id": req["id"], "ev": "ok", "size": len(data)}, data)


def do_write(req, body):
    path = _resolve(req["path"])
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    mode = int(req.get("mode") or 0o644)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(body)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)
    send({"id": req["id"], "ev": "ok", "size": len(body)})


def do_list(req):
    root = _resolve(req.get("path") or WORKSPACE)
    entries = []
    limit = int(req.get("limit") or 100000)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                    else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
            entries.append({"path": os.path.relpath(full, root), "type": kind,
                            "size": st.st_size, "mode": stat.S_IMODE(st.st_mode)})
            if len(entries) >= limit:
                send({"id": req["id"], "ev": "ok", "entries": entries, "truncated": True})
                return
    send({"id": req["id"], "ev": "ok", "entries": entries, "truncated": False})


def serve(req, body):
    op = req.get("op")
    try:
        if op == "exec":
            do_exec(req, body)
        elif op == "kill":
            do_kill(req)
        elif op == "read":
            do_read(req)
        elif op == "write":
            do_write(req, body)
        elif op == "list":
            do_list(req)
        elif op == "ping":
            send({"id": req["id"], "ev": "ok", "pid": os.getpid()})
        else:
            send({"id": req.get("id"), "ev": "err", "errno": 22, "msg": f"unknown op {op!r}"})
    except OSError as exc:
        send({"id": req.get("id"), "ev": "err", "errno": exc.errno or 0, "msg": str(exc)})
    except Exception as exc:  # a bad request must not take the agent down
        send({"id": req.get("id"), "ev": "err", "errno": 0, "msg": repr(exc)})


def _pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _bridge_conn(conn):
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(PROXY_SOCK)
    except OSError:
        conn.close()
        up.close()
        return
    threading.Thread(target=_pump, args=(conn, up), daemon=True).start()
    _pump(up, conn)
    conn.close()
    up.close()


def bridge():
    """Expose the host's egress proxy (a Unix socket) as 127.0.0.1:3128 in here."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PROXY_PORT))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_bridge_conn, args=(conn,), daemon=True).start()


def main():
    global _out
    _harden()
    _out = os.fdopen(1, "wb", buffering=0)
    stdin = os.fdopen(0, "rb", buffering=0)
    # Code must not inherit our channel: keep it on fds the children never see.
    if os.path.exists(PROXY_SOCK):
        threading.Thread(target=bridge, daemon=True).start()
    send({"id": 0, "ev": "ready", "pid": os.getpid()})
    while True:
        head = read_exact(stdin, _HDR.size)
        if head is None:
            break
        hlen, blen = _HDR.unpack(head)
        if hlen > _MAX_HEADER or blen > _MAX_BODY:
            break
        req = json.loads(read_exact(stdin, hlen) or b"{}")
        body = read_exact(stdin, blen) if blen else b""
        if req.get("op") == "exec":
            threading.Thread(target=serve, args=(req, body), daemon=True).start()
        else:
            serve(req, body)
    # The host closed the channel: the sandbox is being torn down.
    os._exit(0)


if __name__ == "__main__":
    main()
