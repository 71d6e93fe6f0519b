-- Schedules: cron expressions parsed and evaluated in SQL, and the functions that create,
-- change, fire and list schedules (tasker.schedules, sql/migrations/0012_schedules.sql).
--
-- Cron: five fields (minute 0-59, hour 0-23, day of month 1-31, month 1-12 or JAN-DEC, day of
-- week 0-7 or SUN-SAT, 0 and 7 both Sunday), each a comma list of `*`, `N`, `N-M`, with an
-- optional `/STEP` (`N/STEP` runs from N to the field's end), or one of the aliases @yearly,
-- @annually, @monthly, @weekly, @daily, @midnight, @hourly. When both day fields are restricted
-- (neither starts with `*`) a day matches either of them, otherwise both (Vixie cron).
--
-- Slots are local wall-clock minutes in the schedule's time zone. A local time that does not
-- exist (the hour skipped when clocks go forward) fires at the next minute that does exist; a
-- local time that occurs twice (clocks go back) fires once, at its first occurrence. Every slot
-- fires through create_or_get_task with the idempotency key schedule:<name>:<slot>, <slot> the
-- UTC instant (2026-03-08T07:00:00Z), so a slot creates one task however many callers fire it.

-- The parsed form of a cron expression: the allowed values of each field (days of week 0-6,
-- Sunday 0), and whether each day field started with `*`.
CREATE TYPE tasker._cron AS (
    minutes   integer[],
    hours     integer[],
    doms      integer[],
    months    integer[],
    dows      integer[],
    dom_star  boolean,
    dow_star  boolean
);

-- The values one cron field allows, sorted; TV040 naming the field for anything else.
CREATE FUNCTION tasker._cron_field(p_field text, p_what text, p_lo integer, p_hi integer, p_names text[])
RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_item  text;
    v_m     text[];
    v_from  integer;
    v_to    integer;
    v_step  integer;
    v_out   integer[] := '{}';
    v_bad   text;
BEGIN
    FOREACH v_item IN ARRAY string_to_array(upper(p_field), ',') LOOP
        -- name or number, optionally a range, optionally a step
        v_m := regexp_match(v_item, '^(\*|[0-9]{1,2}|[A-Z]{3})(?:-([0-9]{1,2}|[A-Z]{3}))?(?:/([0-9]{1,2}))?$');
        IF v_m IS NULL OR (v_m[1] = '*' AND v_m[2] IS NOT NULL) THEN
            v_bad := format('%s is not *, N, N-M or one of them with /STEP', quote_literal(lower(v_item)));
            EXIT;
        END IF;
        IF v_m[1] = '*' THEN
            v_from := p_lo;
            v_to := p_hi;
        ELSE
            v_from := CASE WHEN v_m[1] ~ '^[0-9]' THEN v_m[1]::integer
                           ELSE array_position(p_names, v_m[1]) - 1 + p_lo END;
            v_to := CASE WHEN v_m[2] IS NULL THEN (CASE WHEN v_m[3] IS NULL THEN v_from ELSE p_hi END)
                         WHEN v_m[2] ~ '^[0-9]' THEN v_m[2]::integer
                         ELSE array_position(p_names, v_m[2]) - 1 + p_lo END;
        END IF;
        IF v_from IS NULL OR v_to IS NULL THEN
            v_bad := format('%s names no %s (names: %s)', quote_literal(lower(v_item)), p_what,
                            coalesce(lower(array_to_string(p_names, ', ')), 'none: numbers only'));
            EXIT;
        END IF;
        IF v_from < p_lo OR v_from > p_hi OR v_to < p_lo OR v_to > p_hi THEN
            v_bad := format('%s is out of range %s-%s', quote_literal(lower(v_item)), p_lo, p_hi);
            EXIT;
        END IF;
        IF v_from > v_to THEN
            v_bad := format('%s is a range that runs backwards', quote_literal(lower(v_item)));
            EXIT;
        END IF;
        v_step := coalesce(v_m[3]::integer, 1);
        IF v_step < 1 OR v_step > p_hi - p_lo + 1 THEN
            v_bad := format('%s has step %s; a step is from 1 to %s', quote_literal(lower(v_item)), v_step, p_hi - p_lo + 1);
            EXIT;
        END IF;
        v_out := v_out || ARRAY(SELECT generate_series(v_from, v_to, v_step));
    END LOOP;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'cron % field: %', p_what, v_bad USING ERRCODE = 'TV040';
    END IF;
    RETURN ARRAY(SELECT DISTINCT x FROM unnest(v_out) x ORDER BY x);
END
$$;

-- Parses a cron expression (TV040 for anything this file's header does not describe).
CREATE FUNCTION tasker._cron_parse(p_expr text) RETURNS tasker._cron
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_expr   text := lower(regexp_replace(left(coalesce(p_expr, ''), 65537), '^\s+|\s+$', '', 'g'));
    v_fields text[];
    v_c      tasker._cron;
BEGIN
    -- a huge value is refused before any pattern reads it
    IF octet_length(p_expr) > 65536 OR octet_length(v_expr) > 256 THEN
        RAISE EXCEPTION 'cron expression is % bytes; at most 256 are allowed',
            CASE WHEN octet_length(p_expr) > 65536 THEN octet_length(p_expr) ELSE octet_length(v_expr) END
            USING ERRCODE = 'TV040';
    END IF;
    v_expr := CASE v_expr
                  WHEN '@yearly' THEN '0 0 1 1 *' WHEN '@annually' THEN '0 0 1 1 *'
                  WHEN '@monthly' THEN '0 0 1 * *' WHEN '@weekly' THEN '0 0 * * 0'
                  WHEN '@daily' THEN '0 0 * * *' WHEN '@midnight' THEN '0 0 * * *'
                  WHEN '@hourly' THEN '0 * * * *' ELSE v_expr END;
    IF v_expr LIKE '@%' THEN
        RAISE EXCEPTION 'cron alias % is unknown (valid: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)',
            quote_literal(left(v_expr, 40)) USING ERRCODE = 'TV040';
    END IF;
    v_fields := regexp_split_to_array(v_expr, '\s+');
    IF cardinality(v_fields) <> 5 OR v_expr = '' THEN
        RAISE EXCEPTION 'cron expression % has % fields; expected 5: minute hour day-of-month month day-of-week (or an alias such as @hourly)',
            quote_literal(left(p_expr, 100)), CASE WHEN v_expr = '' THEN 0 ELSE cardinality(v_fields) END
            USING ERRCODE = 'TV040';
    END IF;
    v_c.minutes := tasker._cron_field(v_fields[1], 'minute', 0, 59, NULL);
    v_c.hours := tasker._cron_field(v_fields[2], 'hour', 0, 23, NULL);
    v_c.doms := tasker._cron_field(v_fields[3], 'day-of-month', 1, 31, NULL);
    v_c.months := tasker._cron_field(v_fields[4], 'month', 1, 12,
        ARRAY['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC']);
    v_c.dows := ARRAY(SELECT DISTINCT d % 7 FROM unnest(tasker._cron_field(v_fields[5], 'day-of-week', 0, 7,
        ARRAY['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'])) d ORDER BY 1);
    v_c.dom_star := left(v_fields[3], 1) = '*';
    v_c.dow_star := left(v_fields[5], 1) = '*';
    RETURN v_c;
END
$$;

-- A time zone name PostgreSQL knows (pg_timezone_names), at most 64 bytes; TV040 otherwise.
CREATE FUNCTION tasker._check_time_zone(p_zone text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_zone IS NULL OR octet_length(p_zone) > 64
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names z WHERE z.name = p_zone) THEN
        RAISE EXCEPTION 'time zone % is unknown: give a name of the tz database such as UTC or Europe/Berlin',
            coalesce(quote_literal(left(p_zone, 100)), 'NULL') USING ERRCODE = 'TV040';
    END IF;
END
$$;

-- The UTC offset of a zone at an instant.
CREATE FUNCTION tasker._zone_offset(p_at timestamptz, p_zone text) RETURNS interval
LANGUAGE sql STABLE AS $$
    SELECT (p_at AT TIME ZONE p_zone) - (p_at AT TIME ZONE 'UTC')
$$;

-- The instant a local wall-clock time stands for in a zone: the first occurrence of a time
-- that occurs twice (clocks going back), and for a time that does not exist (clocks going
-- forward) the first minute after it that does.
CREATE FUNCTION tasker._local_instant(p_local timestamp, p_zone text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_guess timestamptz := p_local AT TIME ZONE p_zone;
    v_best  timestamptz;
    v_off   interval;
    v_cand  timestamptz;
    v_next  timestamp;
BEGIN
    -- no transition within a day on either side: the usual case
    IF tasker._zone_offset(v_guess - interval '1 day', p_zone) = tasker._zone_offset(v_guess + interval '1 day', p_zone)
       AND (v_guess AT TIME ZONE p_zone) = p_local THEN
        RETURN v_guess;
    END IF;
    FOREACH v_off IN ARRAY ARRAY[tasker._zone_offset(v_guess - interval '1 day', p_zone),
                                 tasker._zone_offset(v_guess, p_zone),
                                 tasker._zone_offset(v_guess + interval '1 day', p_zone)] LOOP
        v_cand := (p_local - v_off) AT TIME ZONE 'UTC';
        IF (v_cand AT TIME ZONE p_zone) = p_local AND (v_best IS NULL OR v_cand < v_best) THEN
            v_best := v_cand;
        END IF;
    END LOOP;
    IF v_best IS NOT NULL THEN
        RETURN v_best;
    END IF;
    -- in a gap: the next minute that exists (a gap is at most a day)
    v_next := date_trunc('minute', p_local);
    FOR i IN 1 .. 1500 LOOP
        v_next := v_next + interval '1 minute';
        v_cand := v_next AT TIME ZONE p_zone;
        IF (v_cand AT TIME ZONE p_zone) = v_next THEN
            RETURN v_cand;
        END IF;
    END LOOP;
    RETURN v_guess;
END
$$;

-- The first slot of a parsed cron expression strictly after p_after, or NULL when there is
-- none within 3000 days. That covers every day of a month, 29 February included (it recurs
-- within 8 years); an expression that needs longer (29 February on one weekday: 28 years) or
-- never fires (30 February) gets NULL, and a schedule with it is refused where it is made.
CREATE FUNCTION tasker._cron_next(p_cron tasker._cron, p_zone text, p_after timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_local  timestamp := p_after AT TIME ZONE p_zone;
    v_first  date := v_local::date;
    v_day    date := v_local::date;
    v_last   date := v_local::date + 3000;
    v_hour0  integer := extract(hour FROM v_local)::integer;
    v_min0   integer := extract(minute FROM v_local)::integer;
    v_h      integer;
    v_m      integer;
    v_dom    boolean;
    v_dow    boolean;
    v_at     timestamptz;
BEGIN
    WHILE v_day <= v_last LOOP
        IF NOT (extract(month FROM v_day)::integer = ANY (p_cron.months)) THEN
            v_day := (date_trunc('month', v_day) + interval '1 month')::date;
            CONTINUE;
        END IF;
        v_dom := extract(day FROM v_day)::integer = ANY (p_cron.doms);
        v_dow := extract(dow FROM v_day)::integer = ANY (p_cron.dows);
        IF (CASE WHEN p_cron.dom_star OR p_cron.dow_star THEN v_dom AND v_dow ELSE v_dom OR v_dow END) THEN
            FOREACH v_h IN ARRAY p_cron.hours LOOP
                CONTINUE WHEN v_day = v_first AND v_h < v_hour0;
                FOREACH v_m IN ARRAY p_cron.minutes LOOP
                    CONTINUE WHEN v_day = v_first AND v_h = v_hour0 AND v_m < v_min0;
                    -- local slots only move forward and their instants never move back, so
                    -- the first instant after p_after is the answer
                    v_at := tasker._local_instant(v_day + make_time(v_h, v_m, 0), p_zone);
                    IF v_at > p_after THEN
                        RETURN v_at;
                    END IF;
                END LOOP;
            END LOOP;
        END IF;
        v_day := v_day + 1;
    END LOOP;
    RETURN NULL;
END
$$;

-- The next slot of a cron expression after an instant, in a time zone (for DBAs and tests).
CREATE FUNCTION tasker.cron_next(p_cron text, p_time_zone text DEFAULT 'UTC', p_after timestamptz DEFAULT now())
RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- a cheap check (pg_timezone_names reads the whole tz database, about 20 ms): PostgreSQL
    -- refuses a zone it does not know. A POSIX zone such as UTC+5, which PostgreSQL accepts,
    -- is accepted here; create_schedule takes names of the tz database only.
    IF p_time_zone IS NULL OR octet_length(p_time_zone) > 64 OR p_time_zone !~ '^[A-Za-z][A-Za-z0-9_/+-]*$' THEN
        PERFORM tasker._check_time_zone(p_time_zone);
    END IF;
    BEGIN
        PERFORM now() AT TIME ZONE p_time_zone;
    EXCEPTION WHEN invalid_parameter_value THEN
        PERFORM tasker._check_time_zone(p_time_zone);
    END;
    IF p_after IS NULL THEN
        RAISE EXCEPTION 'after must be a timestamp' USING ERRCODE = 'TV002';
    END IF;
    RETURN tasker._cron_next(tasker._cron_parse(p_cron), p_time_zone, p_after);
END
$$;
COMMENT ON FUNCTION tasker.cron_next(text,text,timestamptz) IS
    'The first slot of a cron expression strictly after an instant, in a time zone (NULL: none within 3000 days).';

-- A slot as the idempotency key of its task: schedule:<name>:<UTC instant>.
CREATE FUNCTION tasker._schedule_key(p_name text, p_slot timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT 'schedule:' || p_name || ':'
           || to_char(p_slot AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
           || CASE WHEN date_trunc('second', p_slot) = p_slot THEN ''
                   ELSE '.' || to_char(p_slot AT TIME ZONE 'UTC', 'US') END
           || 'Z'
$$;

-- Checks every part of a schedule (TV040, TV021 for a context over max_payload_bytes, TN002
-- for a template or version that is not registered) and returns the parsed cron. The first
-- slot must come within 3000 days.
CREATE FUNCTION tasker._check_schedule(
    p_name text, p_namespace text, p_template text, p_version text, p_cron text, p_zone text,
    p_context jsonb, p_overlap text, p_window interval
) RETURNS tasker._cron
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_c tasker._cron;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION 'schedule name % is invalid: letters, digits, _, - and ., starting with a letter, at most 128',
            coalesce(quote_literal(left(p_name, 200)), 'NULL') USING ERRCODE = 'TV040';
    END IF;
    PERFORM tasker._validate_queue_name(p_namespace);
    IF p_template IS NULL OR octet_length(p_template) > 128 THEN
        RAISE EXCEPTION 'schedule %: template name must be given, at most 128 bytes', p_name USING ERRCODE = 'TV040';
    END IF;
    IF octet_length(p_version) > 64 THEN
        RAISE EXCEPTION 'schedule %: version is over 64 bytes', p_name USING ERRCODE = 'TV040';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM tasker.named_tasks nt
                    WHERE nt.namespace = p_namespace AND nt.name = p_template
                      AND (p_version IS NULL OR nt.version = p_version)) THEN
        PERFORM tasker._raise_unknown_template(p_namespace, p_template, p_version);
    END IF;
    v_c := tasker._cron_parse(p_cron);
    PERFORM tasker._check_time_zone(p_zone);
    IF p_context IS NULL OR jsonb_typeof(p_context) <> 'object' THEN
        RAISE EXCEPTION 'schedule %: context must be a JSON object', p_name USING ERRCODE = 'TV040';
    END IF;
    PERFORM tasker._check_json_size(p_context, 'max_payload_bytes', format('schedule %s: context', p_name));
    IF p_overlap IS NULL OR p_overlap NOT IN ('skip', 'allow', 'cancel_previous') THEN
        RAISE EXCEPTION 'schedule %: overlap % is unknown (valid: skip, allow, cancel_previous)',
            p_name, coalesce(quote_literal(left(p_overlap, 100)), 'NULL') USING ERRCODE = 'TV040';
    END IF;
    IF p_window IS NULL OR p_window < interval '1 minute' OR p_window > interval '366 days' THEN
        RAISE EXCEPTION 'schedule %: catch-up window must be from 1 minute to 366 days, got %',
            p_name, coalesce(p_window::text, 'NULL') USING ERRCODE = 'TV040';
    END IF;
    IF tasker._cron_next(v_c, p_zone, clock_timestamp()) IS NULL THEN
        RAISE EXCEPTION 'schedule %: cron expression % never fires (no slot within 3000 days)',
            p_name, quote_literal(p_cron) USING ERRCODE = 'TV040';
    END IF;
    RETURN v_c;
END
$$;

-- Raises TN005 for a schedule that does not exist.
CREATE FUNCTION tasker._raise_unknown_schedule(p_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'schedule % does not exist', coalesce(quote_literal(left(p_name, 200)), 'NULL')
        USING ERRCODE = 'TN005', HINT = 'tasker-pg schedule list shows the schedules';
END
$$;

-- What list_schedules and the changing functions return, one row per schedule.
CREATE FUNCTION tasker._schedule_rows(p_name text)
RETURNS TABLE (name text, namespace text, template_name text, template_version text, cron text,
               time_zone text, context jsonb, overlap text, catchup_window interval, enabled boolean,
               next_fire_at timestamptz, last_slot timestamptz, last_fired_at timestamptz,
               last_task_uuid uuid, last_task_state text, last_error text, declared_by text,
               created_at timestamptz, updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT s.name, s.namespace, s.template_name, s.template_version, s.cron, s.time_zone, s.context,
           s.overlap, s.catchup_window, s.enabled, s.next_fire_at, s.last_slot, s.last_fired_at,
           s.last_task_uuid, t.state, s.last_error, s.declared_by, s.created_at, s.updated_at
      FROM tasker.schedules s
      LEFT JOIN tasker.tasks t ON t.task_uuid = s.last_task_uuid
     WHERE p_name IS NULL OR s.name = p_name
     ORDER BY s.name
$$;

-- Creates a schedule: every slot of p_cron in p_time_zone creates a task of the template
-- (p_version NULL: the newest version at each firing) with p_context. p_overlap: skip (no new
-- task while the last one is pending or running), allow, or cancel_previous (cancel it first).
-- p_catchup_window: after downtime, missed slots at most this old still fire (1 minute to 366
-- days; it must be longer than the interval fire_due_schedules is called at). The first slot
-- is the first after now. A name that exists is refused (TV040).
CREATE FUNCTION tasker.create_schedule(
    p_name           text,
    p_namespace      text,
    p_template       text,
    p_cron           text,
    p_time_zone      text DEFAULT 'UTC',
    p_context        jsonb DEFAULT '{}',
    p_overlap        text DEFAULT 'skip',
    p_catchup_window interval DEFAULT interval '1 hour',
    p_version        text DEFAULT NULL,
    p_enabled        boolean DEFAULT true
) RETURNS TABLE (name text, namespace text, template_name text, template_version text, cron text,
                 time_zone text, context jsonb, overlap text, catchup_window interval, enabled boolean,
                 next_fire_at timestamptz, last_slot timestamptz, last_fired_at timestamptz,
                 last_task_uuid uuid, last_task_state text, last_error text, declared_by text,
                 created_at timestamptz, updated_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_c   tasker._cron;
    v_now timestamptz := clock_timestamp();
BEGIN
    p_context := coalesce(p_context, '{}'::jsonb);
    v_c := tasker._check_schedule(p_name, p_namespace, p_template, p_version, p_cron, p_time_zone,
                                  p_context, p_overlap, p_catchup_window);
    INSERT INTO tasker.schedules AS s (name, namespace, template_name, template_version, cron, time_zone,
                                       context, overlap, catchup_window, enabled, next_fire_at,
                                       created_at, updated_at)
    VALUES (p_name, p_namespace, p_template, p_version, regexp_replace(p_cron, '^\s+|\s+$', '', 'g'), p_time_zone, p_context, p_overlap,
            p_catchup_window, coalesce(p_enabled, true),
            CASE WHEN coalesce(p_enabled, true) THEN tasker._cron_next(v_c, p_time_zone, v_now) END,
            v_now, v_now)
    ON CONFLICT ON CONSTRAINT schedules_pkey DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % exists; delete it first, or pick another name', quote_literal(p_name)
            USING ERRCODE = 'TV040';
    END IF;
    RETURN QUERY SELECT * FROM tasker._schedule_rows(p_name);
END
$$;
COMMENT ON FUNCTION tasker.create_schedule(text,text,text,text,text,jsonb,text,interval,text,boolean) IS
    'Operator: creates a cron schedule that creates a task of a template at every slot.';

-- Pauses a schedule: nothing fires until resume_schedule. TN005 when it does not exist.
CREATE FUNCTION tasker.pause_schedule(p_name text)
RETURNS TABLE (name text, namespace text, template_name text, template_version text, cron text,
               time_zone text, context jsonb, overlap text, catchup_window interval, enabled boolean,
               next_fire_at timestamptz, last_slot timestamptz, last_fired_at timestamptz,
               last_task_uuid uuid, last_task_state text, last_error text, declared_by text,
               created_at timestamptz, updated_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasker.schedules s SET enabled = false, next_fire_at = NULL, updated_at = clock_timestamp()
     WHERE s.name = p_name;
    IF NOT FOUND THEN
        PERFORM tasker._raise_unknown_schedule(p_name);
    END IF;
    RETURN QUERY SELECT * FROM tasker._schedule_rows(p_name);
END
$$;
COMMENT ON FUNCTION tasker.pause_schedule(text) IS
    'Operator: pauses a schedule (no slot fires until it is resumed).';

-- Resumes a schedule: the next slot is the first after now (the slots of the pause are not
-- caught up). A schedule that is not paused keeps its next slot. TN005 when it does not exist.
CREATE FUNCTION tasker.resume_schedule(p_name text)
RETURNS TABLE (name text, namespace text, template_name text, template_version text, cron text,
               time_zone text, context jsonb, overlap text, catchup_window interval, enabled boolean,
               next_fire_at timestamptz, last_slot timestamptz, last_fired_at timestamptz,
               last_task_uuid uuid, last_task_state text, last_error text, declared_by text,
               created_at timestamptz, updated_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasker.schedules s
       SET enabled = true,
           next_fire_at = tasker._cron_next(tasker._cron_parse(s.cron), s.time_zone, clock_timestamp()),
           updated_at = clock_timestamp()
     WHERE s.name = p_name AND NOT s.enabled;
    IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM tasker.schedules s WHERE s.name = p_name) THEN
        PERFORM tasker._raise_unknown_schedule(p_name);
    END IF;
    RETURN QUERY SELECT * FROM tasker._schedule_rows(p_name);
END
$$;
COMMENT ON FUNCTION tasker.resume_schedule(text) IS
    'Operator: resumes a paused schedule from the first slot after now.';

-- Deletes a schedule (the tasks it created stay). False when it did not exist.
CREATE FUNCTION tasker.delete_schedule(p_name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM tasker.schedules s WHERE s.name = p_name;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION tasker.delete_schedule(text) IS
    'Operator: deletes a schedule (its tasks stay); false when there was none.';

-- Every schedule, by name, with its next and last slot and the state of the last task it
-- created (NULL when that task was purged or there is none).
CREATE FUNCTION tasker.list_schedules()
RETURNS TABLE (name text, namespace text, template_name text, template_version text, cron text,
               time_zone text, context jsonb, overlap text, catchup_window interval, enabled boolean,
               next_fire_at timestamptz, last_slot timestamptz, last_fired_at timestamptz,
               last_task_uuid uuid, last_task_state text, last_error text, declared_by text,
               created_at timestamptz, updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT * FROM tasker._schedule_rows(NULL)
$$;
COMMENT ON FUNCTION tasker.list_schedules() IS
    'Every schedule with its next and last fire and the state of its last task.';

-- Creates the task of one slot of a locked schedule row (the overlap policy already applied).
CREATE FUNCTION tasker._fire_slot(p_s tasker.schedules, p_slot timestamptz, p_how text, OUT task_uuid uuid, OUT created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    SELECT c.task_uuid, c.created INTO task_uuid, created
      FROM tasker.create_or_get_task(p_s.namespace, p_s.template_name, p_s.context, p_s.template_version,
               jsonb_build_object('idempotency_key', tasker._schedule_key(p_s.name, p_slot),
                                  'initiator', 'schedule:' || p_s.name,
                                  'source_system', 'tasker.schedules',
                                  'reason', p_how || ' slot ' || tasker._schedule_key(p_s.name, p_slot))) c;
END
$$;

-- Fires every slot that is due: for each enabled schedule whose next slot has come, each slot
-- from it to now (slots older than the catch-up window are skipped) creates its task through
-- create_or_get_task with the idempotency key schedule:<name>:<slot>, after the overlap
-- policy: skip (no task while the last one is pending or running: the slot is recorded as
-- skipped), allow, or cancel_previous (the last one, if pending or running, is cancelled
-- first). At most p_limit slots per call (1 to 10000); what is left is due at the next call.
--
-- Callers may race: schedule rows are locked with SKIP LOCKED (each caller takes the ones no
-- other holds) and a slot that another caller or a backfill already fired returns its task
-- (action 'existing'). A schedule whose firing fails (its template version gone) keeps its slot,
-- records the error in last_error and does not stop the others. Returns one row per slot:
-- action 'created', 'existing', 'skipped' (overlap) or 'error'.
CREATE FUNCTION tasker.fire_due_schedules(p_limit integer DEFAULT 1000)
RETURNS TABLE (schedule_name text, slot timestamptz, task_uuid uuid, action text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_budget integer := p_limit;
    v_s      tasker.schedules;
    v_c      tasker._cron;
    v_slot   timestamptz;
    v_last   timestamptz;
    v_task   uuid;
    v_fired  timestamptz;
    v_state  text;
    v_new    uuid;
    v_made   boolean;
    v_error  text;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'limit must be an integer from 1 to 10000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    FOR v_s IN
        SELECT * FROM tasker.schedules s
         WHERE s.enabled AND s.next_fire_at <= v_now
         ORDER BY s.next_fire_at, s.name
           FOR UPDATE SKIP LOCKED
    LOOP
        EXIT WHEN v_budget <= 0;
        v_c := tasker._cron_parse(v_s.cron);
        v_slot := v_s.next_fire_at;
        IF v_slot < v_now - v_s.catchup_window THEN
            -- downtime beyond the window: the first slot inside it
            v_slot := tasker._cron_next(v_c, v_s.time_zone, v_now - v_s.catchup_window - interval '1 microsecond');
        END IF;
        v_last := v_s.last_slot;
        v_task := v_s.last_task_uuid;
        v_fired := v_s.last_fired_at;
        v_error := NULL;
        WHILE v_slot IS NOT NULL AND v_slot <= v_now AND v_budget > 0 LOOP
            v_state := (SELECT t.state FROM tasker.tasks t WHERE t.task_uuid = v_task);
            IF v_s.overlap = 'skip' AND v_state IN ('pending', 'steps_in_process') THEN
                schedule_name := v_s.name; slot := v_slot; task_uuid := NULL; action := 'skipped';
                RETURN NEXT;
            ELSE
                BEGIN
                    IF v_s.overlap = 'cancel_previous' AND v_state IN ('pending', 'steps_in_process') THEN
                        PERFORM tasker.cancel_task(v_task, format('schedule %s: cancelled by the slot %s',
                                                                  v_s.name, tasker._schedule_key(v_s.name, v_slot)));
                    END IF;
                    SELECT f.task_uuid, f.created INTO v_new, v_made FROM tasker._fire_slot(v_s, v_slot, 'scheduled') f;
                EXCEPTION WHEN OTHERS THEN
                    v_error := format('slot %s: %s (SQLSTATE %s)', tasker._schedule_key(v_s.name, v_slot),
                                      left(SQLERRM, 1000), SQLSTATE);
                END;
                IF v_error IS NOT NULL THEN
                    schedule_name := v_s.name; slot := v_slot; task_uuid := NULL; action := 'error';
                    RETURN NEXT;
                    EXIT;
                END IF;
                v_task := v_new;
                v_fired := clock_timestamp();
                schedule_name := v_s.name; slot := v_slot; task_uuid := v_new;
                action := CASE WHEN v_made THEN 'created' ELSE 'existing' END;
                RETURN NEXT;
            END IF;
            v_last := v_slot;
            v_budget := v_budget - 1;
            v_slot := tasker._cron_next(v_c, v_s.time_zone, v_slot);
        END LOOP;
        UPDATE tasker.schedules s
           SET next_fire_at = v_slot, last_slot = v_last, last_task_uuid = v_task, last_fired_at = v_fired,
               last_error = v_error, updated_at = clock_timestamp()
         WHERE s.name = v_s.name;
    END LOOP;
END
$$;
COMMENT ON FUNCTION tasker.fire_due_schedules(integer) IS
    'Creates the task of every due schedule slot (idempotency key schedule:<name>:<slot>; safe to call from many workers, pg_cron or psql at once).';

-- Fires a schedule now, whatever its overlap policy and even while paused: slot = now. Returns
-- the task; the schedule's next slot does not change. TN005 when it does not exist.
CREATE FUNCTION tasker.trigger_schedule(p_name text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_s    tasker.schedules;
    v_task uuid;
BEGIN
    SELECT * INTO v_s FROM tasker.schedules s WHERE s.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM tasker._raise_unknown_schedule(p_name);
    END IF;
    SELECT f.task_uuid INTO v_task FROM tasker._fire_slot(v_s, clock_timestamp(), 'triggered') f;
    UPDATE tasker.schedules s SET last_task_uuid = v_task, last_fired_at = clock_timestamp(),
                                  updated_at = clock_timestamp()
     WHERE s.name = p_name;
    RETURN v_task;
END
$$;
COMMENT ON FUNCTION tasker.trigger_schedule(text) IS
    'Operator: creates a task of a schedule now (its slot is the current instant), whatever its overlap policy.';

-- Fires every slot of a schedule from p_from to p_to (both included; p_to NULL or after now:
-- now), at most p_limit (1 to 10000) slots, the oldest first, whatever the overlap policy and
-- the catch-up window. A slot that already fired returns its task (created = false), so a
-- backfill can be repeated. The schedule's own next slot and last task do not change. TN005
-- when it does not exist; TV002 for a range that runs backwards.
CREATE FUNCTION tasker.backfill_schedule(p_name text, p_from timestamptz, p_to timestamptz, p_limit integer DEFAULT 1000)
RETURNS TABLE (slot timestamptz, task_uuid uuid, created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_s    tasker.schedules;
    v_c    tasker._cron;
    v_slot timestamptz;
    v_n    integer := 0;
    v_to   timestamptz := least(coalesce(p_to, clock_timestamp()), clock_timestamp());
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'limit must be an integer from 1 to 10000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    IF p_from IS NULL OR p_from > v_to THEN
        RAISE EXCEPTION 'backfill needs from <= to (to: at most now), got % to %', coalesce(p_from::text, 'NULL'),
            v_to USING ERRCODE = 'TV002';
    END IF;
    SELECT * INTO v_s FROM tasker.schedules s WHERE s.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM tasker._raise_unknown_schedule(p_name);
    END IF;
    v_c := tasker._cron_parse(v_s.cron);
    v_slot := tasker._cron_next(v_c, v_s.time_zone, p_from - interval '1 microsecond');
    WHILE v_slot IS NOT NULL AND v_slot <= v_to AND v_n < p_limit LOOP
        SELECT f.task_uuid, f.created INTO task_uuid, created FROM tasker._fire_slot(v_s, v_slot, 'backfilled') f;
        slot := v_slot;
        RETURN NEXT;
        v_n := v_n + 1;
        v_slot := tasker._cron_next(v_c, v_s.time_zone, v_slot);
    END LOOP;
END
$$;
COMMENT ON FUNCTION tasker.backfill_schedule(text,timestamptz,timestamptz,integer) IS
    'Operator: creates the tasks of every slot of a schedule in a past range (slots that already fired return their task).';

-- Template `schedules:` (register_template): the declared schedules checked and normalised
-- (every default filled in), NULL when none is declared. TV010 naming the schedule.
CREATE FUNCTION tasker._normalise_schedules(p_list jsonb, p_template text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_item  jsonb;
    v_ord   bigint;
    v_key   text;
    v_name  text;
    v_out   jsonb := '[]';
    v_names text[] := '{}';
    v_where text;
BEGIN
    IF p_list IS NULL OR jsonb_typeof(p_list) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(p_list) <> 'array' THEN
        RAISE EXCEPTION 'template %: schedules must be a list', p_template USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_array_length(p_list) > 100 THEN
        RAISE EXCEPTION 'template % declares % schedules; at most 100 are allowed', p_template, jsonb_array_length(p_list)
            USING ERRCODE = 'TV010';
    END IF;
    FOR v_item, v_ord IN SELECT e.v, e.o FROM jsonb_array_elements(p_list) WITH ORDINALITY e(v, o) LOOP
        v_where := format('template %s, schedules[%s]', p_template, v_ord - 1);
        IF jsonb_typeof(v_item) <> 'object' THEN
            RAISE EXCEPTION '%: a schedule must be a mapping', v_where USING ERRCODE = 'TV010';
        END IF;
        FOR v_key IN SELECT jsonb_object_keys(v_item) LOOP
            IF v_key NOT IN ('name', 'cron', 'time_zone', 'context', 'overlap', 'catchup_window_seconds', 'enabled') THEN
                RAISE EXCEPTION '%: unknown key % (valid: name, cron, time_zone, context, overlap, catchup_window_seconds, enabled)',
                    v_where, quote_literal(left(v_key, 200)) USING ERRCODE = 'TV010';
            END IF;
        END LOOP;
        v_name := v_item->>'name';
        IF jsonb_typeof(v_item->'name') IS DISTINCT FROM 'string' OR v_name !~ '^[A-Za-z][A-Za-z0-9_.-]{0,127}$' THEN
            RAISE EXCEPTION '%: name must be letters, digits, _, - and ., starting with a letter, at most 128', v_where
                USING ERRCODE = 'TV010';
        END IF;
        IF v_name = ANY (v_names) THEN
            RAISE EXCEPTION '%: duplicate schedule name %', v_where, quote_literal(v_name) USING ERRCODE = 'TV010';
        END IF;
        v_names := v_names || v_name;
        IF jsonb_typeof(v_item->'cron') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION '%: cron must be a string', v_where USING ERRCODE = 'TV010';
        END IF;
        IF jsonb_typeof(v_item->'time_zone') NOT IN ('string', 'null')
           OR jsonb_typeof(v_item->'overlap') NOT IN ('string', 'null')
           OR jsonb_typeof(v_item->'context') NOT IN ('object', 'null')
           OR jsonb_typeof(v_item->'enabled') NOT IN ('boolean', 'null') THEN
            RAISE EXCEPTION '%: time_zone and overlap must be strings, context a mapping, enabled a boolean', v_where
                USING ERRCODE = 'TV010';
        END IF;
        IF jsonb_typeof(v_item->'catchup_window_seconds') IS NOT NULL AND jsonb_typeof(v_item->'catchup_window_seconds') <> 'null'
           AND NOT (tasker._is_int_json(v_item->'catchup_window_seconds', 60)
                    AND (v_item->>'catchup_window_seconds')::integer <= 31622400) THEN
            RAISE EXCEPTION '%: catchup_window_seconds must be an integer from 60 to 31622400 (366 days)', v_where
                USING ERRCODE = 'TV010';
        END IF;
        IF tasker._has_huge_number(v_item->'context') THEN
            RAISE EXCEPTION '%: context holds a number too large for a double (such as 1e400)', v_where
                USING ERRCODE = 'TV010';
        END IF;
        v_item := jsonb_build_object(
            'name', v_name,
            'cron', regexp_replace(v_item->>'cron', '^\s+|\s+$', '', 'g'),
            'time_zone', coalesce(v_item->>'time_zone', 'UTC'),
            'context', coalesce(nullif(v_item->'context', 'null'::jsonb), '{}'::jsonb),
            'overlap', coalesce(v_item->>'overlap', 'skip'),
            'catchup_window_seconds', coalesce(nullif(v_item->'catchup_window_seconds', 'null'::jsonb), '3600'::jsonb),
            'enabled', coalesce(nullif(v_item->'enabled', 'null'::jsonb), 'true'::jsonb));
        BEGIN
            PERFORM tasker._cron_parse(v_item->>'cron');
            PERFORM tasker._check_time_zone(v_item->>'time_zone');
            IF v_item->>'overlap' NOT IN ('skip', 'allow', 'cancel_previous') THEN
                RAISE EXCEPTION 'overlap % is unknown (valid: skip, allow, cancel_previous)',
                    quote_literal(left(v_item->>'overlap', 100)) USING ERRCODE = 'TV040';
            END IF;
            IF tasker._cron_next(tasker._cron_parse(v_item->>'cron'), v_item->>'time_zone', clock_timestamp()) IS NULL THEN
                RAISE EXCEPTION 'cron expression % never fires', quote_literal(v_item->>'cron') USING ERRCODE = 'TV040';
            END IF;
        EXCEPTION WHEN SQLSTATE 'TV040' THEN
            RAISE EXCEPTION '%: %', v_where, SQLERRM USING ERRCODE = 'TV010';
        END;
        v_out := v_out || v_item;
    END LOOP;
    RETURN CASE WHEN jsonb_array_length(v_out) = 0 THEN NULL ELSE v_out END;
END
$$;

-- Is semantic version a newer than b? (both valid)
CREATE FUNCTION tasker._semver_newer(p_a text, p_b text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (a[1]::integer, a[2]::integer, a[3]::integer, a[4] IS NULL)
               > (b[1]::integer, b[2]::integer, b[3]::integer, b[4] IS NULL)
           OR ((a[1]::integer, a[2]::integer, a[3]::integer, a[4] IS NULL)
                   = (b[1]::integer, b[2]::integer, b[3]::integer, b[4] IS NULL)
               AND tasker._semver_pre_key(a[4]) > tasker._semver_pre_key(b[4]))
      FROM (SELECT tasker._semver_parts(p_a) AS a, tasker._semver_parts(p_b) AS b) x
$$;

-- The schedules a newly registered template version declares (normalised): a new name is
-- created; one that an older version of the same template declared, or that create_schedule
-- made for the same template, is replaced by this version's definition (its last slot and task
-- stay; its next slot is recomputed when the cron, the zone or enabled changed); one that a
-- newer or the same version declared is left alone. A name held by another template's schedule
-- is refused (TV010). Each schedule fires the version that declared it.
CREATE FUNCTION tasker._declare_schedules(p_namespace text, p_template text, p_version text, p_list jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_item jsonb;
    v_old  tasker.schedules;
    v_now  timestamptz := clock_timestamp();
    v_on   boolean;
BEGIN
    FOR v_item IN SELECT e FROM jsonb_array_elements(coalesce(p_list, '[]')) e LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('tasker.schedules:' || (v_item->>'name'), 0));
        v_on := (v_item->>'enabled')::boolean;
        SELECT * INTO v_old FROM tasker.schedules s WHERE s.name = v_item->>'name' FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO tasker.schedules (name, namespace, template_name, template_version, cron, time_zone,
                                          context, overlap, catchup_window, enabled, next_fire_at,
                                          declared_by, created_at, updated_at)
            VALUES (v_item->>'name', p_namespace, p_template, p_version, v_item->>'cron', v_item->>'time_zone',
                    v_item->'context', v_item->>'overlap',
                    make_interval(secs => (v_item->>'catchup_window_seconds')::integer), v_on,
                    CASE WHEN v_on THEN tasker._cron_next(tasker._cron_parse(v_item->>'cron'), v_item->>'time_zone', v_now) END,
                    p_version, v_now, v_now);
        ELSIF v_old.namespace <> p_namespace OR v_old.template_name <> p_template THEN
            RAISE EXCEPTION 'template %/% version % declares schedule %, which belongs to template %/%; schedule names are unique',
                p_namespace, p_template, p_version, quote_literal(v_old.name), v_old.namespace, v_old.template_name
                USING ERRCODE = 'TV010';
        ELSIF v_old.declared_by IS NULL OR tasker._semver_newer(p_version, v_old.declared_by) THEN
            UPDATE tasker.schedules s
               SET template_version = p_version, cron = v_item->>'cron', time_zone = v_item->>'time_zone',
                   context = v_item->'context', overlap = v_item->>'overlap',
                   catchup_window = make_interval(secs => (v_item->>'catchup_window_seconds')::integer),
                   enabled = v_on,
                   next_fire_at = CASE WHEN NOT v_on THEN NULL
                                       WHEN v_old.enabled AND v_old.cron = v_item->>'cron'
                                            AND v_old.time_zone = v_item->>'time_zone' THEN v_old.next_fire_at
                                       ELSE tasker._cron_next(tasker._cron_parse(v_item->>'cron'), v_item->>'time_zone', v_now) END,
                   declared_by = p_version, updated_at = v_now
             WHERE s.name = v_old.name;
        END IF;
    END LOOP;
END
$$;
