-- The pgmq-style queue layer (usable on its own, and the transport of the engine): create and
-- drop queues, send, read (claim with a visibility timeout), pop, set_vt, delete, archive,
-- purge and metrics. Every hot statement is static SQL on the list-partitioned parent table
-- tasker.queue_messages; dynamic SQL is used only for DDL in create_queue/drop_queue, after the
-- name has been validated.
--
-- A namespace's queue (a queue named like the namespace of a registered template) belongs to
-- the engine: the raw functions below refuse to send to, read, pop, delete, archive, re-time,
-- purge or drop it (TS005), because a message taken away there strands its step. The engine
-- writes its queues with direct statements on tasker.queue_messages and the internal
-- tasker._archive_messages, never through these guarded entry points; metrics() stays open.
--
-- SQLSTATEs: TV001 invalid queue name, TV002 invalid argument, TN001 unknown queue,
-- TS005 the queue belongs to the engine.

CREATE TYPE tasker.message_record AS (
    msg_id       bigint,
    read_ct      integer,
    enqueued_at  timestamptz,
    vt           timestamptz,
    priority     integer,
    message      jsonb
);
COMMENT ON TYPE tasker.message_record IS
    'A queue message as read(), pop() and set_vt() return it.';

CREATE TYPE tasker.queue_metrics AS (
    queue_name           text,
    queue_length         bigint,
    queue_visible_length bigint,
    newest_msg_age_sec   double precision,
    oldest_msg_age_sec   double precision,
    total_messages       bigint,
    scrape_time          timestamptz
);
COMMENT ON TYPE tasker.queue_metrics IS
    'A queue''s metrics as metrics() and metrics_all() return them.';

