"""Schedules (sql/functions/87_schedules.sql): cron in SQL, firing, catch-up, overlap, races.

The cron arithmetic is checked against `croniter` as an oracle, with hypothesis drawing the
expressions (fields with `*`, numbers, names, ranges, steps and lists, and the aliases), the
zones and the instants. croniter is asked for local wall-clock slots (naive datetimes, so its
own time-zone handling plays no part) with `implement_cron_bug=True` (Vixie cron's day rule:
when a day field starts with `*` both day fields must match, otherwise either). Each local slot
is then turned into an instant by the rules the engine documents, written here once more with
`zoneinfo`: a local time that does not exist fires at the next minute that does, and one that
occurs twice fires once, at its first occurrence.

Where croniter's own DST semantics differ (a time-zone-aware croniter): for a local time that
occurs twice it fires at both occurrences (`30 1 * * *` in America/New_York on 2026-11-01 fires
at 05:30Z and again at 06:30Z), where the engine fires once (05:30Z). For a local time that does
not exist it agrees with the engine (02:30 on 2026-03-08 fires at 03:00 EDT, 07:00Z). The tests
below compare against the engine's rules, not croniter's time-zone handling.

Downtime is simulated by moving a schedule's next slot into the past as the superuser (UPDATE),
never by sleeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import re
import uuid
import zoneinfo
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from croniter import croniter  # type: ignore[import-untyped]
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tasker_pg import db
from tasker_pg.cron import ALIASES, CronError, check_time_zone, parse_cron
from tasker_pg.errors import NotFoundError, ValidationError
from tasker_pg.template import TaskTemplate, TemplateValidationError
from tests.sql.conftest import Opener
from tests.support.engine import NAMESPACE, assert_healthy, drive, single, start, task_row

if TYPE_CHECKING:
    from tests.support.pgserver import TestServer

T = TypeVar("T")
UTC = dt.UTC
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "Asia/Kolkata",  # a half-hour offset, no DST
    "America/Santiago",  # DST changes at midnight local time in some years
]
pytestmark = pytest.mark.timeout(600)


# --- the oracle -------------------------------------------------------------------------------


def local_to_instant(local: dt.datetime, zone: str) -> dt.datetime:
    """The engine's rule: the first occurrence of a local time; a time in a gap fires at the
    first minute after it that exists."""
    z = zoneinfo.ZoneInfo(zone)

    def exists(t: dt.datetime) -> dt.datetime | None:
        u = t.replace(tzinfo=z, fold=0).astimezone(UTC)  # fold=0: the earlier occurrence
        return u if u.astimezone(z).replace(tzinfo=None) == t else None

    found = exists(local)
    t = local
    while found is None:
        t += dt.timedelta(minutes=1)
        found = exists(t)
    return found


def for_croniter(expr: str) -> str:
    """`expr` as croniter reads it the engine's way: a day of week `N/STEP` runs to 7 (Vixie
    cron's range is 0-7, croniter's 0-6: `1/6` is Monday and Sunday here, Monday there)."""
    fields = expr.split()
    if len(fields) == 5:
        fields[4] = ",".join(
            re.sub(r"^(\w+)/(\d+)$", r"\1-7/\2", item) for item in fields[4].split(",")
        )
    return " ".join(fields)


def oracle(expr: str, zone: str, after: dt.datetime, count: int) -> list[dt.datetime]:
    """The next `count` slots after `after`, from croniter's local slots."""
    expr = for_croniter(expr)
    local_after = after.astimezone(zoneinfo.ZoneInfo(zone)).replace(tzinfo=None)
    # local slots before local(after) never map after it; 3 hours back covers a repeated hour
    it = croniter(expr, local_after - dt.timedelta(hours=3), implement_cron_bug=True)
    out: list[dt.datetime] = []
    while len(out) < count:
        instant = local_to_instant(it.get_next(dt.datetime), zone)
        if instant > after and (not out or instant > out[-1]):
            out.append(instant)
    return out


async def sql_slots(
    conn: db.Connection, expr: str, zone: str, after: dt.datetime, count: int
) -> list[dt.datetime]:
    rows = await conn.fetch(
        """WITH RECURSIVE s(i, t) AS (
               SELECT 1, tasker.cron_next($1, $2, $3)
               UNION ALL
               SELECT i + 1, tasker.cron_next($1, $2, t) FROM s WHERE i < $4 AND t IS NOT NULL)
           SELECT t FROM s ORDER BY i""",
        expr,
        zone,
        after,
        count,
    )
    return [r["t"] for r in rows]


