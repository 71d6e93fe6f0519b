"""The clients' schedule methods (tasker.create_schedule and the rest), blocking and async."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from tasker_pg import AsyncTaskerClient, TaskerClient, db
from tasker_pg.errors import NotFoundError, ValidationError
from tasker_pg.responses import ScheduleFire
from tests.support.engine import NAMESPACE, single

pytestmark = pytest.mark.timeout(120)


async def test_the_blocking_client_manages_a_schedule(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(single())

    def scenario() -> None:
        with TaskerClient(dsn) as client:
            made = client.create_schedule(
                "quarterly",
                namespace=NAMESPACE,
                template="single",
                cron="*/15 * * * *",
                time_zone="Europe/Berlin",
                context={"k": 1},
                overlap="allow",
                catchup_window=dt.timedelta(minutes=30),
            )
            assert (made.name, made.cron, made.overlap, made.catchup_window_seconds) == (
                "quarterly",
                "*/15 * * * *",
                "allow",
                1800.0,
            )
            assert made.next_fire_at is not None and made.next_fire_at.minute % 15 == 0
            task = client.trigger_schedule("quarterly")
            listed = client.list_schedules()
            assert [(s.name, s.last_task_uuid, s.last_task_state) for s in listed] == [
                ("quarterly", task, "pending")
            ]
            hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
            fires = client.backfill_schedule("quarterly", hour - dt.timedelta(hours=1), hour)
            assert [f.slot for f in fires] == [
                hour - dt.timedelta(minutes=60 - 15 * i) for i in range(5)
            ]
            assert {f.action for f in fires} == {"created"}
            assert client.backfill_schedule("quarterly", hour, hour) == [
                ScheduleFire("quarterly", hour, fires[-1].task_uuid, "existing")
            ]
            assert client.pause_schedule("quarterly").enabled is False
            assert client.resume_schedule("quarterly").enabled is True
            assert client.fire_due_schedules() == []
            assert client.delete_schedule("quarterly") is True
            assert client.delete_schedule("quarterly") is False
            with pytest.raises(NotFoundError):
                client.trigger_schedule("quarterly")
            with pytest.raises(ValidationError) as naive:
                client.backfill_schedule("x", dt.datetime(2026, 1, 1), hour)
            assert naive.value.error_code == "invalid_argument"

    await asyncio.to_thread(scenario)
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 6


async def test_the_async_client_fires_due_slots(dsn: str, conn: db.Connection) -> None:
    await conn.register_template(single())
    async with AsyncTaskerClient(dsn) as client:
        await client.create_schedule(
            "m", namespace=NAMESPACE, template="single", cron="* * * * *", overlap="skip"
        )
        await conn.execute(
            "UPDATE tasker.schedules SET next_fire_at = date_trunc('minute', now())"
            " - interval '2 minutes'"
        )
        fires = await client.fire_due_schedules()
        assert [f.action for f in fires][:3] == ["created", "skipped", "skipped"]
        assert fires[0].task_uuid is not None and fires[1].task_uuid is None
        with pytest.raises(ValidationError) as bad:
            await client.create_schedule("n", namespace=NAMESPACE, template="single", cron="* * *")
        assert bad.value.error_code == "invalid_schedule"
