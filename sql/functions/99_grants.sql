-- Least-privilege roles (docs/architecture.md, "Roles"; README, "Security"). `migrate`
-- re-applies this file after every change to the schema (tasker_pg/migrations.py), because
-- re-creating a function or view drops its grants. It:
--   1. gives schema tasker and every object in it to the NOLOGIN owner role;
--   2. revokes everything from PUBLIC and from the four roles (so the lists below are exact);
--   3. makes every entry point (function not starting with _) SECURITY DEFINER with a pinned
--      search_path, so it runs with the owner's rights and never resolves a name through a
--      schema the caller controls (pg_temp last: a temporary table cannot shadow a table);
--   4. grants EXECUTE and SELECT per role, by name (every overload of a name).
-- The role names are <prefix>tasker_owner, ... with the prefix recorded in tasker.roles_config
-- (migrate --role-prefix); format('%I') quotes them. migrate creates the roles first.
--
-- A new public function gets no grant until it is listed here: add its name to the role lists
-- below (or to owner_only with the reason); tests/sql/test_roles.py fails until then.
-- Internal helpers (_name) keep the caller's context: they are only reached from the entry
-- points, already as the owner with the pinned search_path, and SQL helpers stay inlinable.
DO $grants$
DECLARE
    v_prefix   text := coalesce((SELECT c.role_prefix FROM tasker.roles_config c), '');
    v_owner    text := v_prefix || 'tasker_owner';
    v_worker   text := v_prefix || 'tasker_worker';
    v_client   text := v_prefix || 'tasker_client';
    v_operator text := v_prefix || 'tasker_operator';
    v_reader   text := v_prefix || 'tasker_reader';
    v_roles    text;
    -- Workers: claim, complete, extend, release; register their --templates; queue metrics
    -- (a worker checks at start that its namespaces have queues).
    -- Maintenance calls workers make (repair, later retention and schedules) go here too.
    c_worker   CONSTANT text[] := ARRAY[
        'claim_steps', 'complete_steps', 'complete_and_claim', 'extend_leases', 'release_steps',
        'register_template', 'metrics', 'metrics_all',
        -- maintenance: re-send lost messages, the worker's own row, old rows of gone workers
        'repair_messages', 'worker_heartbeat', 'cleanup_workers',
        -- the dependency results a partial claim row left out (a convergence after a fan-out)
        'dependency_results',
        -- retention: deletes finished tasks by the namespaces' policies (one worker at a time)
        'purge_finished',
        -- the engine's gauges (a worker's exporter, `tasker-pg worker --export-engine-metrics`)
        'engine_metrics',
        -- schedules: creates the tasks of due slots (one worker at a time)
        'fire_due_schedules',
        -- durable waits: sleeps and timeouts woken periodically (one worker at a time), and
        -- events a handler emits
        'wake_waits', 'emit_event'
    ];
    -- Read-only inspection: readiness, counts, effective state, invariants, queue metrics.
    c_reader   CONSTANT text[] := ARRAY[
        'step_readiness', 'task_execution_context', 'effective_task_state',
        'check_invariants', 'metrics', 'metrics_all',
        -- how long each namespace keeps its tasks
        'retention_policies',
        -- the engine's gauges (`tasker-pg metrics`, `tasker-pg health`, `tasker-pg top`)
        'engine_metrics', 'step_durations',
        -- schedules, their next and last fire; a cron expression's next slot
        'list_schedules', 'cron_next'
    ];
    -- Clients: create tasks (one, many, or with the created flag) and cancel them, plus reading.
    c_client   CONSTANT text[] := ARRAY[
        'create_task', 'create_tasks', 'create_or_get_task', 'cancel_task',
        -- completes the steps waiting on an event (a webhook, an approval)
        'emit_event'
    ];
    -- Operators: the client's rights plus the repairs an operator makes.
    c_operator CONSTANT text[] := ARRAY[
        'retry_step', 'retry_failed', 'resolve_step', 'repair_messages', 'cleanup_workers',
        -- retention: the policies, and a purge run by hand (tasker-pg maintenance)
        'set_retention_policy', 'clear_retention_policy', 'purge_finished',
        -- schedules: create, change, fire now, backfill, and fire what is due by hand
        'create_schedule', 'pause_schedule', 'resume_schedule', 'delete_schedule',
        'trigger_schedule', 'backfill_schedule', 'fire_due_schedules',
        -- durable waits: wake due sleeps and timeouts by hand
        'wake_waits',
        -- flow control: the rate limits steps name
        'set_rate_limit', 'delete_rate_limit'
    ];
    -- Owner only: the raw queue API. The engine's queues are its internal state (a pop or an
    -- archive on one strands a step); whoever uses the queue layer for queues of their own
    -- grants EXECUTE on these to their own role.
    c_owner_only CONSTANT text[] := ARRAY[
        'create_queue', 'drop_queue', 'purge_queue', 'send', 'send_batch', 'read', 'pop',
        'set_vt', 'delete', 'archive'
    ];
    -- Views: every role that reads tasks gets all of them; workers read templates only.
    c_views    CONSTANT text[] := ARRAY[
        'v_tasks', 'v_steps', 'v_templates', 'v_step_transitions', 'v_task_transitions',
        'v_workers', 'v_waits', 'v_flow_lanes', 'v_rate_limits'
    ];
    -- Bookkeeping of migrate, read by every connection's schema check (tasker_pg.db); no
    -- engine data. The only tables any role may read directly.
    c_bookkeeping CONSTANT text[] := ARRAY['schema_migrations', 'schema_functions', 'schema_engine'];
    r record;
    v_name text;