# --- expressions --------------------------------------------------------------------------------

MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]


@st.composite
def cron_field(draw: st.DrawFn, lo: int, hi: int, names: list[str] | None = None) -> str:
    def value(v: int) -> str:
        if names and v - lo < len(names) and draw(st.booleans()):
            return names[v - lo].lower() if draw(st.booleans()) else names[v - lo]
        return str(v)

    items = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["star", "one", "range", "star_step", "range_step", "from_step"])
        )
        a, b = sorted((draw(st.integers(lo, hi)), draw(st.integers(lo, hi))))
        if a == b and kind in ("range", "range_step"):
            # croniter reads a one-value range `N-N` as `*` (the engine and Vixie cron: N)
            kind = "one"
        step = draw(st.integers(1, hi - lo + 1))
        items.append(
            {
                "star": "*",
                "one": value(a),
                "range": f"{value(a)}-{value(b)}",
                "star_step": f"*/{step}",
                "range_step": f"{value(a)}-{value(b)}/{step}",
                "from_step": f"{a}/{step}",
            }[kind]
        )
    return ",".join(items)


@st.composite
def cron_exprs(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(sorted(ALIASES)))
    minute = draw(cron_field(0, 59))
    hour = draw(cron_field(0, 23))
    dom = draw(st.one_of(st.just("*"), cron_field(1, 31)))
    month = draw(st.one_of(st.just("*"), cron_field(1, 12, MONTHS)))
    dow = draw(st.one_of(st.just("*"), cron_field(0, 7, DAYS)))
    return f"{minute} {hour} {dom} {month} {dow}"


instants = st.datetimes(
    min_value=dt.datetime(2024, 1, 1), max_value=dt.datetime(2031, 12, 31), timezones=st.just(UTC)
)


@functools.cache
def transitions(zone: str, year: int) -> tuple[dt.datetime, ...]:
    """The instants (to the hour) at which `zone`'s UTC offset changes in `year`."""
    z = zoneinfo.ZoneInfo(zone)
    start = dt.datetime(year, 1, 1, tzinfo=UTC)
    hours = [start + dt.timedelta(hours=h) for h in range(366 * 24)]
    return tuple(
        b
        for a, b in itertools.pairwise(hours)
        if a.astimezone(z).utcoffset() != b.astimezone(z).utcoffset()
    )


@st.composite
def zones_and_instants(draw: st.DrawFn) -> tuple[str, dt.datetime]:
    """A zone, and an instant: anywhere in 2024-2031, or (half the time) within a few hours
    of one of the zone's DST transitions, where slots are skipped or repeated."""
    zone = draw(st.sampled_from(ZONES))
    near = transitions(zone, draw(st.integers(2024, 2031)))
    if near and draw(st.booleans()):
        shift = dt.timedelta(
            minutes=draw(st.integers(-6 * 60, 3 * 60)), seconds=draw(st.integers(0, 59))
        )
        return zone, draw(st.sampled_from(near)) + shift
    return zone, draw(instants)


class Env:
    """One database for the properties, on a loop of its own (hypothesis calls synchronously)."""

    def __init__(self, server: TestServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = server
        self.dsn = self.run(server.create_database())
        self.conn: db.Connection = self.run(db.connect(self.dsn))

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.conn.close())
        self.run(self.server.drop_database(self.dsn))
        self.loop.close()


@pytest.fixture(scope="module")
def env(pg_server: TestServer) -> Iterator[Env]:
    environment = Env(pg_server)
    try:
        yield environment
    finally:
        environment.close()


PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def day_field_means_all_without_star(expr: str) -> bool:
    """A day field that allows every day but does not start with `*` (`1-31`): Vixie cron and
    the engine read it as restricted (either day field may match), croniter as `*` (both
    must)."""
    fields = ALIASES.get(expr, expr).split()
    spec = parse_cron(expr, today=dt.date(2026, 1, 1))
    return (not fields[2].startswith("*") and spec.doms == frozenset(range(1, 32))) or (
        not fields[4].startswith("*") and spec.dows == frozenset(range(7))
    )


