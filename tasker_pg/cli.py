"""The `tasker-pg` command line: embedded database, migrations, queues, demo.

Exit codes scripts can rely on: 0 ok, 1 failure or not found, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from tasker_pg import db, migrations, worker_cli
from tasker_pg.embedded import EmbeddedCluster
from tasker_pg.errors import NotFoundError, TaskerError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# --- db ------------------------------------------------------------------------------------------


def cmd_db_start(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    started = time.monotonic()
    was_running = cluster.status().running
    dsn = cluster.start()
    if was_running:
        print(f"already running: {dsn}")
    else:
        print(f"started in {time.monotonic() - started:.2f}s: {dsn}")
    return EXIT_OK


def cmd_db_stop(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    print("stopped" if cluster.stop() else "not running")
    return EXIT_OK


def cmd_db_status(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    st = cluster.status()
    info = {
        "home": str(cluster.home),
        "data_dir": str(st.data_dir),
        "initialized": st.initialized,
        "running": st.running,
        "pid": st.pid,
        "port": st.port,
        "bin_dir": str(st.bin_dir) if st.bin_dir else None,
        "dsn": cluster.dsn() if st.port else None,
    }
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:12} {value}")
    return EXIT_OK if st.running else EXIT_FAILED


def cmd_db_url(args: argparse.Namespace) -> int:
    print(EmbeddedCluster().dsn())
    return EXIT_OK


def cmd_db_destroy(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    cluster.destroy()
    print(f"destroyed {cluster.home}")
    return EXIT_OK


# --- migrate -------------------------------------------------------------------------------------


async def _migrate(args: argparse.Namespace) -> int:
    conn = await db.connect(args.dsn, check_schema=False)
    try:
        report = await migrations.migrate(conn)
    finally:
        await conn.close()
    for m in report.applied:
        print(f"applied {m.filename}")
    print(
        f"schema at version {report.current_version}" + ("" if report.applied else " (no change)")
    )
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    return _run(_migrate(args))


# --- queue ---------------------------------------------------------------------------------------


async def _queue_list(args: argparse.Namespace) -> int:
    conn = await db.connect(args.dsn)
    try:
        metrics = await conn.metrics_all()
    finally:
        await conn.close()
    if args.json:
        _print_json([m.__dict__ for m in metrics])
        return EXIT_OK
    print(_queue_table(metrics))
    return EXIT_OK


def _queue_table(metrics: Sequence[db.QueueMetrics]) -> str:
    header = ("queue", "length", "visible", "oldest_s", "newest_s", "total_sent")
    rows = [
        (
            m.queue_name,
            str(m.queue_length),
            str(m.queue_visible_length),
            f"{m.oldest_msg_age_sec:.1f}" if m.oldest_msg_age_sec is not None else "-",
            f"{m.newest_msg_age_sec:.1f}" if m.newest_msg_age_sec is not None else "-",
            str(m.total_messages),
        )
        for m in metrics
    ]
    return format_table(header, rows) if rows else "no queues"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_queue_list(args: argparse.Namespace) -> int:
    return _run(_queue_list(args))


# --- demo / bench --------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster()
    print("starting the embedded PostgreSQL ...")
    dsn = cluster.start()
    print(f"  {dsn}")
    conn = await db.connect(dsn, check_schema=False)
    try:
        report = await migrations.migrate(conn)
        print(f"schema at version {report.current_version}")
        await conn.create_queue("demo")
        msg_id = await conn.send("demo", {"hello": "world", "sent_at": time.time()})
        print(f"sent message {msg_id} to queue 'demo'")
        messages = await conn.read("demo", vt_seconds=30, qty=1)
        for m in messages:
            print(f"read message {m.msg_id} (read_ct {m.read_ct}): {json.dumps(m.message)}")
            await conn.archive("demo", m.msg_id)
            print(f"archived message {m.msg_id}")
        print()
        print(_queue_table(await conn.metrics_all()))
    finally:
        await conn.close()
    print()
    print("next: psql \"$(tasker-pg db url)\" -c 'select * from tasker.metrics_all()'")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    return _run(_demo(args))


def cmd_bench(args: argparse.Namespace) -> int:
    print("tasker-pg bench: not yet (arrives with the benchmark issue)")
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasker-pg", description="A Postgres-native workflow engine."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_dsn(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--dsn",
            help="database URL (default: TASKER_DATABASE_URL, DATABASE_URL, embedded cluster)",
        )
        return p

    dbp = sub.add_parser("db", help="the embedded PostgreSQL (data in ./.tasker-pg)")
    dbsub = dbp.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbsub.add_parser("start", help="initialise if needed and start").set_defaults(func=cmd_db_start)
    dbsub.add_parser("stop", help="stop the server").set_defaults(func=cmd_db_stop)
    status = dbsub.add_parser("status", help="show state; exit 1 when not running")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_db_status)
    dbsub.add_parser("url", help="print the connection URL").set_defaults(func=cmd_db_url)
    dbsub.add_parser("destroy", help="stop and delete all data").set_defaults(func=cmd_db_destroy)

    with_dsn(sub.add_parser("migrate", help="apply pending schema migrations")).set_defaults(
        func=cmd_migrate
    )

    qp = sub.add_parser("queue", help="queues")
    qsub = qp.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    ql = with_dsn(qsub.add_parser("list", help="metrics of every queue"))
    ql.add_argument("--json", action="store_true")
    ql.set_defaults(func=cmd_queue_list)

    worker_cli.add_parser(sub)

    sub.add_parser("demo", help="run the demo on the embedded database").set_defaults(func=cmd_demo)
    sub.add_parser("bench", help="benchmarks (not yet)").set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args))
    except NotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except TaskerError as exc:
        print(f"error [{exc.error_code}]: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
