"""`tasker.dependency_results`: the dependency results a partial claim row leaves out.

Static templates driven through the engine (claim_steps, complete_steps, resolve_step): only
the finished ancestors of the step, by name prefix, paged with `after`, in byte order, with
bounded inputs.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tasker_pg import db
from tasker_pg.errors import NotFoundError, ValidationError
from tests.support.engine import (
    assert_healthy,
    claim,
    complete,
    mixed,
    start,
    step,
    step_row,
    success,
    template,
)


def _result(name: str) -> dict[str, Any]:
    return {"from": name, "n": len(name)}


async def _run_ready(conn: db.Connection, names: set[str]) -> set[str]:
    """Claim what is ready; complete those named `names` (result `_result(name)`) and release
    the others. Returns the names claimed."""
    rows = await claim(conn)
    done = [success(r, _result(r["step_name"])) for r in rows if r["step_name"] in names]
    if done:
        await complete(conn, *done)
    others = [r for r in rows if r["step_name"] not in names]
    if others:
        await conn.release_steps(
            [
                {
                    "step_uuid": str(r["step_uuid"]),
                    "attempt": r["attempt"],
                    "claim_seq": r["claim_seq"],
                }
                for r in others
            ]
        )
    return {r["step_name"] for r in rows}


async def test_only_finished_ancestors_are_returned(conn: db.Connection) -> None:
    # init -> left, right; left, right -> validate; left -> transform; right -> analyze;
    # validate, transform, analyze -> finalize
    task = await start(conn, mixed())
    assert await _run_ready(conn, {"init"}) == {"init"}
    assert await _run_ready(conn, {"left"}) == {"left", "right"}  # right handed back

    transform = (await step_row(conn, task, "transform"))["step_uuid"]
    validate = (await step_row(conn, task, "validate"))["step_uuid"]
    finalize = (await step_row(conn, task, "finalize"))["step_uuid"]
    init = (await step_row(conn, task, "init"))["step_uuid"]

    assert await conn.dependency_results(transform) == [
        ("init", _result("init")),
        ("left", _result("left")),
    ]
    # right is an ancestor of validate but not finished
    assert [n for n, _ in await conn.dependency_results(validate)] == ["init", "left"]
    assert await conn.dependency_results(init) == []  # a root has no ancestors

    # right finishes: validate sees it, transform (not downstream of right) never does
    await _run_ready(conn, {"right"})
    assert [n for n, _ in await conn.dependency_results(validate)] == ["init", "left", "right"]
    assert [n for n, _ in await conn.dependency_results(transform)] == ["init", "left"]
    # transform finished, analyze and validate not yet: finalize sees four of six ancestors
    await _run_ready(conn, {"transform"})
    assert [n for n, _ in await conn.dependency_results(finalize)] == [
        "init",
        "left",
        "right",
        "transform",
    ]
    await assert_healthy(conn)


def _fan_in(names: list[str]) -> dict[str, Any]:
    return template("fan_in", [step(n) for n in names] + [step("join", *names)])


async def test_prefix_paging_and_byte_order(conn: db.Connection) -> None:
    parts = [f"part_{i:02d}" for i in range(25)]
    odd = ["p_Z", "p_b", "p_A", "p_-", "p_.", "other"]
    task = await start(conn, _fan_in(parts + odd))
    claimed = await _run_ready(conn, set(parts + odd) - {"part_07"})
    assert claimed == set(parts + odd)
    # an operator's resolution counts as finished, with the result it was given
    await conn.resolve_step((await step_row(conn, task, "part_07"))["step_uuid"], {"by": "op"})
    join = (await step_row(conn, task, "join"))["step_uuid"]

    everything = await conn.dependency_results(join, limit=1000)
    assert [n for n, _ in everything] == sorted(parts + odd)  # Python's (byte) order
    assert dict(everything)["part_07"] == {"by": "op"}
    assert dict(everything)["part_03"] == _result("part_03")

    pages: list[list[str]] = []
    after: str | None = None
    while True:
        page = await conn.dependency_results(join, "part_", after, 10)
        pages.append([n for n, _ in page])
        if len(page) < 10:
            break
        after = page[-1][0]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [n for p in pages for n in p] == parts

    assert [n for n, _ in await conn.dependency_results(join, "p_")] == [
        "p_-",
        "p_.",
        "p_A",
        "p_Z",
        "p_b",
    ]
    # after a name that is not a step: strictly greater names only
    assert [n for n, _ in await conn.dependency_results(join, "p_", "p_B")] == ["p_Z", "p_b"]
    assert await conn.dependency_results(join, "part_24") == [("part_24", _result("part_24"))]
    assert await conn.dependency_results(join, "part_24", "part_24") == []
    assert await conn.dependency_results(join, "nothing") == []
    assert [n for n, _ in await conn.dependency_results(join, "", None, 3)] == [
        "other",
        "p_-",
        "p_.",
    ]
    # prefix characters are not patterns: '_' and '%' mean themselves
    assert await conn.dependency_results(join, "part%") == []
    assert [n for n, _ in await conn.dependency_results(join, "p_", limit=1)] == ["p_-"]
    await assert_healthy(conn)


async def test_bounded_inputs(conn: db.Connection) -> None:
    task = await start(conn, template("two", [step("a"), step("b", "a")]))
    await _run_ready(conn, {"a"})
    b = (await step_row(conn, task, "b"))["step_uuid"]
    assert await conn.dependency_results(b, limit=1) == [("a", _result("a"))]
    assert await conn.dependency_results(b, limit=1000) == [("a", _result("a"))]
    for bad_limit in (0, -1, 1001, None):
        with pytest.raises(ValidationError, match="limit must be between 1 and 1000") as info:
            await conn.fetch(
                "SELECT * FROM tasker.dependency_results($1::uuid, NULL, NULL, $2)", b, bad_limit
            )
        assert info.value.error_code == "invalid_argument"
    with pytest.raises(ValidationError, match="step_uuid is required"):
        await conn.fetch("SELECT * FROM tasker.dependency_results(NULL, NULL, NULL, 10)")
    with pytest.raises(NotFoundError, match="does not exist") as missing:
        await conn.dependency_results(uuid.uuid4())
    assert missing.value.error_code == "step_not_found"
    limit = await conn.fetchval("SELECT value FROM tasker.settings WHERE name = 'max_name_bytes'")
    for args in (("x" * (limit + 1), None), (None, "é" * (limit // 2 + 1))):
        with pytest.raises(ValidationError, match="max_name_bytes") as big:
            await conn.dependency_results(b, *args)
        assert big.value.error_code == "payload_too_large"
    # at the limit is fine
    assert await conn.dependency_results(b, "x" * limit) == []