@PROPERTY
@given(expr=cron_exprs(), zone_after=zones_and_instants())
@example(
    expr="*/15 2 * * *", zone_after=("America/New_York", dt.datetime(2026, 3, 8, 6, tzinfo=UTC))
)
@example(
    expr="30 1 * * *", zone_after=("America/New_York", dt.datetime(2026, 11, 1, 4, tzinfo=UTC))
)
@example(expr="0 * * * *", zone_after=("America/New_York", dt.datetime(2026, 11, 1, 3, tzinfo=UTC)))
@example(
    expr="*/10 1,2 * * *",
    zone_after=("Australia/Lord_Howe", dt.datetime(2026, 4, 4, 13, tzinfo=UTC)),
)
@example(
    expr="*/10 1,2 * * *",
    zone_after=("Australia/Lord_Howe", dt.datetime(2026, 10, 3, 14, tzinfo=UTC)),
)
@example(expr="0 0 29 2 1", zone_after=("UTC", dt.datetime(2026, 1, 1, tzinfo=UTC)))
def test_next_slots_match_croniter_with_the_engines_dst_rules(
    env: Env, expr: str, zone_after: tuple[str, dt.datetime]
) -> None:
    zone, after = zone_after
    try:
        parse_cron(expr, today=after.date())
    except CronError:
        return  # no slot within 3000 days: refused where a schedule is made (tested below)
    if day_field_means_all_without_star(expr):
        return  # read differently by croniter (see the helper)
    expected = oracle(expr, zone, after, 6)
    got = env.run(sql_slots(env.conn, expr, zone, after, 6))
    assert got == expected, (expr, zone, after)


def test_dst_rules_on_named_days(env: Env) -> None:
    ny = "America/New_York"

    def slots(expr: str, after: str, n: int) -> list[str]:
        when = dt.datetime.fromisoformat(after)
        got = env.run(sql_slots(env.conn, expr, ny, when, n))
        return [t.astimezone(UTC).strftime("%m-%d %H:%MZ") for t in got]

    # 2026-03-08: 02:00-02:59 does not exist; each of its slots fires once, at 03:00 EDT
    assert slots("30 2 * * *", "2026-03-08T05:00:00+00:00", 2) == ["03-08 07:00Z", "03-09 06:30Z"]
    assert slots("*/15 2 * * *", "2026-03-08T05:00:00+00:00", 2) == ["03-08 07:00Z", "03-09 06:00Z"]
    # 2026-11-01: 01:00-01:59 occurs twice; each of its slots fires once, at the first one
    assert slots("30 1 * * *", "2026-11-01T04:00:00+00:00", 2) == ["11-01 05:30Z", "11-02 06:30Z"]
    assert slots("0 * * * *", "2026-11-01T03:30:00+00:00", 3) == [
        "11-01 04:00Z",
        "11-01 05:00Z",
        "11-01 07:00Z",
    ]
    # asked from inside the second occurrence, the repeated slots are behind
    assert slots("45 1 * * *", "2026-11-01T06:30:00+00:00", 1) == ["11-02 06:45Z"]


# --- validity: SQL and the Python loader agree ----------------------------------------------

junk = st.one_of(
    cron_exprs(),
    st.text(alphabet=" */-,0123456789@adefhilmnoqruwyJAN", max_size=30),
    st.lists(
        st.sampled_from(["*", "60", "0", "5-1", "*/0", "1/2", "MON", "FOO", "32", "7", ""]),
        min_size=0,
        max_size=6,
    ).map(" ".join),
)


