"""Least-privilege roles (sql/functions/99_grants.sql, docs/architecture.md "Roles").

Every public function has an explicit grant (or is listed here as owner-only); each role logs in
through a LOGIN member with a password and may do what its list says and nothing else, no
table included; the entry points run with a pinned search_path, so an object planted in
`public` by an unprivileged user is never picked up; the role prefix is recorded and kept.

Roles are cluster-wide: the template database is migrated with no prefix, so every per-test
database shares tasker_owner, tasker_worker, ... Login roles made here have unique names and
are dropped afterwards; the prefix tests use a prefix unique to the test run.
"""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from tasker_pg import AsyncTaskerClient, Worker, db, migrations
from tasker_pg.errors import DatabaseError, MigrationError
from tests.support import pgserver
from tests.support.engine import NAMESPACE, claim, diamond, single, start, success
from tests.support.worker import registry_of, templates
from tests.support.workflows import math_handlers

ROLES = ("worker", "client", "operator", "reader")

# Public functions that no role may execute, and why. Everything else needs a grant in
# sql/functions/99_grants.sql.
OWNER_ONLY = {
    # The raw queue API: the engine's queues are its internal state, and a pop, delete, archive,
    # read or set_vt on one strands a step (issue 10, item 5). Whoever uses the queue layer for
    # queues of their own grants these to their own role.
    "create_queue": "raw queue API",
    "drop_queue": "raw queue API",
    "purge_queue": "raw queue API",
    "send": "raw queue API",
    "send_batch": "raw queue API",
    "read": "raw queue API",
    "pop": "raw queue API",
    "set_vt": "raw queue API",
    "delete": "raw queue API",
    "archive": "raw queue API",
}

PINNED_SEARCH_PATH = "search_path=pg_catalog, tasker, pg_temp"

# Bookkeeping tables of migrate, readable by every role (the schema check on connect reads
# them); no role may read any other table.
BOOKKEEPING = {"schema_migrations", "schema_functions", "schema_engine"}

_FUNCTIONS_SQL = """
SELECT p.proname AS name, p.oid::regprocedure::text AS signature, p.prosecdef,
       coalesce(p.proconfig, '{}') AS config, pg_get_userbyid(p.proowner) AS owner,
       ARRAY(SELECT coalesce(pg_get_userbyid(nullif(a.grantee, 0)), 'PUBLIC')
               FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
              WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner) AS grantees
  FROM pg_proc p
 WHERE p.pronamespace = 'tasker'::regnamespace AND left(p.proname, 1) <> '_'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
 ORDER BY 1, 2
"""

_TABLES_SQL = """
SELECT c.oid::regclass::text AS rel, c.relname AS name,
       (SELECT a.attname FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attidentity = '' AND a.attgenerated = ''
         ORDER BY a.attnum LIMIT 1) AS col
  FROM pg_class c
 WHERE c.relnamespace = 'tasker'::regnamespace AND c.relkind IN ('r', 'p')
 ORDER BY 1
"""


