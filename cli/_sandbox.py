"""``nerve doctor``, ``nerve sandbox-host`` and ``nerve sandbox-fork``: the hands' commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from actors import run
from cli._target import add_target_args, connect_target


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from sandbox_actor._main import add_arguments

    doctor = sub.add_parser("doctor", help="what sandbox isolation this machine allows")
    doctor.add_argument("--state-dir", type=Path, default=Path("/var/lib/nerve/sandbox"))
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.add_argument("--try", dest="try_it", action="store_true",
                        help="also start a real sandbox with the chosen backend")
    doctor.set_defaults(func=lambda a: run(_doctor(a)))

    host = sub.add_parser("sandbox-host", help="run a sandbox host (and optionally placement)")
    add_arguments(host)
    host.set_defaults(func=_host)

    fork = sub.add_parser("sandbox-fork",
                          help="the sandbox side of `nerve fork`: find the snapshot at a step")
    fork.add_argument("sandbox", help="the source sandbox (a run id by default)")
    fork.add_argument("--at", type=int, required=True, help="history index to fork at")
    fork.add_argument("--new", required=True, help="the new sandbox id (the new run's id)")
    add_target_args(fork)
    fork.add_argument("--start", action="store_true",
                      help="also create the new sandbox's assignment now")
    fork.set_defaults(func=lambda a: run(_fork(a)))


def _host(args: argparse.Namespace) -> int:
    from sandbox_actor._main import serve

    return int(run(serve(args)) or 0)


async def _doctor(args: argparse.Namespace) -> int:
    from sandbox_actor import BackendConfig, choose, probe_all
    from sandbox_actor._cgroups import detect
    from sandbox_actor._seccomp import denied

    config = BackendConfig(state_dir=args.state_dir)
    probes = probe_all(config)
    report: dict[str, object] = {
        "cgroup": detect() or "unusable",
        "kvm": await asyncio.to_thread(os.path.exists, "/dev/kvm"),
        "backends": {p.backend: {"available": p.available, "details": p.details,
                                 "problems": p.problems,
                                 "isolation": p.capabilities.isolation.name
                                 if p.capabilities else None,
                                 "memory_snapshots": p.capabilities.memory_snapshots
                                 if p.capabilities else None} for p in probes},
        "seccomp_denied": denied(),
    }
    chosen = None
    try:
        chosen = choose(config).name
    except Exception as exc:  # reported, not raised: this command diagnoses
        report["error"] = str(exc)
    report["chosen"] = chosen
    if args.try_it and chosen:
        report["trial"] = await _trial(config, chosen)
    if args.json:
        print(json.dumps(report))
        return 0 if chosen else 1
    print(f"cgroups: {report['cgroup']}    /dev/kvm: "
          f"{'present' if report['kvm'] else 'absent'} (no microVM backend is built here)")
    for p in probes:
        mark = "ok " if p.available else "no "
        iso = p.capabilities.isolation.name.lower() if p.capabilities else "-"
        print(f"  [{mark}] {p.backend:<7} isolation={iso:<12} "
              + ", ".join(f"{k}={v}" for k, v in p.details.items()))
        for problem in p.problems:
            print(f"          - {problem}")
    print(f"seccomp denies {len(report['seccomp_denied'])} syscalls "  # type: ignore[arg-type]
          "(ptrace, mount, bpf, keyctl, kexec, module loading, ...)")
    print(f"chosen backend: {chosen or 'none'}")
    if "trial" in report:
        print(f"trial: {report['trial']}")
    return 0 if chosen else 1


async def _trial(config, backend_name: str) -> str:
    import tempfile

    from sandbox_actor import SandboxSpec, choose

    config.state_dir = Path(tempfile.mkdtemp(prefix="nerve-doctor-", dir="/tmp"))
    os.chmod(config.state_dir, 0o711)
    backend = choose(config, backend_name)
    try:
        sb = await backend.create(SandboxSpec(sandbox_id="doctor"))
        result = await sb.exec(["/bin/sh", "-c", "id -u; cat /proc/self/status | grep Seccomp"])
        await backend.destroy(sb)
        return f"ran as uid {result.stdout.split()[0]} in a {backend_name} sandbox " \
               f"({' '.join(result.stdout.split()[1:])})"
    finally:
        await backend.stop()
        await asyncio.to_thread(__import__("shutil").rmtree, config.state_dir, True)


async def _fork(args: argparse.Namespace) -> int:
    from sandbox_actor._fork import plan_fork, start_fork

    bus = await connect_target(args, name="nerve-sandbox-fork")
    try:
        plan = await plan_fork(bus, source_sandbox_id=args.sandbox, at=args.at,
                               new_sandbox_id=args.new)
        if args.start:
            await start_fork(bus, plan, run_id=args.new)
        print(json.dumps({"snapshot": plan.snapshot, "step_index": plan.step_index,
                          "new_sandbox_id": plan.new_sandbox_id,
                          "meta": {"sandbox": plan.meta}}))
    finally:
        await bus.close()
    return 0