@PROPERTY
@given(expr=junk)
@example(expr="0 0 30 2 *")
@example(expr="x" * 300)
@example(expr="@reboot")
def test_sql_and_python_agree_on_valid_cron(env: Env, expr: str) -> None:
    today = env.run(env.conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date"))
    try:
        parse_cron(expr, today=today)
        python_ok = True
    except CronError:
        python_ok = False
    try:
        env.run(env.conn.fetchval("SELECT tasker.cron_next($1, 'UTC', now())", expr))
        sql_ok = True
    except ValidationError as exc:
        assert exc.error_code == "invalid_schedule", exc
        sql_ok = False
    never = (
        sql_ok
        and env.run(env.conn.fetchval("SELECT tasker.cron_next($1, 'UTC', now())", expr)) is None
    )
    # cron_next answers NULL for an expression without a slot; the loader refuses it
    assert python_ok == (sql_ok and not never), expr


async def test_sql_and_python_agree_on_time_zone_names(conn: db.Connection) -> None:
    sql_names = {r["name"] for r in await conn.fetch("SELECT name FROM pg_timezone_names")}
    names = sql_names | zoneinfo.available_timezones() | {"", "+05:00", "UTC+5", "Mars/Base"}
    disagree = []
    for name in sorted(names):
        try:
            check_time_zone(name)
            python_ok = True
        except CronError:
            python_ok = False
        if python_ok != (name in sql_names):
            disagree.append(name)
    # the server and Python may read different copies of the tz database (the bundled servers
    # carry their own): a handful of names new in one of them may differ, never the common ones
    assert len(disagree) <= 5, disagree
    for common in ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"):
        assert common in sql_names
        assert check_time_zone(common) == common


# --- creating and changing schedules ------------------------------------------------------------


async def make(
    conn: db.Connection,
    name: str = "every",
    cron: str = "* * * * *",
    *,
    overlap: str = "allow",
    window: dt.timedelta = dt.timedelta(hours=1),
    zone: str = "UTC",
) -> Any:
    """A schedule of the one-step template `single` (registered first)."""
    await conn.register_template(single())
    return await conn.create_schedule(
        name, NAMESPACE, "single", cron, time_zone=zone, overlap=overlap, catchup_window=window
    )


async def downtime(conn: db.Connection, name: str, minutes: int) -> None:
    """As if nothing fired for `minutes`: the next slot moved that far into the past."""
    await conn.execute(
        "UPDATE tasker.schedules SET next_fire_at = date_trunc('minute', now())"
        " - make_interval(mins => $2) WHERE name = $1",
        name,
        minutes,
    )


async def schedule_tasks(conn: db.Connection, name: str) -> dict[str, uuid.UUID]:
    rows = await conn.fetch(
        "SELECT idempotency_key, task_uuid FROM tasker.tasks WHERE idempotency_key LIKE $1",
        f"schedule:{name}:%",
    )
    return {r["idempotency_key"]: r["task_uuid"] for r in rows}


def key(name: str, slot: dt.datetime) -> str:
    return f"schedule:{name}:{slot.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


async def test_create_computes_the_next_slot_and_lists_it(conn: db.Connection) -> None:
    row = await make(conn, "nightly", "30 2 * * *", zone="Europe/Berlin", overlap="skip")
    expected = await conn.fetchval("SELECT tasker.cron_next('30 2 * * *', 'Europe/Berlin', now())")
    assert row["next_fire_at"] == expected
    assert (row["enabled"], row["overlap"], row["last_slot"], row["last_task_uuid"]) == (
        True,
        "skip",
        None,
        None,
    )
    listed = await conn.list_schedules()
    assert [(r["name"], r["next_fire_at"], r["last_task_state"]) for r in listed] == [
        ("nightly", expected, None)
    ]
    # nothing is due yet
    assert await conn.fire_due_schedules() == []


async def test_pause_and_resume(conn: db.Connection) -> None:
    await make(conn)
    await downtime(conn, "every", 3)
    paused = await conn.change_schedule("pause", "every")
    assert (paused["enabled"], paused["next_fire_at"]) == (False, None)
    assert await conn.fire_due_schedules() == []
    resumed = await conn.change_schedule("resume", "every")
    # the slots of the pause are not caught up: the next one is after now
    now = await conn.fetchval("SELECT clock_timestamp()")
    assert resumed["enabled"] is True
    assert now < resumed["next_fire_at"] <= now + dt.timedelta(minutes=1)
    assert await schedule_tasks(conn, "every") == {}


async def test_delete_keeps_the_tasks(conn: db.Connection) -> None:
    await make(conn)
    task = await conn.trigger_schedule("every")
    assert await conn.delete_schedule("every") is True
    assert await conn.delete_schedule("every") is False
    assert (await task_row(conn, task))["state"] == "pending"
    assert await conn.list_schedules() == []


async def test_trigger_fires_now_whatever_the_policy(conn: db.Connection) -> None:
    await make(conn, overlap="skip")
    first = await conn.trigger_schedule("every")
    second = await conn.trigger_schedule("every")  # the first is still pending
    assert first != second
    row = (await conn.list_schedules())[0]
    assert (row["last_task_uuid"], row["last_task_state"]) == (second, "pending")
    task = await task_row(conn, second)
    assert (task["initiator"], task["source_system"]) == ("schedule:every", "tasker.schedules")
    await assert_healthy(conn)


# --- firing, racing, catching up ----------------------------------------------------------------


async def test_three_sessions_racing_fire_each_slot_once(
    conn: db.Connection, sessions: Opener
) -> None:
    await make(conn, "a", "* * * * *")
    await make(conn, "b", "*/2 * * * *")
    await make(conn, "c", "*/3 * * * *")
    for name in ("a", "b", "c"):
        await downtime(conn, name, 40)
    expected = {
        name: {
            key(name, t)
            for t in await conn.fetchval(
                "SELECT array_agg(g) FROM generate_series(date_trunc('minute', now())"
                " - interval '40 minutes', now(), interval '1 minute') g"
                " WHERE extract(minute FROM g)::integer % $1 = 0",
                step,
            )
        }
        for name, step in (("a", 1), ("b", 2), ("c", 3))
    }
    racers = await sessions(3)
    results = []
    for _ in range(4):  # rounds of three concurrent calls, small batches so they interleave
        rounds = await asyncio.gather(*(s.fire_due_schedules(5) for s in racers))
        results.extend(r for batch in rounds for r in batch)
    while batch := await conn.fire_due_schedules(1000):
        results.extend(batch)
    for name in ("a", "b", "c"):
        made = await schedule_tasks(conn, name)
        # the slots of the last minute may have come due after `expected` was computed
        assert set(made) >= expected[name], name
        created = [r for r in results if r["schedule_name"] == name and r["action"] == "created"]
        # every task was created by exactly one call, and every slot handled once
        assert sorted(key(name, r["slot"]) for r in created) == sorted(made), name
        assert {r["task_uuid"] for r in created} == set(made.values())
    await assert_healthy(conn)


async def test_a_slot_fired_again_returns_its_task(conn: db.Connection) -> None:
    await make(conn)
    await downtime(conn, "every", 5)
    first = await conn.fire_due_schedules()
    assert {r["action"] for r in first} == {"created"}
    # another clock (a lagging replica of the row, a restored backup) fires the same slots
    await downtime(conn, "every", 5)
    again = await conn.fire_due_schedules()
    assert [(r["slot"], r["task_uuid"]) for r in again[: len(first)]] == [
        (r["slot"], r["task_uuid"]) for r in first
    ]
    assert {r["action"] for r in again[: len(first)]} == {"existing"}
    assert len(await schedule_tasks(conn, "every")) == len({r["slot"] for r in again})


async def test_catch_up_after_downtime_stays_within_the_window(conn: db.Connection) -> None:
    await make(conn, window=dt.timedelta(minutes=10))
    await downtime(conn, "every", 30)
    before = await conn.fetchval("SELECT clock_timestamp()")
    fired = await conn.fire_due_schedules()
    after = await conn.fetchval("SELECT clock_timestamp()")
    slots = [r["slot"] for r in fired]
    assert {r["action"] for r in fired} == {"created"}
    # consecutive minutes, the first inside the window and the one before it outside
    assert slots == [slots[0] + dt.timedelta(minutes=i) for i in range(len(slots))]
    assert slots[0] >= before - dt.timedelta(minutes=10)
    assert slots[0] - dt.timedelta(minutes=1) < after - dt.timedelta(minutes=10)
    assert slots[-1] <= after
    assert 10 <= len(slots) <= 11
    row = (await conn.list_schedules())[0]
    assert row["last_slot"] == slots[-1]
    assert row["next_fire_at"] == slots[-1] + dt.timedelta(minutes=1)
    assert set(await schedule_tasks(conn, "every")) == {key("every", s) for s in slots}
    # nothing more is due
    assert await conn.fire_due_schedules() == []


async def test_hourly_catch_up_in_a_zone(conn: db.Connection) -> None:
    await make(
        conn, "hourly", "@hourly", zone="Asia/Kolkata", window=dt.timedelta(hours=3, minutes=30)
    )
    await downtime(conn, "hourly", 6 * 60)
    fired = await conn.fire_due_schedules()
    # Kolkata is UTC+05:30: its hours start at :30 UTC; 3 or 4 of them in 3.5 hours
    assert {r["slot"].astimezone(UTC).minute for r in fired} == {30}
    assert len(fired) in (3, 4)
    now = await conn.fetchval("SELECT clock_timestamp()")
    assert all(now - dt.timedelta(hours=3, minutes=30) <= r["slot"] <= now for r in fired)


async def test_overlap_skip_waits_for_the_running_task(conn: db.Connection) -> None:
    await make(conn, overlap="skip")
    await downtime(conn, "every", 4)
    fired = await conn.fire_due_schedules()
    actions = [r["action"] for r in fired]
    assert actions[0] == "created"
    assert set(actions[1:]) == {"skipped"}
    assert len(await schedule_tasks(conn, "every")) == 1
    # the task finishes; the next due slot fires
    await drive(conn, NAMESPACE, lambda row: None)
    await downtime(conn, "every", 1)
    again = await conn.fire_due_schedules()
    assert again[0]["action"] == "created"
    assert len(await schedule_tasks(conn, "every")) == 2
    await assert_healthy(conn)


async def test_overlap_allow_creates_every_slot(conn: db.Connection) -> None:
    await make(conn, overlap="allow")
    await downtime(conn, "every", 4)
    fired = await conn.fire_due_schedules()
    assert {r["action"] for r in fired} == {"created"}
    made = await schedule_tasks(conn, "every")
    assert len(made) == len(fired) >= 4
    states = {(await task_row(conn, t))["state"] for t in made.values()}
    assert states == {"pending"}
    await assert_healthy(conn)


async def test_overlap_cancel_previous_cancels_the_running_task(conn: db.Connection) -> None:
    await make(conn, overlap="cancel_previous")
    await downtime(conn, "every", 3)
    fired = await conn.fire_due_schedules()
    assert {r["action"] for r in fired} == {"created"}
    states = [(await task_row(conn, r["task_uuid"]))["state"] for r in fired]
    assert states == ["cancelled"] * (len(fired) - 1) + ["pending"]
    last = (await conn.list_schedules())[0]
    assert (last["last_task_uuid"], last["last_task_state"]) == (fired[-1]["task_uuid"], "pending")
    await assert_healthy(conn)


async def test_backfill_fires_a_past_range_once(conn: db.Connection) -> None:
    await make(conn, "q", "*/15 * * * *")
    now = await conn.fetchval("SELECT date_trunc('hour', clock_timestamp())")
    start, end = now - dt.timedelta(hours=3), now - dt.timedelta(hours=1)
    first = await conn.backfill_schedule("q", start, end)
    assert [r["slot"] for r in first] == [start + dt.timedelta(minutes=15 * i) for i in range(9)]
    assert all(r["created"] for r in first)
    again = await conn.backfill_schedule("q", start, end, 3)
    assert [(r["slot"], r["task_uuid"], r["created"]) for r in again] == [
        (r["slot"], r["task_uuid"], False) for r in first[:3]
    ]
    assert len(await schedule_tasks(conn, "q")) == 9
    # the schedule itself is unchanged
    row = (await conn.list_schedules())[0]
    assert (row["last_slot"], row["last_task_uuid"]) == (None, None)
    # a range into the future ends now; one that runs backwards is refused
    upto_now = await conn.backfill_schedule("q", now, now + dt.timedelta(hours=1))
    clock = await conn.fetchval("SELECT clock_timestamp()")
    assert upto_now[0]["slot"] == now
    assert all(r["slot"] <= clock for r in upto_now)
    assert upto_now[-1]["slot"] > clock - dt.timedelta(minutes=15)
    with pytest.raises(ValidationError) as backwards:
        await conn.backfill_schedule("q", now, now - dt.timedelta(hours=1))
    assert backwards.value.error_code == "invalid_argument"


async def test_a_schedule_that_cannot_fire_records_why_and_others_go_on(
    conn: db.Connection,
) -> None:
    await make(conn, "broken")
    await make(conn, "fine")
    # its pinned version disappears (only the owner can do this)
    await conn.execute(
        "UPDATE tasker.schedules SET template_version = '9.9.9' WHERE name = 'broken'"
    )
    await downtime(conn, "broken", 2)
    await downtime(conn, "fine", 2)
    fired = await conn.fire_due_schedules()
    by_name: dict[str, list[str]] = {}
    for r in fired:
        by_name.setdefault(r["schedule_name"], []).append(r["action"])
    assert by_name["broken"] == ["error"]
    assert set(by_name["fine"]) == {"created"}
    rows = {r["name"]: r for r in await conn.list_schedules()}
    assert "has no version '9.9.9'" in rows["broken"]["last_error"]
    assert "SQLSTATE TN002" in rows["broken"]["last_error"]
    # it keeps its slot and tries again at the next call
    assert rows["broken"]["next_fire_at"] < await conn.fetchval("SELECT now()")
    assert rows["fine"]["last_error"] is None


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("* * * *", "has 4 fields; expected 5"),
        ("* * * * * *", "has 6 fields"),
        ("", "has 0 fields"),
        ("60 * * * *", "minute field: '60' is out of range 0-59"),
        ("* 24 * * *", "hour field: '24' is out of range 0-23"),
        ("* * 0 * *", "day-of-month field: '0' is out of range 1-31"),
        ("* * * 13 *", "month field: '13' is out of range 1-12"),
        ("* * * * 8", "day-of-week field: '8' is out of range 0-7"),
        ("*/0 * * * *", "'*/0' has step 0"),
        ("5-1 * * * *", "'5-1' is a range that runs backwards"),
        ("* * * FOO *", "month field: 'foo' names no month"),
        ("MON * * * *", "minute field: 'mon' names no minute (names: none: numbers only)"),
        ("*-5 * * * *", "'*-5' is not *, N, N-M"),
        ("1,,2 * * * *", "'' is not *, N, N-M"),
        ("@reboot", "cron alias '@reboot' is unknown"),
        ("1 " * 200, "at most 256 are allowed"),
        ("0 0 30 2 *", "never fires"),
    ],
)
async def test_bad_cron_is_refused_naming_the_problem(
    conn: db.Connection, cron: str, message: str
) -> None:
    await conn.register_template(single())
    with pytest.raises(ValidationError) as refused:
        await conn.create_schedule("s", NAMESPACE, "single", cron)
    assert refused.value.error_code == "invalid_schedule"
    assert message in str(refused.value)
    assert await conn.fetchval("SELECT count(*) FROM tasker.schedules") == 0


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"time_zone": "Mars/Olympus"}, "invalid_schedule", "time zone 'Mars/Olympus' is unknown"),
        ({"time_zone": "+05:00"}, "invalid_schedule", "is unknown"),
        ({"time_zone": "Europe/" + "x" * 100}, "invalid_schedule", "is unknown"),
        ({"name": "bad name"}, "invalid_schedule", "schedule name 'bad name' is invalid"),
        ({"name": "a:b"}, "invalid_schedule", "is invalid"),
        ({"name": "x" * 129}, "invalid_schedule", "is invalid"),
        ({"overlap": "queue"}, "invalid_schedule", "overlap 'queue' is unknown"),
        ({"catchup_window": dt.timedelta(seconds=30)}, "invalid_schedule", "from 1 minute"),
        ({"catchup_window": dt.timedelta(days=400)}, "invalid_schedule", "to 366 days"),
        ({"template": "nope"}, "template_not_found", "no template flows/nope"),
        ({"version": "2.0.0"}, "template_not_found", "has no version '2.0.0'"),
        ({"namespace": "Bad-NS"}, "invalid_queue_name", ""),
    ],
)
async def test_bad_schedule_arguments_are_refused(
    conn: db.Connection, change: dict[str, Any], code: str, message: str
) -> None:
    await conn.register_template(single())
    args: dict[str, Any] = {
        "name": "s",
        "namespace": NAMESPACE,
        "template": "single",
        "cron": "* * * * *",
        **change,
    }
    with pytest.raises((ValidationError, NotFoundError)) as refused:
        await conn.create_schedule(
            args.pop("name"), args.pop("namespace"), args.pop("template"), args.pop("cron"), **args
        )
    assert refused.value.error_code == code
    assert message in str(refused.value)
    assert await conn.fetchval("SELECT count(*) FROM tasker.schedules") == 0