def _as_user(dsn: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    host = parts.hostname or "localhost"
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


Login = Callable[..., Awaitable[db.Connection]]
LoginDsn = Callable[..., Awaitable[str]]


@pytest.fixture
async def login_dsn(dsn: str) -> AsyncIterator[LoginDsn]:
    """`await login_dsn("worker")`: the DSN of a new LOGIN role with a password that is a
    member of tasker_worker (and of any other kinds given); dropped afterwards."""
    admin = await asyncpg.connect(dsn)
    made: list[str] = []

    async def _make(*kinds: str, prefix: str = "") -> str:
        name = f"h10_{'_'.join(kinds) or 'nobody'}_{uuid.uuid4().hex[:8]}"
        password = uuid.uuid4().hex
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        made.append(name)
        for kind in kinds:
            await admin.execute(f"GRANT {migrations.role_name(prefix, kind)} TO {name}")
        return _as_user(dsn, name, password)

    try:
        yield _make
    finally:
        # their sessions are closed by now (the tests' fixtures and context managers)
        for name in made:
            await admin.execute(f"DROP OWNED BY {name}")
            await admin.execute(f"DROP ROLE {name}")
        await admin.close()


@pytest.fixture
async def login(login_dsn: LoginDsn) -> AsyncIterator[Login]:
    """`await login("worker")`: a connection as a new LOGIN member of tasker_worker."""
    conns: list[db.Connection] = []

    async def _login(*kinds: str) -> db.Connection:
        conn = await db.connect(await login_dsn(*kinds), check_schema=bool(kinds))
        conns.append(conn)
        return conn

    try:
        yield _login
    finally:
        for conn in conns:
            await conn.close()


async def _refused(call: Awaitable[Any]) -> None:
    with pytest.raises(DatabaseError) as err:
        await call
    assert err.value.sqlstate == "42501", f"expected permission denied, got {err.value}"


async def _allowed(call: Awaitable[Any]) -> Any:
    return await call


# --- the grants file covers everything ------------------------------------------------------


async def test_every_public_function_has_an_explicit_grant(conn: db.Connection) -> None:
    rows = await conn.fetch(_FUNCTIONS_SQL)
    assert rows
    role_names = {migrations.role_name("", k) for k in ROLES}
    ungranted = [
        r["signature"]
        for r in rows
        if not role_names & set(r["grantees"]) and r["name"] not in OWNER_ONLY
    ]
    assert not ungranted, (
        "public functions without a grant to any role: "
        + ", ".join(ungranted)
        + ". Add each name to the list of the role(s) that may call it (c_worker, c_client, "
        "c_operator or c_reader) in sql/functions/99_grants.sql; or, if no role may call it, "
        "to c_owner_only there and to OWNER_ONLY in tests/sql/test_roles.py with the reason"
    )
    granted_owner_only = [
        r["signature"] for r in rows if r["name"] in OWNER_ONLY and set(r["grantees"])
    ]
    assert not granted_owner_only, f"owner-only functions granted to someone: {granted_owner_only}"
    stale = set(OWNER_ONLY) - {r["name"] for r in rows}
    assert not stale, f"OWNER_ONLY names functions that do not exist: {sorted(stale)}"


async def test_public_is_revoked_and_entry_points_are_definers_with_a_pinned_path(
    conn: db.Connection,
) -> None:
    rows = await conn.fetch(_FUNCTIONS_SQL)
    public = [r["signature"] for r in rows if "PUBLIC" in r["grantees"]]
    assert not public, f"PUBLIC may execute: {public}"
    not_definer = [r["signature"] for r in rows if not r["prosecdef"]]
    assert not not_definer, f"entry points that are not SECURITY DEFINER: {not_definer}"
    unpinned = [r["signature"] for r in rows if PINNED_SEARCH_PATH not in r["config"]]
    assert not unpinned, f"entry points without {PINNED_SEARCH_PATH}: {unpinned}"
    foreign = await conn.fetch(
        """
        SELECT c.oid::regclass::text AS obj FROM pg_class c
         WHERE c.relnamespace = 'tasker'::regnamespace
           AND pg_get_userbyid(c.relowner) <> 'tasker_owner'
        UNION ALL
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'tasker'::regnamespace
           AND pg_get_userbyid(p.proowner) <> 'tasker_owner'
        UNION ALL
        SELECT 'schema tasker' FROM pg_namespace n
         WHERE n.nspname = 'tasker' AND pg_get_userbyid(n.nspowner) <> 'tasker_owner'
        """
    )
    assert not foreign, f"objects not owned by tasker_owner: {[r['obj'] for r in foreign]}"
    roles = await conn.fetch(
        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY ($1::text[])",
        [migrations.role_name("", k) for k in migrations.ROLE_KINDS],
    )
    assert {r["rolname"] for r in roles} == {
        migrations.role_name("", k) for k in migrations.ROLE_KINDS
    }
    assert not any(r["rolcanlogin"] for r in roles), "group roles must be NOLOGIN"


async def test_migrate_gives_the_owner_a_sequence_another_user_made(
    conn: db.Connection, login: Login
) -> None:
    """Ownership covers standalone sequences, not only those a column owns: the sequence of a
    queue made before the roles existed (or one a migration creates) belongs to the migrating
    user until the grants file hands it to the owner, and the entry points, which run as the
    owner, draw message ids from it. 99_grants:88:del_and:0 (every sequence taken for one a
    column owns) left it with the migrating user, and a client's create_task failed."""
    await start(conn, single())
    seq = f"tasker.q_{NAMESPACE}_seq"
    owner_sql = "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = $1::regclass"
    await conn.execute(f"ALTER SEQUENCE {seq} OWNER TO CURRENT_USER")
    assert await conn.fetchval(owner_sql, seq) == await conn.fetchval("SELECT current_user")
    # the grants file runs again at the next migrate that changes anything
    await conn.execute("DELETE FROM tasker.schema_functions WHERE file = '99_grants.sql'")
    report = await migrations.migrate(conn)
    assert [f.name for f in report.functions] == ["99_grants.sql"]
    assert await conn.fetchval(owner_sql, seq) == "tasker_owner"
    client = await login("client")
    task = await client.create_task(NAMESPACE, "single", {})
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM tasker.steps WHERE task_uuid = $1 AND state = 'enqueued'", task
        )
        == 1
    )


