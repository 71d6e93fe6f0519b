"""pg_cron drives tasker.fire_due_schedules(): a cluster of its own with
shared_preload_libraries = 'pg_cron' runs `SELECT tasker.fire_due_schedules()` every minute,
and the due slots of a schedule create their tasks, each once.

Skipped, saying why, where the pg_cron extension is not installed for the server under test
(the bundled PostgreSQL 16 and 18 ship no contrib modules; on Debian's PostgreSQL 15:
`apt-get install postgresql-15-cron`, which .ci/run does). pg_cron 1.4 schedules by the minute,
so the test waits for the next minute to start (marked slow).
"""

from __future__ import annotations

import datetime as dt
import shutil

import pytest

from tasker_pg import db
from tests.support.chaos import PrivateCluster
from tests.support.engine import NAMESPACE, single
from tests.support.worker import poll

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def test_pg_cron_fires_the_due_slots_once() -> None:
    cluster = PrivateCluster()
    try:
        dsn = await cluster.start()
        conn = await db.connect(dsn)
        try:
            available = await conn.fetchval(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_cron'"
            )
            if available is None:
                version = await conn.fetchval("SHOW server_version")
                pytest.skip(
                    f"the pg_cron extension is not installed for PostgreSQL {version} "
                    "(Debian: apt-get install postgresql-15-cron)"
                )
            await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_cron'")
        finally:
            await conn.close()
        await cluster.restart(immediate=False)
        # pg_cron's settings exist once it is loaded
        conn = await db.connect(dsn)
        try:
            await conn.execute("ALTER SYSTEM SET cron.database_name = 'tasker'")
            # jobs run in background workers (no libpq login, so no password to give)
            await conn.execute("ALTER SYSTEM SET cron.use_background_workers = on")
        finally:
            await conn.close()
        await cluster.restart(immediate=False)
        conn = await db.connect(dsn)
        try:
            await conn.execute("CREATE EXTENSION pg_cron")
            await conn.register_template(single())
            await conn.create_schedule(
                "minutely", NAMESPACE, "single", "* * * * *", overlap="allow"
            )
            await conn.execute(
                "UPDATE tasker.schedules SET next_fire_at = date_trunc('minute', now())"
                " - interval '3 minutes'"
            )
            first = await conn.fetchval("SELECT next_fire_at FROM tasker.schedules")
            await conn.execute(
                "SELECT cron.schedule('tasker-schedules', '* * * * *',"
                " 'SELECT tasker.fire_due_schedules()')"
            )

            async def ran() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM cron.job_run_details WHERE status = 'succeeded'"
                    )
                )

            await poll(ran, timeout=150, interval=0.5, what="a pg_cron run of the job")
            runs = await conn.fetch("SELECT status, return_message FROM cron.job_run_details")
            assert {r["status"] for r in runs} == {"succeeded"}, runs
            last = await conn.fetchval("SELECT last_slot FROM tasker.schedules")
            keys = [
                r["idempotency_key"]
                for r in await conn.fetch(
                    "SELECT idempotency_key FROM tasker.tasks ORDER BY idempotency_key"
                )
            ]
            minutes = int((last - first) / dt.timedelta(minutes=1))
            assert minutes >= 3
            assert keys == [
                "schedule:minutely:"
                + (first + dt.timedelta(minutes=i))
                .astimezone(dt.UTC)
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                for i in range(minutes + 1)
            ]
            assert await conn.fetchval("SELECT next_fire_at > now() FROM tasker.schedules")
        finally:
            await conn.close()
    finally:
        cluster.cluster.destroy()
        shutil.rmtree(cluster.cluster.home, ignore_errors=True)