async def test_context_is_bounded_and_names_are_unique(conn: db.Connection) -> None:
    await conn.register_template(single())
    await conn.execute("UPDATE tasker.settings SET value = 2048 WHERE name = 'max_payload_bytes'")
    with pytest.raises(ValidationError) as big:
        await conn.create_schedule("s", NAMESPACE, "single", "@daily", context={"x": "y" * 3000})
    assert big.value.error_code == "payload_too_large"
    assert "schedule s: context is 3" in str(big.value)
    await conn.create_schedule("s", NAMESPACE, "single", "@daily")
    with pytest.raises(ValidationError) as twice:
        await conn.create_schedule("s", NAMESPACE, "single", "@hourly")
    assert "schedule 's' exists" in str(twice.value)


@pytest.mark.parametrize("call", ["pause", "resume", "trigger", "backfill"])
async def test_unknown_schedule_is_not_found(conn: db.Connection, call: str) -> None:
    now = dt.datetime.now(UTC)
    with pytest.raises(NotFoundError) as missing:
        if call == "trigger":
            await conn.trigger_schedule("ghost")
        elif call == "backfill":
            await conn.backfill_schedule("ghost", now - dt.timedelta(hours=1), now)
        else:
            await conn.change_schedule(call, "ghost")
    assert missing.value.error_code == "schedule_not_found"
    assert "schedule 'ghost' does not exist" in str(missing.value)