# --- per role: what it may do works, everything else is refused ---------------------------


async def _assert_no_table_access(conn: db.Connection) -> None:
    """INSERT, UPDATE, DELETE and TRUNCATE are refused on every table, SELECT on every table
    but the migrate bookkeeping."""
    tables = await conn.fetch(_TABLES_SQL)
    assert len(tables) >= 10
    for t in tables:
        rel, col = t["rel"], t["col"]
        await _refused(conn.execute(f"INSERT INTO {rel} DEFAULT VALUES"))
        await _refused(conn.execute(f"UPDATE {rel} SET {col} = {col} WHERE false"))
        await _refused(conn.execute(f"DELETE FROM {rel} WHERE false"))
        await _refused(conn.execute(f"TRUNCATE {rel}"))
        if t["name"] in BOOKKEEPING:
            await conn.fetch(f"SELECT * FROM {rel} LIMIT 1")
        else:
            await _refused(conn.fetch(f"SELECT * FROM {rel} LIMIT 1"))


async def _assert_raw_queue_refused(conn: db.Connection) -> None:
    await _refused(conn.fetch("SELECT * FROM tasker.pop($1, 1)", NAMESPACE))
    await _refused(conn.fetch("SELECT * FROM tasker.read($1, 30, 1)", NAMESPACE))
    await _refused(conn.fetchval("SELECT tasker.send($1, '{}')", NAMESPACE))
    await _refused(conn.fetchval("SELECT tasker.archive($1, 1::bigint)", NAMESPACE))
    await _refused(conn.fetchval("SELECT tasker.delete($1, 1::bigint)", NAMESPACE))
    await _refused(conn.fetchval("SELECT tasker.purge_queue($1)", NAMESPACE))
    await _refused(conn.fetchval("SELECT tasker.drop_queue($1)", NAMESPACE))


async def test_worker_claims_completes_extends_releases_and_nothing_else(
    conn: db.Connection, login: Login
) -> None:
    worker = await login("worker")
    tpl = diamond()
    await worker.register_template(tpl)  # a worker registers its --templates
    assert {t["name"] for t in await worker.latest_templates([NAMESPACE])} == {tpl["name"]}
    assert NAMESPACE in {m.queue_name for m in await worker.metrics_all()}
    task = await conn.create_task(NAMESPACE, tpl["name"], {})
    rows = await claim(worker)
    assert [r["step_name"] for r in rows] == ["start"]
    fence = {k: rows[0][k] for k in ("attempt", "claim_seq")}
    fence["step_uuid"] = str(rows[0]["step_uuid"])
    extended = await worker.extend_leases([fence], 30.0)
    assert [r["extended"] for r in extended] == [True]
    done = await worker.complete_steps([success(rows[0])])
    assert [r["status"] for r in done] == ["applied"]
    rows = await claim(worker)
    assert sorted(r["step_name"] for r in rows) == ["b", "c"]
    # what a partial claim row left out (tasker.dependency_results)
    assert [n for n, _ in await worker.dependency_results(rows[0]["step_uuid"])] == ["start"]
    released = await worker.release_steps(
        [
            {"step_uuid": str(r["step_uuid"]), "attempt": r["attempt"], "claim_seq": r["claim_seq"]}
            for r in rows
        ]
    )
    assert all(r["released"] for r in released)

    await _refused(worker.create_task(NAMESPACE, tpl["name"], {}))
    await _refused(worker.cancel_task(task))
    await _refused(worker.retry_step(rows[0]["step_uuid"]))
    await _refused(worker.retry_failed(NAMESPACE))
    await _refused(worker.resolve_step(rows[0]["step_uuid"]))
    await _refused(worker.step_readiness(task))
    await _refused(worker.check_invariants())
    await _refused(worker.fetch("SELECT * FROM tasker.v_tasks"))
    await _refused(worker.fetch("SELECT * FROM tasker.v_step_transitions"))
    await _assert_raw_queue_refused(worker)
    await _assert_no_table_access(worker)