-- Refuses a queue name that is not a safe identifier. Rule: lowercase letters, digits and _,
-- starting with a letter, at most 47 characters (q_<name> and tasker_<name> stay well inside
-- PostgreSQL's 63-byte identifier limit).
CREATE FUNCTION tasker._validate_queue_name(p_queue text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[a-z][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'invalid queue name %: a queue name is 1 to 47 lowercase letters, digits and _, starting with a letter',
            coalesce(quote_literal(p_queue), 'NULL')
            USING ERRCODE = 'TV001';
    END IF;
END
$$;

-- Looks up a queue's sequence; the one existence check every queue function makes.
-- Unknown names get "does not exist", malformed ones the naming rule.
CREATE FUNCTION tasker._queue_sequence(p_queue text) RETURNS regclass
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_seq regclass;
BEGIN
    SELECT q.msg_seq INTO v_seq FROM tasker.queues q WHERE q.queue_name = p_queue;
    IF v_seq IS NULL THEN
        PERFORM tasker._validate_queue_name(p_queue);
        RAISE EXCEPTION 'queue % does not exist', quote_literal(p_queue)
            USING ERRCODE = 'TN001',
                  HINT = 'create it with tasker.create_queue(' || quote_literal(p_queue) || ')';
    END IF;
    RETURN v_seq;
END
$$;

-- Refuses a raw queue call on a namespace's engine queue. A queue is the engine's when a
-- template of that namespace is registered (named_tasks' unique key starts with namespace:
-- one index probe). Called by every raw function that changes or hands out messages.
CREATE FUNCTION tasker._refuse_engine_queue(p_queue text, p_action text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasker.named_tasks nt WHERE nt.namespace = p_queue) THEN
        RAISE EXCEPTION 'cannot % on queue %: it is the engine queue of namespace %, whose messages belong to workflow steps',
            p_action, quote_literal(p_queue), quote_literal(p_queue)
            USING ERRCODE = 'TS005',
                  HINT = 'use the engine''s functions instead: tasker.cancel_task, tasker.retry_step or tasker.resolve_step '
                         'for a task''s steps, tasker.repair_messages() for a step whose message was lost, '
                         'tasker.metrics() to look at the queue; use a queue of another name for plain messages';
    END IF;
END
$$;

-- Creates the queue's sequence and partitions. Safe to call again (no-op) and from several
-- sessions at once: an advisory lock on the name makes a concurrent creator wait until the
-- first one commits, and its re-check (a new snapshot) then finds the queue. (CREATE ... IF
-- NOT EXISTS alone is not safe against an uncommitted twin.) Partitions are created
-- standalone and then attached, because ATTACH PARTITION takes only a SHARE UPDATE EXCLUSIVE
-- lock on the parent, so workers reading other queues are not blocked.
CREATE FUNCTION tasker.create_queue(p_queue text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_seq text := 'q_' || p_queue || '_seq';
BEGIN
    PERFORM tasker._validate_queue_name(p_queue);
    IF EXISTS (SELECT 1 FROM tasker.queues WHERE queue_name = p_queue) THEN
        RETURN;
    END IF;
    -- Wait for a concurrent creator with a session-level lock, so that a caller who finds the
    -- queue made by the session it waited for lets go at once instead of holding the lock
    -- for the rest of its own transaction (which would serialise every caller behind it).
    PERFORM pg_advisory_lock(hashtextextended('tasker.create_queue:' || p_queue, 0));
    IF EXISTS (SELECT 1 FROM tasker.queues WHERE queue_name = p_queue) THEN
        PERFORM pg_advisory_unlock(hashtextextended('tasker.create_queue:' || p_queue, 0));
        RETURN;  -- created by the session we waited for
    END IF;
    -- We create it: hold the lock until our transaction ends.
    PERFORM pg_advisory_xact_lock(hashtextextended('tasker.create_queue:' || p_queue, 0));
    PERFORM pg_advisory_unlock(hashtextextended('tasker.create_queue:' || p_queue, 0));
    EXECUTE format('CREATE SEQUENCE tasker.%I AS bigint', v_seq);
    INSERT INTO tasker.queues (queue_name, msg_seq)
    VALUES (p_queue, format('tasker.%I', v_seq)::regclass);
    EXECUTE format(
        'CREATE TABLE tasker.%I (LIKE tasker.queue_messages INCLUDING DEFAULTS) WITH (fillfactor = 70)',
        'q_' || p_queue);
    EXECUTE format('ALTER TABLE tasker.queue_messages ATTACH PARTITION tasker.%I FOR VALUES IN (%L)',
        'q_' || p_queue, p_queue);
    EXECUTE format(
        'CREATE TABLE tasker.%I (LIKE tasker.queue_archive INCLUDING DEFAULTS)',
        'a_' || p_queue);
    EXECUTE format('ALTER TABLE tasker.queue_archive ATTACH PARTITION tasker.%I FOR VALUES IN (%L)',
        'a_' || p_queue, p_queue);
END
$$;
COMMENT ON FUNCTION tasker.create_queue(text) IS
    'Creates a queue (its partitions tasker.q_<name> and tasker.a_<name>); a no-op when it exists.';

-- Drops a queue with its live and archived messages; false when it did not exist.
CREATE FUNCTION tasker.drop_queue(p_queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._validate_queue_name(p_queue);
    PERFORM tasker._refuse_engine_queue(p_queue, 'drop_queue');
    DELETE FROM tasker.queues WHERE queue_name = p_queue;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM tasker.queue_priorities WHERE queue = p_queue;
    EXECUTE format('DROP TABLE IF EXISTS tasker.%I', 'q_' || p_queue);
    EXECUTE format('DROP TABLE IF EXISTS tasker.%I', 'a_' || p_queue);
    EXECUTE format('DROP SEQUENCE IF EXISTS tasker.%I', 'q_' || p_queue || '_seq');
    RETURN true;
END
$$;
COMMENT ON FUNCTION tasker.drop_queue(text) IS
    'Drops a queue with its live and archived messages; refuses a namespace''s engine queue (TS005).';

-- Records the priorities other than 0 that messages of a queue may carry (see
-- tasker.queue_priorities): windowed claims probe exactly these, and 0. Called in the
-- transaction that creates the messages, or the task whose messages carry the priority.
CREATE FUNCTION tasker._note_priorities(p_queue text, p_priorities integer[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO tasker.queue_priorities (queue, priority)
    SELECT DISTINCT p_queue, p FROM unnest(p_priorities) p WHERE p <> 0
    ON CONFLICT DO NOTHING
$$;
COMMENT ON FUNCTION tasker._note_priorities(text,integer[]) IS
    'Internal: records the non-zero priorities a queue''s messages may carry, for windowed claims.';

-- Sends one message, visible after p_delay_seconds; returns its msg_id. The pg_notify hint
-- reaches listeners only when the sending transaction commits.
CREATE FUNCTION tasker.send(
    p_queue text, p_message jsonb, p_delay_seconds double precision DEFAULT 0, p_priority integer DEFAULT 0
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_seq regclass := tasker._queue_sequence(p_queue);
    v_id  bigint;
BEGIN
    PERFORM tasker._check_positive(p_delay_seconds, 'delay_seconds');
    PERFORM tasker._refuse_engine_queue(p_queue, 'send');
    IF p_message IS NULL THEN
        RAISE EXCEPTION 'message must not be NULL' USING ERRCODE = 'TV002';
    END IF;
    PERFORM tasker._check_json_size(p_message, 'max_payload_bytes', 'message');
    INSERT INTO tasker.queue_messages (queue, msg_id, vt, priority, message)
    VALUES (p_queue, nextval(v_seq), clock_timestamp() + make_interval(secs => p_delay_seconds),
            coalesce(p_priority, 0), p_message)
    RETURNING msg_id INTO v_id;
    IF coalesce(p_priority, 0) <> 0 THEN
        PERFORM tasker._note_priorities(p_queue, ARRAY[p_priority]);
    END IF;
    PERFORM pg_notify('tasker_' || p_queue, '');
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION tasker.send(text,jsonb,double precision,integer) IS
    'Sends one message to a queue, visible after a delay; returns its msg_id.';

-- Sends many messages in one statement and one notification; returns their ids in input order.
CREATE FUNCTION tasker.send_batch(
    p_queue text, p_messages jsonb[], p_delay_seconds double precision DEFAULT 0, p_priority integer DEFAULT 0
) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_seq regclass := tasker._queue_sequence(p_queue);
BEGIN
    PERFORM tasker._check_positive(p_delay_seconds, 'delay_seconds');
    PERFORM tasker._refuse_engine_queue(p_queue, 'send_batch');
    IF p_messages IS NULL OR array_position(p_messages, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'messages must be an array of non-NULL jsonb values' USING ERRCODE = 'TV002';
    END IF;
    IF cardinality(p_messages) = 0 THEN
        RETURN;
    END IF;
    PERFORM tasker._check_json_size(m, 'max_payload_bytes', 'message #' || o) FROM unnest(p_messages) WITH ORDINALITY x(m, o);
    IF coalesce(p_priority, 0) <> 0 THEN
        PERFORM tasker._note_priorities(p_queue, ARRAY[p_priority]);
    END IF;
    RETURN QUERY
    INSERT INTO tasker.queue_messages (queue, msg_id, vt, priority, message)
    SELECT p_queue, nextval(v_seq), clock_timestamp() + make_interval(secs => p_delay_seconds),
           coalesce(p_priority, 0), m.message
      FROM unnest(p_messages) WITH ORDINALITY AS m(message, ord)
     ORDER BY m.ord
    RETURNING msg_id;
    PERFORM pg_notify('tasker_' || p_queue, '');
END
$$;
COMMENT ON FUNCTION tasker.send_batch(text,jsonb[],double precision,integer) IS
    'Sends many messages in one statement; returns their msg_ids in input order.';

-- Locks up to p_qty messages of a queue that are visible at p_now and have no fairness lane
-- (those are claimed lane by lane: _lock_lanes), in hand-out order: highest
-- priority first, then the longest visible (vt; messages made visible in the same instant, such
-- as one create_tasks call's, in index order, which is their insertion order in a table that
-- reuses no space). SKIP LOCKED: concurrent callers pass over each other's rows. It reads the
-- claim index (priority DESC, vt) one priority at a time, each as the range vt <= p_now, so
-- messages that are not visible yet (leased, delayed, waiting for a retry) are never read.
--
-- Without a window (p_since NULL) the priorities present are found by a loose index scan: the
-- first entry of the index, then the first below each priority handed out (so too with a
-- window on a queue with more than 64 priorities in all). With a window, only
-- the range vt BETWEEN p_since AND p_now of each priority is read, and the priorities are
-- those of tasker.queue_priorities and 0 (each probed by one descent). An index entry is
-- visited (and its heap tuple checked) until vacuum removes it, dead or alive; while a snapshot
-- is held, nothing is removed, and every message handled since it began leaves entries before
-- the live ones: a scan from the start of the index walks all of them on every claim (the
-- "queue death spiral"), a windowed one only those inside the window. A window is a promise by
-- the caller that it took every message visible before p_since (the worker's claim loop keeps
-- that promise, with a margin, and falls back to a scan without a window now and then); a
-- message it misses is handed out by the next claim without one, never lost.
-- read(), pop() and claim_steps take their messages here. ROWS 10: the statements that join
-- its rows (claim_steps locks their steps) must plan index probes, not the hash join with a
-- sequential scan of tasker.steps that the default estimate of 1,000 rows makes them pick.
CREATE FUNCTION tasker._lock_visible(p_queue text, p_qty integer, p_now timestamptz,
                                     p_since timestamptz DEFAULT NULL)
RETURNS TABLE (msg_id bigint, message jsonb)
LANGUAGE plpgsql ROWS 10 AS $$
#variable_conflict use_column
DECLARE
    v_prio  integer;
    v_prios integer[];
    v_left  integer := p_qty;
    v_got   integer;
BEGIN
    IF p_since IS NOT NULL THEN
        v_prios := ARRAY(SELECT p FROM (SELECT qp.priority FROM tasker.queue_priorities qp
                                         WHERE qp.queue = p_queue
                                         LIMIT 64) x(p)
                         UNION ALL SELECT 0 ORDER BY 1 DESC);
    END IF;
    -- NULL without a window; 65 entries (64 read + 0) means a queue with more than 63
    -- recorded priorities: found by the discovery below instead
    IF cardinality(v_prios) <= 64 THEN
        FOREACH v_prio IN ARRAY v_prios LOOP
            RETURN QUERY
            SELECT m.msg_id, m.message
              FROM tasker.queue_messages m
             WHERE m.queue = p_queue AND m.lane IS NULL AND m.priority = v_prio AND m.vt >= p_since AND m.vt <= p_now
             ORDER BY m.vt
             LIMIT v_left
               FOR UPDATE SKIP LOCKED;
            GET DIAGNOSTICS v_got = ROW_COUNT;
            v_left := v_left - v_got;
            EXIT WHEN v_left <= 0;
        END LOOP;
        RETURN;
    END IF;
    SELECT m.priority INTO v_prio
      FROM tasker.queue_messages m
     WHERE m.queue = p_queue AND m.lane IS NULL
     ORDER BY m.priority DESC
     LIMIT 1;
    WHILE v_prio IS NOT NULL LOOP
        -- the lock sits in a query with its own ORDER BY ... LIMIT: no more rows than asked
        RETURN QUERY
        SELECT m.msg_id, m.message
          FROM tasker.queue_messages m
         WHERE m.queue = p_queue AND m.lane IS NULL AND m.priority = v_prio AND m.vt <= p_now
           AND m.vt >= coalesce(p_since, '-infinity')
         ORDER BY m.vt
         LIMIT v_left
           FOR UPDATE SKIP LOCKED;
        GET DIAGNOSTICS v_got = ROW_COUNT;
        v_left := v_left - v_got;
        EXIT WHEN v_left <= 0;
        SELECT m.priority INTO v_prio
          FROM tasker.queue_messages m
         WHERE m.queue = p_queue AND m.lane IS NULL AND m.priority < v_prio
         ORDER BY m.priority DESC
         LIMIT 1;
        IF NOT FOUND THEN
            v_prio := NULL;
        END IF;
    END LOOP;
END
$$;
ALTER FUNCTION tasker._lock_visible(text, integer, timestamptz, timestamptz) SET enable_seqscan = off;

-- Hands out up to p_qty visible messages (highest priority first, then oldest), hiding each for
-- p_vt_seconds and counting the read. Concurrent readers never get the same message.
CREATE FUNCTION tasker.read(p_queue text, p_vt_seconds double precision, p_qty integer)
RETURNS SETOF tasker.message_record
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
BEGIN
    PERFORM tasker._queue_sequence(p_queue);
    PERFORM tasker._refuse_engine_queue(p_queue, 'read');
    PERFORM tasker._check_positive(p_vt_seconds, 'vt_seconds');
    IF p_qty IS NULL OR p_qty < 1 THEN
        RAISE EXCEPTION 'qty must be >= 1, got %', coalesce(p_qty::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
    -- The candidates are picked and locked first, in a statement of their own: _lock_visible's
    -- queries take snapshots of their own, and a message committed after the snapshot of the
    -- statement that updates it would not be updated (nor returned) by that statement.
    v_ids := ARRAY(SELECT v.msg_id FROM tasker._lock_visible(p_queue, p_qty, clock_timestamp()) v);
    RETURN QUERY
    WITH candidates AS MATERIALIZED (
        SELECT p_queue AS queue, c.msg_id FROM unnest(v_ids) c(msg_id)
    ),
    -- Hide the claimed messages for the visibility timeout and count the delivery.
    claimed AS (
        UPDATE tasker.queue_messages m
           SET vt = clock_timestamp() + make_interval(secs => p_vt_seconds),
               read_ct = m.read_ct + 1
          FROM candidates c
         WHERE m.queue = c.queue AND m.msg_id = c.msg_id
        RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.priority, m.message
    )
    SELECT * FROM claimed ORDER BY claimed.priority DESC, claimed.msg_id;
END
$$;
COMMENT ON FUNCTION tasker.read(text,double precision,integer) IS
    'Hands out up to qty visible messages (priority, then age), hidden for vt_seconds.';

-- Reads and deletes up to p_qty visible messages in one step (at-most-once delivery).
CREATE FUNCTION tasker.pop(p_queue text, p_qty integer DEFAULT 1)
RETURNS SETOF tasker.message_record
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
BEGIN
    PERFORM tasker._queue_sequence(p_queue);
    PERFORM tasker._refuse_engine_queue(p_queue, 'pop');
    IF p_qty IS NULL OR p_qty < 1 THEN
        RAISE EXCEPTION 'qty must be >= 1, got %', coalesce(p_qty::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
    -- picked and locked in a statement of their own first (see read())
    v_ids := ARRAY(SELECT v.msg_id FROM tasker._lock_visible(p_queue, p_qty, clock_timestamp()) v);
    RETURN QUERY
    WITH candidates AS MATERIALIZED (
        SELECT p_queue AS queue, c.msg_id FROM unnest(v_ids) c(msg_id)
    ),
    popped AS (
        DELETE FROM tasker.queue_messages m
         USING candidates c
         WHERE m.queue = c.queue AND m.msg_id = c.msg_id
        RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.priority, m.message
    )
    SELECT * FROM popped ORDER BY popped.priority DESC, popped.msg_id;
END
$$;
COMMENT ON FUNCTION tasker.pop(text,integer) IS
    'Reads and deletes up to qty visible messages (at-most-once delivery).';

-- Moves a message's visibility time to now + p_vt_seconds (0 makes it visible at once);
-- returns the updated message, or no row when it does not exist.
CREATE FUNCTION tasker.set_vt(p_queue text, p_msg_id bigint, p_vt_seconds double precision)
RETURNS SETOF tasker.message_record
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._queue_sequence(p_queue);
    PERFORM tasker._refuse_engine_queue(p_queue, 'set_vt');
    PERFORM tasker._check_positive(p_vt_seconds, 'vt_seconds');
    RETURN QUERY
    UPDATE tasker.queue_messages m
       SET vt = clock_timestamp() + make_interval(secs => p_vt_seconds)
     WHERE m.queue = p_queue AND m.msg_id = p_msg_id
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.priority, m.message;
END
$$;
COMMENT ON FUNCTION tasker.set_vt(text,bigint,double precision) IS
    'Moves a message''s visibility time to now + vt_seconds; returns the message.';

-- Deletes one message (acknowledge); true when it existed.
CREATE FUNCTION tasker.delete(p_queue text, p_msg_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._queue_sequence(p_queue);
    PERFORM tasker._refuse_engine_queue(p_queue, 'delete');
    DELETE FROM tasker.queue_messages m WHERE m.queue = p_queue AND m.msg_id = p_msg_id;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION tasker.delete(text,bigint) IS
    'Deletes one message (acknowledge); true when it existed.';

-- Deletes many messages in one statement; returns the ids that existed.
CREATE FUNCTION tasker.delete(p_queue text, p_msg_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._queue_sequence(p_queue);
    PERFORM tasker._refuse_engine_queue(p_queue, 'delete');
    RETURN QUERY
    DELETE FROM tasker.queue_messages m
     WHERE m.queue = p_queue AND m.msg_id = ANY (p_msg_ids)
    RETURNING m.msg_id;
END
$$;
COMMENT ON FUNCTION tasker.delete(text,bigint[]) IS
    'Deletes many messages; returns the ids that existed.';

-- Moves one message to the archive (tasker.a_<queue>); true when it existed.
CREATE FUNCTION tasker.archive(p_queue text, p_msg_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM tasker.archive(p_queue, ARRAY[p_msg_id]));
END
$$;
COMMENT ON FUNCTION tasker.archive(text,bigint) IS
    'Moves one message to the queue''s archive; true when it existed.';

-- Moves many messages to the archive in one statement; returns the ids that existed.
CREATE FUNCTION tasker.archive(p_queue text, p_msg_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._queue_sequence(p_queue);
    PERFORM tasker._refuse_engine_queue(p_queue, 'archive');
    RETURN QUERY SELECT a.msg_id FROM tasker._archive_messages(p_queue, p_msg_ids) a(msg_id);
END
$$;
COMMENT ON FUNCTION tasker.archive(text,bigint[]) IS
    'Moves many messages to the queue''s archive; returns the ids that existed.';

-- The archive move itself, unguarded: the engine archives foreign and finished messages of its
-- own queues with it (claim_steps), so it must not go through the guarded archive().
CREATE FUNCTION tasker._archive_messages(p_queue text, p_msg_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM tasker.queue_messages m
         WHERE m.queue = p_queue AND m.msg_id = ANY (p_msg_ids)
        RETURNING m.*
    )
    INSERT INTO tasker.queue_archive (queue, msg_id, read_ct, enqueued_at, vt, priority, message)
    SELECT moved.queue, moved.msg_id, moved.read_ct, moved.enqueued_at, moved.vt, moved.priority, moved.message
      FROM moved
    RETURNING queue_archive.msg_id;
$$;

-- Deletes every live message of the queue; returns how many there were.
CREATE FUNCTION tasker.purge_queue(p_queue text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
    PERFORM tasker._queue_sequence(p_queue);
    PERFORM tasker._refuse_engine_queue(p_queue, 'purge_queue');
    DELETE FROM tasker.queue_messages m WHERE m.queue = p_queue;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION tasker.purge_queue(text) IS
    'Deletes every live message of a queue; refuses a namespace''s engine queue (TS005).';

-- Queue length, messages visible now, age of the newest and oldest message, total ever sent.
CREATE FUNCTION tasker.metrics(p_queue text) RETURNS tasker.queue_metrics
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_seq    regclass := tasker._queue_sequence(p_queue);
    v_result tasker.queue_metrics;
BEGIN
    SELECT p_queue,
           count(*),
           count(*) FILTER (WHERE m.vt <= clock_timestamp()),
           extract(epoch FROM clock_timestamp() - max(m.enqueued_at))::double precision,
           extract(epoch FROM clock_timestamp() - min(m.enqueued_at))::double precision,
           coalesce(pg_sequence_last_value(v_seq), 0),
           clock_timestamp()
      INTO v_result
      FROM tasker.queue_messages m
     WHERE m.queue = p_queue;
    RETURN v_result;
END
$$;
COMMENT ON FUNCTION tasker.metrics(text) IS
    'One queue''s length, visible messages, newest/oldest age and total ever sent.';

-- metrics() for every queue, ordered by name.
CREATE FUNCTION tasker.metrics_all() RETURNS SETOF tasker.queue_metrics
LANGUAGE sql STABLE AS $$
    SELECT m.*
      FROM tasker.queues q
     CROSS JOIN LATERAL tasker.metrics(q.queue_name) m
     ORDER BY q.queue_name;
$$;
COMMENT ON FUNCTION tasker.metrics_all() IS
    'metrics() of every queue, ordered by name.';
