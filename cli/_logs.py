"""``nerve logs [-f] RUN``: a run's live events through the HTTP API's SSE stream.

Tokens print as text; every other event as ``[type] {...}``. With ``-f`` it follows the
run until it ends, and when the connection drops (the API restarts, say) it reconnects with
the last event id it printed, so nothing is printed twice or skipped.
"""

from __future__ import annotations

import argparse
import json
import sys

from actors import run
from cli._api import add_api_args, api_reachable, api_target
from cli._target import add_target_args
from nerve import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("logs", help="a run's live events (tokens, tool calls, status)")
    p.add_argument("run_id")
    p.add_argument("-f", "--follow", action="store_true",
                   help="follow until the run ends, resuming after disconnects")
    p.add_argument("--after", type=int, default=0, help="start after this event id")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    add_api_args(p)
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_logs(a)))


async def _logs(args: argparse.Namespace) -> int:
    from api import ApiClient  # here: other commands should not pay for the API

    target = api_target(args)
    assert target is not None
    # Checked once up front: a follow reconnects for ever, which suits an API restarting, not
    # one that is not there at all.
    if not await api_reachable(target[0]):
        raise ConfigError(f"the HTTP API at {target[0]} does not answer: is `nerve up` (or a "
                          "`nerve worker --role api`) running there? Pass --api-url if it "
                          "moved")
    status = None
    in_text = False
    printed: dict[int, int] = {}  # characters of each step's text already printed
    async with ApiClient(*target) as client:
        async for ev in client.follow(args.run_id, after=args.after, follow=args.follow):
            body = ev.json() if ev.data else {}
            if args.json:
                print(json.dumps({"id": ev.id, "event": ev.event, "data": body}), flush=True)
            elif ev.event == "token":
                data = body["data"]
                index, offset, text = data.get("index", 0), data.get("offset", 0), \
                    data.get("text", "")
                if offset < printed.get(index, 0):
                    # The gateway corrected what it had sent (a retried call said something
                    # else from here on): say so rather than print a spliced sentence.
                    sys.stdout.write(f"\n[step {index} from character {offset}] ")
                sys.stdout.write(text)
                printed[index] = offset + len(text)
                sys.stdout.flush()
                in_text = True
            elif ev.event != "end":
                if in_text:
                    sys.stdout.write("\n")
                    in_text = False
                print(f"[{ev.event}] {json.dumps(body.get('data', body), default=str)[:500]}",
                      flush=True)
            if ev.event == "end":
                status = body.get("status")
    if in_text and not args.json:
        sys.stdout.write("\n")
    return 0 if status in (None, "completed") or not args.follow else 1


__all__ = ["register"]