async def _client_rights(client: db.Connection, conn: db.Connection) -> uuid.UUID:
    """What a client may do; returns a task in error (its step failed for good)."""
    tpl = single(retry={"max_attempts": 1})
    await conn.register_template(tpl)
    task = await client.create_task(NAMESPACE, tpl["name"], {"n": 1})
    again = await client.create_or_get_task(
        NAMESPACE, tpl["name"], {"n": 2}, options={"idempotency_key": "k1"}
    )
    assert again[1]
    many = await client.create_tasks(NAMESPACE, tpl["name"], [{"n": 3}, {"n": 4}])
    assert len(many) == 2
    cancelled = await client.cancel_task(many[0], "not needed")
    assert cancelled["state"] == "cancelled"
    state = await client.fetchval("SELECT state FROM tasker.v_tasks WHERE task_uuid = $1", task)
    assert state == "pending"
    steps = await client.fetch("SELECT * FROM tasker.v_steps WHERE task_uuid = $1", task)
    assert [s["name"] for s in steps] == ["only"]
    assert [r["name"] for r in await client.step_readiness(task)] == ["only"]
    assert await client.fetch("SELECT * FROM tasker.v_step_transitions WHERE task_uuid = $1", task)
    assert await client.fetch(
        "SELECT * FROM tasker.v_task_transitions WHERE task_uuid = $1", many[0]
    )
    assert await client.fetch("SELECT * FROM tasker.v_templates WHERE name = $1", tpl["name"])
    # let the task's step fail for good, for the operator's retry
    rows = await claim(conn)
    failed = [r for r in rows if r["task_uuid"] == task]
    await conn.complete_steps(
        [
            {
                "step_uuid": str(failed[0]["step_uuid"]),
                "attempt": failed[0]["attempt"],
                "claim_seq": failed[0]["claim_seq"],
                "kind": "failure",
                "worker_id": "w1",
                "error": {"message": "boom", "error_type": "E", "retryable": False},
            }
        ]
    )
    return task


async def _worker_rights_refused(who: db.Connection) -> None:
    await _refused(who.register_template(single(name="not_mine")))
    await _refused(claim(who))
    await _refused(who.complete_steps([]))
    await _refused(who.extend_leases([], 30.0))
    await _refused(who.release_steps([]))
    await _refused(who.dependency_results(uuid.uuid4()))


async def test_client_creates_reads_and_cancels_and_nothing_else(
    conn: db.Connection, login: Login
) -> None:
    client = await login("client")
    task = await _client_rights(client, conn)
    step = await conn.fetchval("SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1", task)
    await _refused(client.retry_step(step))
    await _refused(client.retry_failed(NAMESPACE))
    await _refused(client.retry_failed(NAMESPACE, dry_run=True))
    await _refused(client.resolve_step(step))
    await _worker_rights_refused(client)
    await _assert_raw_queue_refused(client)
    await _assert_no_table_access(client)


