"""The `traceparent` task option: validated at creation, stored with the task, and handed to every
step by claim_steps (the worker's step spans are children of it)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import DatabaseError, ValidationError
from tests.support.engine import NAMESPACE, assert_healthy, diamond, drive, start, task_row

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

BAD = [
    "",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # an unknown version
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # uppercase
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    TRACEPARENT + "\n",
    "x" * 100_000,
    12,
    ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
]


@pytest.mark.parametrize("fn", ["create_task", "create_or_get_task", "create_tasks"])
@pytest.mark.parametrize("value", BAD, ids=lambda v: json.dumps(v)[:40])
async def test_a_bad_traceparent_is_refused_with_a_clear_error(
    conn: db.Connection, fn: str, value: Any
) -> None:
    await conn.register_template(diamond())
    context = "'[{}]'" if fn == "create_tasks" else "'{}'"
    sql = f"SELECT * FROM tasker.{fn}($1, 'diamond', {context}::jsonb, NULL, $2::text::jsonb)"
    with pytest.raises(
        ValidationError, match="option traceparent must be a W3C trace context"
    ) as err:
        await conn.fetch(sql, NAMESPACE, json.dumps({"traceparent": value}))
    assert err.value.sqlstate == "TV022"
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0


async def test_the_traceparent_is_stored_and_handed_to_every_step(conn: db.Connection) -> None:
    task = await start(conn, diamond(), traceparent=TRACEPARENT)
    other = await start(conn, diamond())  # without one
    row = await task_row(conn, task)
    assert row["traceparent"] == TRACEPARENT
    assert (await task_row(conn, other))["traceparent"] is None
    seen: dict[tuple[str, str], str | None] = {}

    def handler(row: db.Row) -> dict[str, Any]:
        seen[(str(row["task_uuid"]), row["step_name"])] = row["traceparent"]
        return {}

    await drive(conn, NAMESPACE, handler)
    names = ("start", "b", "c", "end")
    assert {k: v for k, v in seen.items() if k[0] == str(task)} == {
        (str(task), n): TRACEPARENT for n in names
    }
    assert {k: v for k, v in seen.items() if k[0] == str(other)} == {
        (str(other), n): None for n in names
    }
    await assert_healthy(conn)


async def test_per_task_traceparents_of_create_tasks(conn: db.Connection) -> None:
    await conn.register_template(diamond())
    second = TRACEPARENT.replace("00f067aa0ba902b7", "1111111111111111")
    uuids = await conn.create_tasks(
        NAMESPACE,
        "diamond",
        [{}, {}, {}],
        options=[{"traceparent": TRACEPARENT}, {"traceparent": second}, {}],
    )
    assert [(await task_row(conn, t))["traceparent"] for t in uuids] == [
        TRACEPARENT,
        second,
        None,
    ]
    # the typed claim (what the worker reads) carries it too
    claimed = {s.task_uuid: s.traceparent for s in await conn.claim_steps(NAMESPACE, "w1", 10, 30)}
    assert claimed == {str(uuids[0]): TRACEPARENT, str(uuids[1]): second, str(uuids[2]): None}


async def test_the_column_refuses_a_malformed_value_written_directly(conn: db.Connection) -> None:
    task = await start(conn, diamond())
    with pytest.raises(DatabaseError, match="tasks_traceparent_format") as err:
        await conn.execute(
            "UPDATE tasker.tasks SET traceparent = 'not a trace' WHERE task_uuid = $1", task
        )
    assert err.value.sqlstate == "23514"  # check_violation