BEGIN
    FOREACH v_name IN ARRAY ARRAY[v_owner, v_worker, v_client, v_operator, v_reader] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_name) THEN
            RAISE EXCEPTION 'role % does not exist', v_name
                USING HINT = 'run `tasker-pg migrate` (it creates the roles) as a user with CREATEROLE';
        END IF;
    END LOOP;
    v_roles := format('%I, %I, %I, %I', v_worker, v_client, v_operator, v_reader);

    -- 1. ownership
    EXECUTE format('ALTER SCHEMA tasker OWNER TO %I', v_owner);
    FOR r IN
        SELECT c.oid::regclass AS obj, c.relkind
          FROM pg_class c
         WHERE c.relnamespace = 'tasker'::regnamespace
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
           AND pg_get_userbyid(c.relowner) <> v_owner
           -- sequences owned by a column follow their table
           AND NOT (c.relkind = 'S' AND EXISTS (
                 SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype IN ('a', 'i')))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I',
                       CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                      WHEN 'm' THEN 'MATERIALIZED VIEW'
                                      WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
                       r.obj, v_owner);
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS obj, p.prokind
          FROM pg_proc p
         WHERE p.pronamespace = 'tasker'::regnamespace
           AND pg_get_userbyid(p.proowner) <> v_owner
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I',
                       CASE r.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END,
                       r.obj, v_owner);
    END LOOP;
    FOR r IN
        SELECT t.oid::regtype AS obj
          FROM pg_type t
         WHERE t.typnamespace = 'tasker'::regnamespace
           AND pg_get_userbyid(t.typowner) <> v_owner
           AND (t.typtype IN ('e', 'd', 'r')
                OR (t.typtype = 'c'
                    AND (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c'))
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO %I', r.obj, v_owner);
    END LOOP;

    -- 2. nothing for PUBLIC, nothing implicit for the roles
    EXECUTE format('REVOKE ALL ON SCHEMA tasker FROM PUBLIC, %s', v_roles);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA tasker FROM PUBLIC, %s', v_roles);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA tasker FROM PUBLIC, %s', v_roles);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA tasker FROM PUBLIC, %s', v_roles);
    EXECUTE format('REVOKE ALL ON ALL PROCEDURES IN SCHEMA tasker FROM PUBLIC, %s', v_roles);

    -- 3. entry points run as the owner, with a search_path nobody else can write to
    FOR r IN
        SELECT p.oid::regprocedure AS obj, p.prokind
          FROM pg_proc p
         WHERE p.pronamespace = 'tasker'::regnamespace
           AND left(p.proname, 1) <> '_'
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER %s %s SECURITY DEFINER SET search_path = pg_catalog, tasker, pg_temp',
                       CASE r.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, r.obj);
    END LOOP;

    -- 4. grants, per role
    EXECUTE format('GRANT USAGE ON SCHEMA tasker TO %s', v_roles);
    FOR r IN
        SELECT p.oid::regprocedure AS obj, p.proname,
               array_remove(ARRAY[
                   CASE WHEN p.proname = ANY (c_worker) THEN v_worker END,
                   CASE WHEN p.proname = ANY (c_reader) THEN v_reader END,
                   CASE WHEN p.proname = ANY (c_client || c_reader) THEN v_client END,
                   CASE WHEN p.proname = ANY (c_operator || c_client || c_reader)
                        THEN v_operator END
               ], NULL) AS grantees
          FROM pg_proc p
         WHERE p.pronamespace = 'tasker'::regnamespace
           AND left(p.proname, 1) <> '_'
    LOOP
        CONTINUE WHEN cardinality(r.grantees) = 0;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', r.obj,
                       (SELECT string_agg(quote_ident(g), ', ') FROM unnest(r.grantees) g));
    END LOOP;
    FOREACH v_name IN ARRAY c_views LOOP
        EXECUTE format('GRANT SELECT ON tasker.%I TO %I, %I, %I', v_name, v_client, v_operator,
                       v_reader);
    END LOOP;
    EXECUTE format('GRANT SELECT ON tasker.v_templates TO %I', v_worker);
    -- The semantic-version precedence key: pure, and what a template list is ordered by
    -- (ORDER BY ... tasker._semver_pre_key(version_pre) in tasker_pg/queries.py and db.py).
    EXECUTE format('GRANT EXECUTE ON FUNCTION tasker._semver_pre_key(text) TO %s', v_roles);
    FOREACH v_name IN ARRAY c_bookkeeping LOOP
        EXECUTE format('GRANT SELECT ON tasker.%I TO %s', v_name, v_roles);
    END LOOP;

    -- every name listed above must exist: a stale list is a mistake, not a no-op
    FOREACH v_name IN ARRAY c_worker || c_reader || c_client || c_operator || c_owner_only LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_proc p
                        WHERE p.pronamespace = 'tasker'::regnamespace AND p.proname = v_name) THEN
            RAISE EXCEPTION 'sql/functions/99_grants.sql lists tasker.%, which does not exist', v_name
                USING HINT = 'remove it from the list, or restore the function';
        END IF;
    END LOOP;
END
$grants$;