async def test_operator_has_the_clients_rights_plus_retry_and_resolve(
    conn: db.Connection, login: Login
) -> None:
    operator = await login("operator")
    task = await _client_rights(operator, conn)
    step = await conn.fetchval("SELECT step_uuid FROM tasker.steps WHERE task_uuid = $1", task)
    dry = await operator.retry_failed(NAMESPACE, dry_run=True)
    assert [(r["task_uuid"], r["retried"]) for r in dry] == [(task, False)]
    assert (await operator.retry_step(step))["state"] == "enqueued"
    rows = [r for r in await claim(conn) if r["task_uuid"] == task]
    await conn.complete_steps(
        [
            {
                "step_uuid": str(rows[0]["step_uuid"]),
                "attempt": rows[0]["attempt"],
                "claim_seq": rows[0]["claim_seq"],
                "kind": "failure",
                "worker_id": "w1",
                "error": {"message": "boom", "error_type": "E", "retryable": False},
            }
        ]
    )
    # the bulk retry records who asked: the login, not the definer that runs the function
    [redriven] = await operator.retry_failed(NAMESPACE, reason="after the fix")
    assert (redriven["task_uuid"], redriven["retried"]) == (task, True)
    login_name = await operator.fetchval("SELECT session_user::text")
    assert login_name.startswith("h10_operator_")
    audit = await operator.fetchval(
        "SELECT metadata FROM tasker.v_step_transitions WHERE step_uuid = $1"
        " AND event = 'retry_requested' ORDER BY created_at DESC LIMIT 1",
        step,
    )
    assert audit == {"operation": "retry_failed", "by": login_name, "reason": "after the fix"}
    rows = [r for r in await claim(conn) if r["task_uuid"] == task]
    await conn.complete_steps(
        [
            {
                "step_uuid": str(rows[0]["step_uuid"]),
                "attempt": rows[0]["attempt"],
                "claim_seq": rows[0]["claim_seq"],
                "kind": "failure",
                "worker_id": "w1",
                "error": {"message": "boom", "error_type": "E", "retryable": False},
            }
        ]
    )
    await operator.resolve_step(step, {"by": "hand"})
    state = await operator.fetchval("SELECT state FROM tasker.v_tasks WHERE task_uuid = $1", task)
    assert state == "complete"
    assert await operator.check_invariants() == []
    await _worker_rights_refused(operator)
    await _assert_raw_queue_refused(operator)
    await _assert_no_table_access(operator)


async def test_reader_reads_views_readiness_and_audit_and_changes_nothing(
    conn: db.Connection, login: Login
) -> None:
    reader = await login("reader")
    tpl = single()
    task = await start(conn, tpl)
    assert [r["task_uuid"] for r in await reader.fetch("SELECT * FROM tasker.v_tasks")] == [task]
    assert len(await reader.fetch("SELECT * FROM tasker.v_steps")) == 1
    assert await reader.fetch("SELECT * FROM tasker.v_step_transitions")
    assert await reader.fetch("SELECT * FROM tasker.v_templates")
    step = await reader.fetchval("SELECT step_uuid FROM tasker.v_steps")
    assert [r["name"] for r in await reader.step_readiness(task)] == ["only"]
    assert await reader.check_invariants() == []
    # v_tasks writes effective_task_state's rule out (a definer function is never inlined):
    # both agree on a pending task, one in process and a finished one
    busy = await start(conn, single(name="busy"))
    await claim(conn)
    done = await start(conn, single(name="done"))
    await conn.cancel_task(done)
    disagree = await reader.fetch(
        "SELECT task_uuid, state, tasker.effective_task_state(task_uuid, raw_state) AS fn"
        " FROM tasker.v_tasks WHERE state IS DISTINCT FROM"
        " tasker.effective_task_state(task_uuid, raw_state)"
    )
    assert disagree == []
    states = {
        r["task_uuid"]: r["state"] for r in await reader.fetch("SELECT * FROM tasker.v_tasks")
    }
    assert {states[busy], states[done]} == {"steps_in_process", "cancelled"}
    await _refused(reader.create_task(NAMESPACE, tpl["name"], {}))
    await _refused(reader.cancel_task(task))
    await _refused(reader.retry_step(step))
    await _refused(reader.retry_failed(NAMESPACE, dry_run=True))
    await _refused(reader.resolve_step(step))
    await _worker_rights_refused(reader)
    await _assert_raw_queue_refused(reader)
    await _assert_no_table_access(reader)


async def test_a_login_without_a_role_can_do_nothing(conn: db.Connection, login: Login) -> None:
    nobody = await login()
    await _refused(nobody.fetch("SELECT * FROM tasker.v_tasks"))
    await _refused(nobody.fetchval("SELECT tasker.create_task('x', 'y')"))


_SET_POLICY = "SELECT * FROM tasker.set_retention_policy('flows', interval '30 days')"
_CLEAR_POLICY = "SELECT tasker.clear_retention_policy('flows')"
_LIST_POLICIES = "SELECT * FROM tasker.retention_policies()"
_PURGE = "SELECT * FROM tasker.purge_finished(10)"


