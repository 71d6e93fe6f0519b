"""`tasker-pg rate-limit set|list|delete` and `tasker-pg lanes`: flow control.

Rate limits are the token buckets template steps name with `rate_limit:`; lanes are the
fairness lanes claims take turns between (a namespace has them while steps with a fairness or
concurrency key are queued or in progress). Each command is one call of the client
(`AsyncTaskerClient`), hence of sql/functions/55_flow.sql; `--json` prints the responses'
`to_dict()`. Exit codes as the rest of the command line: 0 ok, 1 failure or not found, 2 usage
error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from tasker_pg import argtypes
from tasker_pg.client import MAX_PAGE_SIZE, AsyncTaskerClient
from tasker_pg.render import format_table, format_time, truncate
from tasker_pg.responses import RateLimitResponse

Handler = Callable[[argparse.Namespace], int]
Op = Callable[..., argparse.ArgumentParser]

EXIT_OK = 0
EXIT_FAILED = 1
LANE_WIDTH = 60
"""The lane column shows at most this many characters of a key (`--json` has it whole)."""


def _client(args: argparse.Namespace) -> AsyncTaskerClient:
    return AsyncTaskerClient(args.dsn, initiator="tasker-pg cli", source_system="tasker-pg")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _sync(coro_fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> Handler:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(coro_fn(args))

    return run


def _show(limit: RateLimitResponse) -> None:
    print(
        f"rate limit {limit.name}: {limit.per_second:g}/s, burst {limit.burst}, "
        f"{limit.tokens_now:.1f} token(s) now, named by {limit.template_steps} template step(s)"
    )


def _lane_text(lane: str) -> str:
    """A lane key for the table: '' as `(no key)`, control characters escaped, cut."""
    if lane == "":
        return "(no key)"
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in lane)
    return truncate(shown, LANE_WIDTH)


async def _set(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        limit = await client.set_rate_limit(args.name, args.per_second, args.burst)
    if args.json:
        _print_json(limit.to_dict())
    else:
        _show(limit)
    return EXIT_OK


async def _list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        limits = await client.list_rate_limits()
    if args.json:
        _print_json([r.to_dict() for r in limits])
        return EXIT_OK
    if not limits:
        print("no rate limits (tasker-pg rate-limit set NAME PER_SECOND)")
        return EXIT_OK
    header = ("name", "per second", "burst", "tokens now", "template steps", "held until")
    rows = [
        (
            r.name,
            f"{r.per_second:g}",
            str(r.burst),
            f"{r.tokens_now:.1f}",
            str(r.template_steps),
            format_time(r.parked_until),
        )
        for r in limits
    ]
    print(format_table(header, rows))
    return EXIT_OK


async def _delete(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        deleted = await client.delete_rate_limit(args.name)
    if args.json:
        _print_json({"name": args.name, "deleted": deleted})
    else:
        print(f"deleted rate limit {args.name}" if deleted else f"no rate limit {args.name}")
    return EXIT_OK if deleted else EXIT_FAILED


async def _lanes(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        lanes = await client.list_flow_lanes(args.namespace, limit=args.limit)
    if args.json:
        _print_json([lane.to_dict() for lane in lanes])
        return EXIT_OK
    if not lanes:
        where = f"namespace {args.namespace}" if args.namespace else "any namespace"
        print(
            f"no lanes in {where} (a namespace has lanes while steps with a fairness or "
            "concurrency key are queued or in progress)"
        )
        return EXIT_OK
    header = ("queue", "lane", "turn", "limit", "in progress", "visible", "queued")
    rows = [
        (
            x.queue,
            _lane_text(x.lane),
            str(x.vtime),
            "-" if x.concurrency_limit is None else str(x.concurrency_limit),
            str(x.in_progress),
            str(x.visible),
            str(x.queued),
        )
        for x in lanes
    ]
    print(format_table(header, rows))
    if len(lanes) == args.limit:
        print(f"(the first {args.limit} lanes in turn order; --limit shows up to {MAX_PAGE_SIZE})")
    return EXIT_OK


def add_parser(sub: Any, op: Op) -> None:
    """The `rate-limit` command and its actions, and `lanes`; `op` adds a leaf with --dsn
    and --json."""
    rp = sub.add_parser("rate-limit", help="rate limits (token buckets) that steps name")
    rsub = rp.add_subparsers(dest="rate_limit_command", required=True, metavar="ACTION")
    set_ = op(
        rsub,
        "set",
        _sync(_set),
        "create a rate limit, or change one",
        description="Each start of a step whose template names the rate limit "
        "(rate_limit: NAME) takes a token; tokens come back at PER_SECOND, at most BURST "
        "held at once. A new rate limit starts full; a changed one keeps its tokens, up to "
        "the new burst.",
    )
    set_.add_argument(
        "name",
        metavar="NAME",
        help="1 to 128 letters, digits, _, ., : and -, starting with a letter",
    )
    set_.add_argument(
        "per_second",
        type=argtypes.positive_float,
        metavar="PER_SECOND",
        help="tokens a second, > 0 and at most 1000000 (0.5: one every two seconds)",
    )
    set_.add_argument(
        "--burst",
        type=argtypes.positive_int,
        metavar="N",
        help="most tokens held at once, 1..1000000 (default: PER_SECOND rounded up)",
    )
    op(rsub, "list", _sync(_list), "every rate limit with its tokens now")
    op(
        rsub,
        "delete",
        _sync(_delete),
        "delete a rate limit no template step names",
    ).add_argument("name", metavar="NAME")

    lanes = op(
        sub,
        "lanes",
        _sync(_lanes),
        "the fairness lanes claims take turns between, per namespace",
        description="One row per lane (a fairness key's value) of each namespace's queue, "
        "lowest turn first: claims serve the lanes with the lowest turn first and move each "
        "back by what it got. (no key) is the lane of the steps without a key.",
    )
    lanes.add_argument("--namespace", metavar="NS", help="only this namespace")
    lanes.add_argument(
        "--limit",
        type=argtypes.positive_int,
        default=MAX_PAGE_SIZE,
        metavar="N",
        help=f"at most N lanes, 1..{MAX_PAGE_SIZE} (default {MAX_PAGE_SIZE})",
    )
