"""The clients' flow-control methods: rate limits (tasker.set_rate_limit, delete_rate_limit,
v_rate_limits) and fairness lanes (v_flow_lanes), blocking and async.

Bad arguments are refused in Python before any connection is opened (the refusal tests use a
client whose server does not exist); what only the database knows (a rate limit a template step
names) is its refusal, TV002, as a ValidationError. Tests that run work end with
`tasker.check_invariants()` empty.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from tasker_pg import AsyncTaskerClient, TaskerClient, db
from tasker_pg.errors import ValidationError
from tasker_pg.responses import FlowLaneResponse, RateLimitResponse
from tasker_pg.template import TaskTemplate
from tests.support.engine import assert_healthy, claim, complete, step, success

pytestmark = pytest.mark.timeout(120)

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/none"
LANES_NAMESPACE = "tenants"


def flow_template(name: str = "per_customer", **flow: Any) -> dict[str, Any]:
    """One step `only` in namespace tenants, with the template-level flow settings `flow`."""
    raw = {
        "name": name,
        "namespace_name": LANES_NAMESPACE,
        "version": "1.0.0",
        "steps": [step("only")],
        **flow,
    }
    return TaskTemplate.from_dict(raw).to_json()


async def test_the_blocking_client_sets_lists_changes_and_deletes_a_rate_limit(
    dsn: str, conn: db.Connection
) -> None:
    def scenario() -> None:
        with TaskerClient(dsn) as client:
            made = client.set_rate_limit("stripe.api", 2.5)
            assert isinstance(made, RateLimitResponse)
            # burst defaults to ceil(per_second); a new bucket starts full
            assert (made.name, made.per_second, made.burst, made.tokens_now) == (
                "stripe.api",
                2.5,
                3,
                3.0,
            )
            assert (made.parked_until, made.template_steps) == (None, 0)
            assert made.created_at <= made.updated_at
            other = client.set_rate_limit("a:b-c_d", 1000000, 1000000)
            assert (other.per_second, other.burst) == (1e6, 1000000)
            listed = client.list_rate_limits()
            assert [r.name for r in listed] == ["a:b-c_d", "stripe.api"]
            assert listed[1].burst == 3 and listed[1].tokens_now == pytest.approx(3.0)
            # a change keeps the tokens, up to the new burst
            changed = client.set_rate_limit("stripe.api", 0.5, burst=1)
            assert (changed.per_second, changed.burst, changed.tokens_now) == (0.5, 1, 1.0)
            assert changed.created_at == made.created_at
            assert changed.updated_at > made.updated_at
            assert changed.to_dict()["created_at"] == made.created_at.isoformat()
            assert client.delete_rate_limit("stripe.api") is True
            assert client.delete_rate_limit("stripe.api") is False
            assert [r.name for r in client.list_rate_limits()] == ["a:b-c_d"]

    await asyncio.to_thread(scenario)
    assert await conn.fetchval("SELECT count(*) FROM tasker.rate_limits") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 1.0), "rate limit name must be 1 to 128 letters"),
        (("9lives", 1.0), "rate limit name must be 1 to 128 letters"),
        (("has space", 1.0), "rate limit name must be 1 to 128 letters"),
        (("x" * 129, 1.0), "rate limit name must be 1 to 128 letters"),
        (("ok\n", 1.0), "rate limit name must be 1 to 128 letters"),
        ((None, 1.0), "rate limit name must be 1 to 128 letters"),
        (("ok", 0), "per_second must be a number > 0 and at most 1000000, got 0"),
        (("ok", -1.0), "per_second must be a number > 0"),
        (("ok", 1000000.5), "per_second must be a number > 0"),
        (("ok", math.nan), "per_second must be a number > 0"),
        (("ok", math.inf), "per_second must be a number > 0"),
        (("ok", True), "per_second must be a number > 0"),
        (("ok", "5"), "per_second must be a number > 0"),
        (("ok", 1.0, 0), "burst must be an integer from 1 to 1000000, got 0"),
        (("ok", 1.0, 1000001), "burst must be an integer from 1 to 1000000"),
        (("ok", 1.0, 2.0), "burst must be an integer from 1 to 1000000"),
        (("ok", 1.0, True), "burst must be an integer from 1 to 1000000"),
    ],
)
async def test_bad_rate_limits_are_refused_before_any_connection(
    args: tuple[Any, ...], message: str
) -> None:
    async with AsyncTaskerClient(UNREACHABLE, connect_timeout=1) as client:
        with pytest.raises(ValidationError, match=message) as refused:
            await client.set_rate_limit(*args)
        assert refused.value.error_code == "invalid_argument"
        assert refused.value.sqlstate is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.delete_rate_limit("1bad"), "rate limit name must be"),
        (lambda c: c.delete_rate_limit(7), "rate limit name must be"),
        (lambda c: c.list_flow_lanes(""), "namespace must be a non-empty string"),
        (lambda c: c.list_flow_lanes(limit=0), "limit must be an integer from 1 to 1000, got 0"),
        (lambda c: c.list_flow_lanes(limit=1001), "limit must be an integer from 1 to 1000"),
        (lambda c: c.list_flow_lanes(limit=True), "limit must be an integer from 1 to 1000"),
    ],
)
def test_the_blocking_client_refuses_bad_names_and_limits_before_any_connection(
    call: Any, message: str
) -> None:
    with TaskerClient(UNREACHABLE, connect_timeout=1) as client:
        with pytest.raises(ValidationError, match=message) as refused:
            call(client)
        assert refused.value.error_code == "invalid_argument"


async def test_a_rate_limit_a_template_step_names_cannot_be_deleted(
    dsn: str, conn: db.Connection
) -> None:
    async with AsyncTaskerClient(dsn) as client:
        await client.set_rate_limit("partner-api", 10)
        await conn.register_template(flow_template(rate_limit="partner-api"))
        [limit] = await client.list_rate_limits()
        assert (limit.name, limit.template_steps) == ("partner-api", 1)
        with pytest.raises(ValidationError) as refused:
            await client.delete_rate_limit("partner-api")
        assert refused.value.error_code == "rate_limit_in_use"
        assert refused.value.sqlstate == "TV002"
        assert "used by template tenants/per_customer 1.0.0, step only" in str(refused.value)
        assert [r.name for r in await client.list_rate_limits()] == ["partner-api"]
        # the database's own checks stand behind the client's
        with pytest.raises(ValidationError) as sql_refused:
            await conn.fetchval("SELECT tasker.set_rate_limit('partner-api', 'NaN')")
        assert (sql_refused.value.sqlstate, sql_refused.value.error_code) == (
            "TV002",
            "invalid_argument",
        )


async def test_the_lanes_of_a_namespace_in_turn_order(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(flow_template(concurrency={"key": "$.customer", "limit": 2}))
    async with AsyncTaskerClient(dsn) as client:
        assert await client.list_flow_lanes() == []
        await client.create_tasks(
            "per_customer",
            namespace=LANES_NAMESPACE,
            contexts=[{"customer": "big"}] * 5 + [{"customer": "small"}, {"customer": 42}],
        )
        lanes = await client.list_flow_lanes(LANES_NAMESPACE)
        assert all(isinstance(lane, FlowLaneResponse) for lane in lanes)
        # '' holds the steps without a key (none here); a number key is its JSON text
        assert [(x.lane, x.vtime, x.concurrency_limit, x.queued, x.visible) for x in lanes] == [
            ("", 0, None, 0, 0),
            ("42", 0, 2, 1, 1),
            ("big", 0, 2, 5, 5),
            ("small", 0, 2, 1, 1),
        ]
        assert {x.queue for x in lanes} == {LANES_NAMESPACE}
        assert await client.list_flow_lanes("elsewhere") == []

        rows = await claim(conn, LANES_NAMESPACE, qty=100)
        assert len(rows) == 4  # big: 2 of 5 (its limit), small and 42: 1 each
        lanes = await client.list_flow_lanes()
        # served lanes move back by what they got; one found with nothing visible ('') moves
        # behind the furthest; the lowest turn goes first. Messages of steps in progress are
        # queued, not visible.
        assert [(x.lane, x.vtime, x.in_progress, x.visible, x.queued) for x in lanes] == [
            ("42", 1, 1, 0, 1),
            ("small", 1, 1, 0, 1),
            ("", 2, 0, 0, 0),
            ("big", 2, 2, 3, 5),
        ]
        assert [x.lane for x in await client.list_flow_lanes(limit=2)] == ["42", "small"]
        by_lane = {x.lane: x for x in lanes}
        assert by_lane["big"].to_dict() == {
            "queue": LANES_NAMESPACE,
            "lane": "big",
            "vtime": 2,
            "concurrency_limit": 2,
            "in_progress": 2,
            "visible": 3,
            "queued": 5,
        }
        await complete(conn, *(success(r) for r in rows))
        while rows := await claim(conn, LANES_NAMESPACE, qty=100):
            await complete(conn, *(success(r) for r in rows))
    await assert_healthy(conn)
    async with AsyncTaskerClient(dsn) as client:
        # drained lanes go with the claims that find them empty
        assert await client.list_flow_lanes(LANES_NAMESPACE) == []