async def test_retention_rights_per_role(conn: db.Connection, login: Login) -> None:
    """Purging: workers (their retention loop) and operators (`tasker-pg maintenance`);
    setting and clearing a policy: operators; reading the policies: readers, clients and
    operators."""
    worker, client, operator, reader = [await login(kind) for kind in ROLES]
    (task,) = await conn.create_tasks(NAMESPACE, (await _registered(conn))["name"], [{}])
    await conn.cancel_task(task)
    await conn.execute("UPDATE tasker.tasks SET completed_at = completed_at - interval '40 days'")

    await _refused(client.fetch(_SET_POLICY))
    await _refused(reader.fetch(_SET_POLICY))
    await _refused(worker.fetch(_SET_POLICY))
    assert [r["namespace"] for r in await operator.fetch(_SET_POLICY)] == [NAMESPACE]
    for who in (client, reader, operator):
        assert [r["namespace"] for r in await who.fetch(_LIST_POLICIES)] == [NAMESPACE]
    await _refused(worker.fetch(_LIST_POLICIES))
    for who in (client, reader):
        await _refused(who.fetch(_PURGE))
        await _refused(who.fetchval(_CLEAR_POLICY))
    await _refused(worker.fetchval(_CLEAR_POLICY))
    assert (await worker.purge_finished(10)).tasks == 1
    assert (await operator.purge_finished(10)).tasks == 0
    assert await operator.fetchval(_CLEAR_POLICY) is True
    assert await conn.fetchval("SELECT count(*) FROM tasker.tasks") == 0


async def _registered(conn: db.Connection) -> dict[str, Any]:
    tpl = single()
    await conn.register_template(tpl)
    return tpl


async def test_audit_tables_are_append_only_to_all_but_the_owner(
    conn: db.Connection, login: Login
) -> None:
    await start(conn, single())
    owner = await login("owner")
    # the owner may rewrite its audit tables (retention); no other role may, checked above
    await owner.execute("SET ROLE tasker_owner")
    assert await owner.execute("DELETE FROM tasker.step_transitions") != "DELETE 0"


# --- the worker and the client, as their roles ----------------------------------------


async def test_worker_and_client_run_as_their_roles(
    conn: db.Connection, login_dsn: LoginDsn
) -> None:
    """A Worker logged in as a tasker_worker member registers its templates and runs tasks a
    tasker_client member creates, waits for, lists and inspects through the client."""
    worker_dsn, client_dsn, operator_dsn = (
        await login_dsn("worker"),
        await login_dsn("client"),
        await login_dsn("operator"),
    )
    async with Worker(
        ["math"],
        registry_of(math_handlers),
        dsn=worker_dsn,
        templates=templates("diamond"),
        concurrency=4,
        poll_interval=0.1,
        summary_interval=0,
    ):
        client = AsyncTaskerClient(client_dsn)
        try:
            created = await client.create_task(
                "diamond_workflow", namespace="math", context={"even_number": 6}
            )
            done = await client.wait_for_task(created.task_uuid, timeout=60)
            assert done.status == "complete"
            page = await client.list_tasks(namespace="math", status="complete")
            assert [t.task_uuid for t in page.tasks] == [created.task_uuid]
            steps = await client.list_task_steps(created.task_uuid)
            assert {s.current_state for s in steps} == {"complete"}
            audit = await client.get_step_audit_history(created.task_uuid, steps[0].step_uuid)
            assert audit
            with pytest.raises(DatabaseError):
                await client.retry_step(steps[0].step_uuid)
        finally:
            await client.close()
    operator = AsyncTaskerClient(operator_dsn)
    try:
        assert (await operator.get_task(created.task_uuid)).status == "complete"
    finally:
        await operator.close()
    assert await conn.check_invariants() == []


# --- pinned search_path -------------------------------------------------------------------


async def test_objects_planted_in_public_are_not_picked_up(
    conn: db.Connection, dsn: str, login: Login
) -> None:
    """An unprivileged user plants a function and an operator in `public` that would shadow
    what the engine's functions call unqualified, puts `public` first on its search_path and
    calls the engine: the planted objects must never run (they would run as the owner)."""
    tpl = single()
    await conn.register_template(tpl)
    attacker = await login("client")
    user = await attacker.fetchval("SELECT current_user")
    await conn.execute(f"GRANT CREATE ON SCHEMA public TO {user}")  # as on PostgreSQL < 15
    await attacker.execute(
        """
        CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'planted now() ran as %', current_user; END $$;
        CREATE FUNCTION public.planted_texteq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'planted text = text ran as %', current_user; END $$;
        CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text,
                                  FUNCTION = public.planted_texteq);
        CREATE FUNCTION public.jsonb_typeof(jsonb) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'planted jsonb_typeof ran as %', current_user; END $$;
        """
    )
    await attacker.execute("SET search_path = public, pg_catalog, tasker")
    # the planted objects are live in the attacker's own statements
    with pytest.raises(DatabaseError, match="planted"):
        await attacker.fetchval("SELECT 'a'::text = 'b'::text")
    task = await attacker.create_task(NAMESPACE, tpl["name"], {"n": 1})
    await attacker.cancel_task(task, "done")
    assert await attacker.fetch("SELECT * FROM tasker.v_tasks WHERE task_uuid = $1", task)
    assert await attacker.step_readiness(task)


