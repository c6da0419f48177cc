"""``nerve``: the command line. Each subcommand lives in its own module under ``cli/``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from nerve import NerveError, __version__


def _build_parser() -> argparse.ArgumentParser:
    from cli import (
        _api,
        _budget,
        _demo,
        _gateway,
        _logs,
        _reindex,
        _runs,
        _sandbox,
        _up,
        _upstream,
        _worker,
    )

    parser = argparse.ArgumentParser(
        prog="nerve", description="nerve: long-lived LLM agents as durable workflows on NATS.")
    parser.add_argument("--version", action="version", version=f"nerve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo.register(sub)
    _up.register(sub)
    _worker.register(sub)
    _runs.register(sub)
    _budget.register(sub)
    _upstream.register(sub)
    _gateway.register(sub)
    _api.register(sub)
    _logs.register(sub)
    _reindex.register(sub)
    _sandbox.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. A :class:`~nerve.NerveError` is printed as one line, not a traceback."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    # A role process (`nerve worker`, which `nerve up` runs) is a daemon whose output is its
    # log: it says what it does (runs started, takeovers). Commands a person runs stay quiet.
    level = logging.DEBUG if args.verbose else getattr(args, "log_level", logging.WARNING)
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except NerveError as exc:
        print(f"nerve: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`nerve show <run> | head`): stop quietly, as Unix tools do,
        # and keep Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