@pytest.mark.parametrize("limit", [0, 10001])
async def test_limits_are_bounded(conn: db.Connection, limit: int) -> None:
    with pytest.raises(ValidationError) as refused:
        await conn.fire_due_schedules(limit)
    assert "limit must be an integer from 1 to 10000" in str(refused.value)


# --- schedules declared in templates ----------------------------------------------------------


def declaring(version: str, cron: str = "0 * * * *", **extra: Any) -> dict[str, Any]:
    body = single(version=version)
    body["schedules"] = [{"name": "tpl-hourly", "cron": cron, **extra}]
    return TaskTemplate.from_dict(body).to_json()


async def test_a_template_declares_a_schedule_and_a_newer_version_replaces_it(
    conn: db.Connection,
) -> None:
    await conn.register_template(declaring("1.0.0", time_zone="Europe/Berlin"))
    rows = await conn.list_schedules()
    assert [
        (r["name"], r["template_name"], r["template_version"], r["declared_by"], r["cron"])
        for r in rows
    ] == [("tpl-hourly", "single", "1.0.0", "1.0.0", "0 * * * *")]
    assert rows[0]["time_zone"] == "Europe/Berlin"
    assert rows[0]["catchup_window"] == dt.timedelta(hours=1)
    await conn.register_template(declaring("1.1.0", "*/5 * * * *", overlap="allow"))
    row = (await conn.list_schedules())[0]
    assert (row["template_version"], row["declared_by"], row["cron"], row["overlap"]) == (
        "1.1.0",
        "1.1.0",
        "*/5 * * * *",
        "allow",
    )
    assert row["next_fire_at"] == await conn.fetchval(
        "SELECT tasker.cron_next('*/5 * * * *', 'UTC', $1)", row["updated_at"]
    )
    # an older version registered later (a worker of the last release) changes nothing
    await conn.register_template(declaring("1.0.1", "@daily"))
    assert (await conn.list_schedules())[0]["declared_by"] == "1.1.0"
    # the stored body is the loader's (every default filled in)
    stored = await conn.fetchval(
        "SELECT template->'schedules' FROM tasker.named_tasks WHERE version = '1.1.0'"
    )
    assert stored == declaring("1.1.0", "*/5 * * * *", overlap="allow")["schedules"]
    # its slots create tasks of the declaring version
    await downtime(conn, "tpl-hourly", 5)
    fired = await conn.fire_due_schedules()
    assert {(await task_row(conn, r["task_uuid"]))["version"] for r in fired} == {"1.1.0"}