# --- the prefix --------------------------------------------------------------------------


@pytest.fixture
async def prefixed(pg_server: pgserver.TestServer) -> AsyncIterator[tuple[str, str]]:
    """(dsn, prefix): an unmigrated database and a role prefix unique to this test; the
    database and the prefixed roles are dropped afterwards."""
    prefix = f"t{os.getpid()}_{uuid.uuid4().hex[:6]}_"
    dsn = await pg_server.create_database(from_template=False)
    try:
        yield dsn, prefix
    finally:
        # dropped here and now (not handed back for a later drop): the roles own its objects
        name = urllib.parse.urlsplit(dsn).path.lstrip("/")
        admin = await asyncpg.connect(pg_server.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for kind in migrations.ROLE_KINDS:
                await admin.execute(f"DROP ROLE IF EXISTS {migrations.role_name(prefix, kind)}")
        finally:
            await admin.close()


async def test_role_prefix_is_recorded_used_and_kept(prefixed: tuple[str, str]) -> None:
    dsn, prefix = prefixed
    conn = await db.connect(dsn, check_schema=False)
    try:
        await migrations.migrate(conn, role_prefix=prefix)
        assert await migrations.role_prefix(conn) == prefix
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'tasker'"
        )
        assert owner == f"{prefix}tasker_owner"
        grantees = await conn.fetchval(
            "SELECT array_agg(pg_get_userbyid(a.grantee) ORDER BY 1) FROM pg_proc p,"
            " aclexplode(p.proacl) a WHERE p.oid = 'tasker.claim_steps'::regproc"
        )
        assert f"{prefix}tasker_worker" in grantees
        assert "tasker_worker" not in grantees
        with pytest.raises(MigrationError, match="prefix"):
            await migrations.migrate(conn, role_prefix="other_")
        report = await migrations.migrate(conn)  # no prefix given: the recorded one
        assert not report.changed
        assert await migrations.role_prefix(conn) == prefix
    finally:
        await conn.close()


async def test_migrate_by_a_non_superuser_with_createrole(pg_server: pgserver.TestServer) -> None:
    """The production path: the migrating user owns the database and may create roles, but
    is no superuser; it becomes a member of the owner role, and the roles work."""
    prefix = f"n{os.getpid()}_{uuid.uuid4().hex[:6]}_"
    user, password = f"{prefix}migrator", uuid.uuid4().hex
    name = f"tasker_test_{prefix}db"
    admin = await asyncpg.connect(pg_server.admin_dsn)
    await admin.execute(f"CREATE ROLE {user} LOGIN CREATEROLE PASSWORD '{password}'")
    await admin.execute(f"CREATE DATABASE {name} OWNER {user}")
    dsn = _as_user(
        urllib.parse.urlunsplit(
            urllib.parse.urlsplit(pg_server.admin_dsn)._replace(path="/" + name)
        ),
        user,
        password,
    )
    try:
        conn = await db.connect(dsn, check_schema=False)
        try:
            await migrations.migrate(conn, role_prefix=prefix)
            assert not (await migrations.migrate(conn)).changed
            await conn.execute(f"CREATE ROLE {prefix}svc LOGIN PASSWORD '{password}'")
            await conn.execute(f"GRANT {prefix}tasker_worker TO {prefix}svc")
        finally:
            await conn.close()
        worker = await db.connect(_as_user(dsn, f"{prefix}svc", password))
        try:
            await worker.register_template(single())
            await _refused(worker.fetch("SELECT * FROM tasker.tasks"))
        finally:
            await worker.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        for role in [f"{prefix}svc", user] + [
            migrations.role_name(prefix, k) for k in migrations.ROLE_KINDS
        ]:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
