"""`tasker-pg rate-limit set|list|delete` and `tasker-pg lanes`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasker_pg import AsyncTaskerClient, db
from tests.cli.test_cli import cli, script
from tests.support.engine import assert_healthy, claim, complete, success

pytestmark = pytest.mark.timeout(120)

LANES_NAMESPACE = "tenants"
FAIR_YAML = """\
name: per_customer
namespace_name: tenants
version: 1.0.0
fairness: {key: "$.customer"}
steps:
  - name: export
    handler: {callable: handlers.export}
    rate_limit: exports
"""


async def test_set_list_change_and_delete_a_rate_limit(dsn: str, conn: db.Connection) -> None:
    made = cli(dsn, "rate-limit", "set", "stripe.api", "2.5")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == (
        "rate limit stripe.api: 2.5/s, burst 3, 3.0 token(s) now, named by 0 template step(s)"
    )
    changed = cli(dsn, "rate-limit", "set", "stripe.api", "100", "--burst", "20", "--json")
    assert changed.returncode == 0, changed.stderr
    body = json.loads(changed.stdout)
    assert {k: body[k] for k in ("name", "per_second", "burst", "parked_until")} == {
        "name": "stripe.api",
        "per_second": 100.0,
        "burst": 20,
        "parked_until": None,
    }
    assert 3.0 <= body["tokens_now"] <= 20.0  # kept, refilled at the old rate, capped

    assert cli(dsn, "rate-limit", "set", "mail", "0.5").returncode == 0
    listed = cli(dsn, "rate-limit", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == "name        per second  burst  tokens now  template steps  held until"
    assert [line.split()[:3] for line in lines[2:]] == [
        ["mail", "0.5", "1"],
        ["stripe.api", "100", "20"],
    ]
    assert lines[2].split()[3:] == ["1.0", "0", "-"]
    as_json = json.loads(cli(dsn, "rate-limit", "list", "--json").stdout)
    assert [r["name"] for r in as_json] == ["mail", "stripe.api"]

    gone = cli(dsn, "rate-limit", "delete", "mail")
    assert (gone.returncode, gone.stdout.strip()) == (0, "deleted rate limit mail")
    again = cli(dsn, "rate-limit", "delete", "mail", "--json")
    assert (again.returncode, json.loads(again.stdout)) == (1, {"name": "mail", "deleted": False})
    assert await conn.fetchval("SELECT array_agg(name) FROM tasker.rate_limits") == ["stripe.api"]
    assert cli(dsn, "rate-limit", "delete", "stripe.api").returncode == 0
    empty = cli(dsn, "rate-limit", "list")
    assert (empty.returncode, empty.stdout.strip()) == (
        0,
        "no rate limits (tasker-pg rate-limit set NAME PER_SECOND)",
    )


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("set", "ok", "0"), 2, "must be > 0, got 0"),
        (("set", "ok", "nan"), 2, "expected a finite number"),
        (("set", "ok", "fast"), 2, "expected a number"),
        (
            ("set", "ok", "1000001"),
            2,
            "error [invalid_argument]: per_second must be a number > 0 and at most 1000000",
        ),
        (("set", "ok", "1", "--burst", "0"), 2, "must be > 0, got 0"),
        (
            ("set", "ok", "1", "--burst", "1000001"),
            2,
            "error [invalid_argument]: burst must be an integer from 1 to 1000000, got 1000001",
        ),
        (("set", "9lives", "1"), 2, "error [invalid_argument]: rate limit name must be"),
        (("set", "ok"), 2, "the following arguments are required: PER_SECOND"),
        (("delete", "-"), 2, "error [invalid_argument]: rate limit name must be"),
        (("delete", "has space"), 2, "error [invalid_argument]: rate limit name must be"),
    ],
)
async def test_bad_input_is_refused(
    dsn: str, conn: db.Connection, args: tuple[str, ...], code: int, needle: str
) -> None:
    result = cli(dsn, "rate-limit", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert await conn.fetchval("SELECT count(*) FROM tasker.rate_limits") == 0


async def test_lanes_of_keyed_tasks_and_a_rate_limit_in_use(
    dsn: str, conn: db.Connection, tmp_path: Path
) -> None:
    assert cli(dsn, "rate-limit", "set", "exports", "1000").returncode == 0
    path = tmp_path / "per_customer.yaml"
    path.write_text(FAIR_YAML)
    registered = cli(dsn, "template", "register", str(path))
    assert registered.returncode == 0, registered.stderr
    none = cli(dsn, "lanes")
    assert (none.returncode, none.stdout.strip()) == (
        0,
        "no lanes in any namespace (a namespace has lanes while steps with a fairness or "
        "concurrency key are queued or in progress)",
    )

    async with AsyncTaskerClient(dsn) as client:
        await client.create_tasks(
            "per_customer",
            namespace=LANES_NAMESPACE,
            contexts=[{"customer": "acme"}] * 3 + [{"customer": "tiny\tco"}],
        )
    listed = cli(dsn, "lanes", "--namespace", LANES_NAMESPACE)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "queue    lane      turn  limit  in progress  visible  queued",
        "-------  --------  ----  -----  -----------  -------  ------",
        "tenants  (no key)  0     -      0            0        0",
        "tenants  acme      0     -      0            3        3",
        "tenants  tiny\\tco  0     -      0            1        1",
    ]
    as_json = json.loads(cli(dsn, "lanes", "--json").stdout)
    assert as_json[2] == {
        "queue": LANES_NAMESPACE,
        "lane": "tiny\tco",
        "vtime": 0,
        "concurrency_limit": None,
        "in_progress": 0,
        "visible": 1,
        "queued": 1,
    }
    first = cli(dsn, "lanes", "--limit", "1")
    assert first.stdout.splitlines()[-1] == (
        "(the first 1 lanes in turn order; --limit shows up to 1000)"
    )
    elsewhere = cli(dsn, "lanes", "--namespace", "elsewhere", "--json")
    assert (elsewhere.returncode, json.loads(elsewhere.stdout)) == (0, [])
    too_many = cli(dsn, "lanes", "--limit", "1001")
    assert too_many.returncode == 2
    assert "error [invalid_argument]: limit must be an integer from 1 to 1000" in too_many.stderr

    # a claim takes turns: one step of each lane first
    rows = await claim(conn, LANES_NAMESPACE, qty=2)
    assert sorted(r["task_context"]["customer"] for r in rows) == ["acme", "tiny\tco"]
    turns = json.loads(cli(dsn, "lanes", "--json").stdout)
    assert [(x["lane"], x["vtime"], x["in_progress"], x["visible"]) for x in turns] == [
        ("", 1, 0, 0),
        ("acme", 1, 0, 2),
        ("tiny\tco", 1, 0, 0),
    ]

    in_use = cli(dsn, "rate-limit", "delete", "exports")
    assert in_use.returncode == 1
    assert in_use.stderr.startswith(
        "error [rate_limit_in_use]: rate limit 'exports' is used by template "
        "tenants/per_customer 1.0.0, step export"
    )
    assert "template steps" in cli(dsn, "rate-limit", "list").stdout

    await complete(conn, *(success(r) for r in rows))
    while rows := await claim(conn, LANES_NAMESPACE, qty=100):
        await complete(conn, *(success(r) for r in rows))
    await assert_healthy(conn)
    assert json.loads(cli(dsn, "lanes", "--json").stdout) == []


async def test_console_script(dsn: str, conn: db.Connection) -> None:
    for args in (("rate-limit", "list", "--json"), ("lanes", "--json")):
        result = script(dsn, *args)
        assert (result.returncode, json.loads(result.stdout)) == (0, []), result.stderr