async def test_another_templates_schedule_name_is_refused(conn: db.Connection) -> None:
    await conn.register_template(single())
    await conn.create_schedule("tpl-hourly", NAMESPACE, "single", "@daily")
    other = single(name="other")
    other["schedules"] = [{"name": "tpl-hourly", "cron": "@hourly"}]
    with pytest.raises(ValidationError) as refused:
        await conn.register_template(TaskTemplate.from_dict(other).to_json())
    assert "which belongs to template flows/single" in str(refused.value)


@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "ok", "cron": "@hourly"},
        {
            "name": "ok",
            "cron": "0 9 * * MON-FRI",
            "time_zone": "America/New_York",
            "context": {"report": "daily"},
            "overlap": "cancel_previous",
            "catchup_window_seconds": 600,
            "enabled": False,
        },
        {"name": "ok", "cron": "61 * * * *"},
        {"name": "ok", "cron": "0 0 30 2 *"},
        {"name": "ok", "cron": "@hourly", "time_zone": "Nowhere/Else"},
        {"name": "ok", "cron": "@hourly", "overlap": "sometimes"},
        {"name": "ok", "cron": "@hourly", "catchup_window_seconds": 59},
        {"name": "ok", "cron": "@hourly", "catchup_window_seconds": 1.5},
        {"name": "ok", "cron": "@hourly", "enabled": "yes"},
        {"name": "ok", "cron": "@hourly", "context": []},
        {"name": "bad name", "cron": "@hourly"},
        {"name": "ok", "cron": 5},
        {"name": "ok", "cron": "@hourly", "colour": "red"},
        {"cron": "@hourly"},
    ],
)
async def test_sql_and_the_loader_agree_on_declared_schedules(
    conn: db.Connection, schedule: dict[str, Any]
) -> None:
    body = single()
    body["schedules"] = [schedule]
    try:
        TaskTemplate.from_dict(body)
        python_ok = True
    except TemplateValidationError:
        python_ok = False
    try:
        await conn.register_template(body)
        sql_ok = True
    except ValidationError as exc:
        assert exc.error_code == "invalid_template", exc
        sql_ok = False
    assert python_ok == sql_ok


async def test_unrelated_templates_keep_their_bodies(conn: db.Connection) -> None:
    # a template without schedules has no `schedules` key, as before
    body = single()
    await conn.register_template(body)
    stored = await conn.fetchval("SELECT template FROM tasker.named_tasks")
    assert "schedules" not in stored
    await conn.register_template(body)  # the same body again: a no-op
    await start(conn, single())
    assert await conn.list_schedules() == []
