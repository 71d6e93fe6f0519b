-- Flow control: concurrency limits per key, fairness across keys, and rate limits, enforced in
-- the claim (claim_steps and the hand-off of complete_and_claim) and nowhere else. Tables:
-- sql/migrations/0014_flow_control.sql.
--
-- - A step's keys are read from its task's context when the step is created (steps.lane,
--   steps.concurrency_key, steps.rate_limit), and its messages carry the lane.
-- - Fairness: a queue with lanes is claimed by _lock_lanes, which serves the lanes with the
--   lowest vtime first, an equal share each, and adds what each got to its vtime: round-robin,
--   so a key with 100,000 queued steps gets the same turns as one with 10.
-- - Concurrency: a claim admits a step only while fewer than its limit of steps with the same
--   key are in progress (tasker.flow_holders, counted under a transaction advisory lock per key
--   that claims only try: a claim that cannot get it leaves the key's steps for the next claim).
--   A lane whose key is at its limit is skipped before its messages are read.
-- - Rate limits: a claim takes one token per step from the step's bucket (tasker.rate_limits,
--   locked in name order); a step without a token is held: its message is made visible again
--   when its token is due, in the order they were held.
-- A held step is not leased, costs no attempt and writes nothing to the audit; tasker.explain_step
-- says what holds it.

-- The value of a flow key in a task context: a string as it is, a number as its JSON text; NULL
-- when there is no path, or nothing usable at it (refused when the task is created).
CREATE FUNCTION tasker._flow_key(p_path text, p_context jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE jsonb_typeof(v.val) WHEN 'string' THEN v.val #>> '{}' WHEN 'number' THEN v.val::text END
      FROM (SELECT CASE WHEN p_path IS NOT NULL THEN jsonb_path_query_first(p_context, p_path::jsonpath) END AS val) v
$$;

-- Refuses a task context that does not hold the flow keys the template's steps read from it (a
-- non-empty string or a number, at most max_name_bytes): checked when the task is created.
CREATE FUNCTION tasker._check_flow_context(p_tpl bigint, p_context jsonb, p_where text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_step record;
    v_key  text;
BEGIN
    FOR v_step IN SELECT DISTINCT ON (p.path) n.name, p.what, p.path
                    FROM tasker.named_steps n
                   CROSS JOIN LATERAL (VALUES ('concurrency', n.concurrency_path), ('fairness', n.lane_path)) p(what, path)
                   WHERE n.named_task_id = p_tpl AND p.path IS NOT NULL
                   ORDER BY p.path, n.step_index LOOP
        v_key := tasker._flow_key(v_step.path, p_context);
        IF v_key IS NULL OR v_key = '' THEN
            RAISE EXCEPTION '%: step % has the % key %, which the context does not hold as a non-empty string or a number',
                p_where, quote_literal(v_step.name), v_step.what, v_step.path USING ERRCODE = 'TV020';
        END IF;
        PERFORM tasker._check_text_size(v_key, 'max_name_bytes',
                                        format('%s: the %s key of step %L (%s)', p_where, v_step.what, v_step.name, v_step.path));
    END LOOP;
END
$$;

-- Makes sure the given lanes of a queue exist (and '', the lane of its messages without one)
-- and cannot be deleted before this transaction ends (KEY SHARE: claims may still serve them).
-- Every transaction that sends a message with a lane calls it. p_limits: the concurrency limit
-- of each lane when the lane is its steps' concurrency key, else NULL; a lane's limit only ever
-- grows (or goes to NULL), so skipping a lane at its limit never holds back a step whose own
-- limit is higher (the claim checks each step's own limit).
CREATE FUNCTION tasker._note_lanes(p_queue text, p_lanes text[], p_limits integer[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_want  text[];
    v_got   integer;
    v_min   bigint;
    v_round integer := 0;
BEGIN
    v_want := ARRAY(SELECT DISTINCT l FROM unnest(p_lanes || ''::text) l WHERE l IS NOT NULL ORDER BY 1);
    LOOP
        SELECT count(*) INTO v_got FROM (
            SELECT 1 FROM tasker.flow_lanes l
             WHERE l.queue = p_queue AND l.lane = ANY (v_want)
             ORDER BY l.lane
               FOR KEY SHARE) x;
        EXIT WHEN v_got = cardinality(v_want);
        v_round := v_round + 1;
        IF v_round > 10 THEN
            RAISE EXCEPTION 'could not create the lanes of queue % (deleted concurrently 10 times)', p_queue
                USING ERRCODE = '40001';
        END IF;
        SELECT min(l.vtime) INTO v_min FROM tasker.flow_lanes l WHERE l.queue = p_queue;
        -- a new lane's first turn comes before the other lanes' next
        INSERT INTO tasker.flow_lanes (queue, lane, vtime, concurrency_limit)
        SELECT p_queue, w.lane, coalesce(v_min, 0),
               (SELECT min(x.lim) FROM unnest(p_lanes, p_limits) x(lane, lim) WHERE x.lane = w.lane)
          FROM unnest(v_want) w(lane)
         ORDER BY w.lane
        ON CONFLICT (queue, lane) DO NOTHING;
    END LOOP;
    -- a lane shared by steps with another limit (or none): the most permissive applies to the
    -- lane (each step's own limit is checked when it is claimed)
    UPDATE tasker.flow_lanes l
       SET concurrency_limit = CASE WHEN x.has_null OR l.concurrency_limit IS NULL THEN NULL
                                    ELSE greatest(l.concurrency_limit, x.lim) END
      FROM (SELECT y.lane, max(y.lim) AS lim, bool_or(y.lim IS NULL) AS has_null
              FROM unnest(p_lanes, p_limits) y(lane, lim) WHERE y.lane IS NOT NULL GROUP BY y.lane) x
     WHERE l.queue = p_queue AND l.lane = x.lane AND l.concurrency_limit IS NOT NULL
       AND (x.has_null OR x.lim > l.concurrency_limit);
END
$$;

-- The steps of p_steps whose messages carry a lane: makes sure their lanes exist (_note_lanes).
-- Called by every function that sends step messages, after it sent them.
CREATE FUNCTION tasker._note_step_lanes(p_queue text, p_steps uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_lanes  text[];
    v_limits integer[];
BEGIN
    SELECT array_agg(s.lane), array_agg(CASE WHEN n.lane_path = n.concurrency_path THEN n.concurrency_limit END)
      INTO v_lanes, v_limits
      FROM tasker.steps s
      JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
     WHERE s.step_uuid = ANY (p_steps) AND s.lane IS NOT NULL;
    IF v_lanes IS NOT NULL THEN
        PERFORM tasker._note_lanes(p_queue, v_lanes, v_limits);
    END IF;
END
$$;

-- Adds the steps handed off by complete_and_claim to their lanes' turns (vtime), so a key whose
-- steps go from one worker to the next by hand-off takes its turns like any. A lane a claim
-- holds right now is passed over (never waited for: the caller holds steps and tasks).
CREATE FUNCTION tasker._charge_lanes(p_queue text, p_steps uuid[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE tasker.flow_lanes l
       SET vtime = l.vtime + c.n
      FROM (SELECT s.lane, count(*) AS n FROM tasker.steps s
             WHERE s.step_uuid = ANY (p_steps) AND s.lane IS NOT NULL GROUP BY s.lane) c
     WHERE l.queue = p_queue AND l.lane = c.lane
       AND l.ctid IN (SELECT k.ctid FROM tasker.flow_lanes k
                       WHERE k.queue = p_queue AND k.lane = c.lane
                         FOR NO KEY UPDATE SKIP LOCKED)
$$;

-- The advisory lock key of a queue's concurrency key.
CREATE FUNCTION tasker._concurrency_lock_key(p_queue text, p_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended('tasker.concurrency:' || p_queue || chr(1) || p_key, 0)
$$;

-- How many steps of each given concurrency key of a queue hold a lease now (claims admitted them,
-- they have not moved on and their message is not visible). A step whose lease expired, or that
-- checkpointed and waits to continue, is not counted: its message must be read (the claim
-- records the lost lease, or resumes the step), so its lane must not look full.
CREATE FUNCTION tasker._leased_per_key(p_queue text, p_keys text[], p_now timestamptz)
RETURNS TABLE (concurrency_key text, running integer)
LANGUAGE sql STABLE AS $$
    SELECT h.concurrency_key, count(*)::integer
      FROM tasker.flow_holders h
      JOIN tasker.steps s ON s.step_uuid = h.step_uuid
      JOIN tasker.queue_messages m ON m.queue = p_queue AND m.msg_id = s.msg_id
     WHERE h.queue = p_queue AND h.concurrency_key = ANY (p_keys) AND s.state = 'in_progress'
       AND m.vt > p_now
     GROUP BY h.concurrency_key
$$;

-- Locks up to p_qty visible messages of a queue that has lanes, lane by lane: the lanes with the
-- lowest vtime first, an equal share of p_qty each,
-- then an equal share of what is left to the lanes that had more, and so on; a lane whose key is at its concurrency limit is
-- skipped without reading its messages. Within a lane: highest priority, then the longest
-- visible. The lane '' (messages without a lane) is read through _lock_visible, with the
-- visibility window; the other lanes are read whole (a message a lane's limit held back is
-- older than any window). Returns the messages locked (o_msg_ids, o_messages, in hand-out
-- order) and the lanes read (o_lanes, their vtimes, what each got, whether each may have more), which
-- the caller passes to _serve_lanes once it has claimed the messages (not here: see there).
CREATE FUNCTION tasker._lock_lanes(p_queue text, p_qty integer, p_now timestamptz, p_since timestamptz,
                                   OUT o_msg_ids bigint[], OUT o_messages jsonb[], OUT o_lanes text[],
                                   OUT o_vtimes bigint[], OUT o_taken integer[], OUT o_open boolean[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_lanes   text[];
    v_vtimes  bigint[];
    v_room    integer[];
    v_taken   integer[];
    v_ids     bigint[] := '{}';
    v_msgs    jsonb[] := '{}';
    v_batch   bigint[];
    v_bmsgs   jsonb[];
    v_left    integer := p_qty;
    v_share   integer;
    v_n       integer;
    v_i       integer;
    v_want    integer;
    v_pass    integer;
    v_open    boolean[];
BEGIN
    -- the lanes in turn order: at most p_qty + 1 (each served lane gets one message at least),
    -- with the room their concurrency limit leaves (steps holding a lease: _leased_per_key).
    -- A lane at its limit is passed over here, before the LIMIT: it keeps its turn, and
    -- counted among the p_qty + 1 it would hide the lanes behind it for as long as its steps
    -- run (p_qty + 1 full lanes at the head: nothing claimed, whatever waits behind them).
    SELECT array_agg(x.lane ORDER BY x.vtime, x.lane), array_agg(x.vtime ORDER BY x.vtime, x.lane),
           array_agg(x.concurrency_limit ORDER BY x.vtime, x.lane)
      INTO v_lanes, v_vtimes, v_room
      FROM (SELECT l.lane, l.vtime, l.concurrency_limit
              FROM tasker.flow_lanes l
             WHERE l.queue = p_queue
               AND (l.concurrency_limit IS NULL
                    OR l.concurrency_limit > coalesce((SELECT r.running FROM tasker._leased_per_key(p_queue, ARRAY[l.lane], p_now) r), 0))
             ORDER BY l.vtime, l.lane
             LIMIT p_qty + 1) x;
    -- a lane that is its steps' concurrency key: the room its limit leaves
    v_room := ARRAY(
        SELECT CASE WHEN u.lim IS NULL THEN p_qty ELSE greatest(0, u.lim - coalesce(r.running, 0)) END
          FROM unnest(v_lanes, v_room) WITH ORDINALITY u(lane, lim, i)
          LEFT JOIN tasker._leased_per_key(p_queue, ARRAY(SELECT k.lane FROM unnest(v_lanes, v_room) k(lane, lim)
                                                           WHERE k.lim IS NOT NULL), p_now) r
            ON r.concurrency_key = u.lane AND u.lim IS NOT NULL
         ORDER BY u.i);
    IF v_lanes IS NULL THEN
        RETURN;
    END IF;
    v_n := cardinality(v_lanes);
    v_taken := array_fill(0, ARRAY[v_n]);
    v_open := array_fill(NULL::boolean, ARRAY[v_n]);  -- may have more visible messages (NULL: not read yet)
    -- first the visible messages of steps that hold a place of their key (a lost lease, a
    -- checkpoint waiting to continue), whatever their lane's room and turn: read in turn, they
    -- would come after the key's older backlog, whose head a full key holds back at every
    -- claim, so the lost lease would never be recorded (nor the checkpoint continued) and the
    -- key never freed. Each counts as taken from its lane (a continuation keeps its place).
    SELECT coalesce(array_agg(x.msg_id ORDER BY x.vt, x.msg_id), '{}'), coalesce(array_agg(x.message ORDER BY x.vt, x.msg_id), '{}')
      INTO v_ids, v_msgs
      FROM (SELECT m.msg_id, m.message, m.vt
              FROM tasker.flow_holders h
              JOIN tasker.steps s ON s.step_uuid = h.step_uuid
              JOIN tasker.queue_messages m ON m.queue = p_queue AND m.msg_id = s.msg_id
             WHERE h.queue = p_queue AND s.state = 'in_progress' AND m.vt <= p_now AND m.lane IS NOT NULL
             ORDER BY m.vt
             LIMIT p_qty
               FOR UPDATE OF m SKIP LOCKED) x;
    IF cardinality(v_ids) > 0 THEN
        v_taken := ARRAY(SELECT (SELECT count(*) FROM tasker.queue_messages m
                                  WHERE m.queue = p_queue AND m.msg_id = ANY (v_ids) AND m.lane = u.lane)::integer
                           FROM unnest(v_lanes) WITH ORDINALITY u(lane, i) ORDER BY u.i);
        v_left := v_left - cardinality(v_ids);
    END IF;
    -- passes: an equal share of what is left to each lane that may have more, in turn order,
    -- until the claim is full or no lane has more
    FOR v_pass IN 1 .. 4 LOOP
        v_share := (SELECT count(*) FROM generate_subscripts(v_lanes, 1) i
                     WHERE v_open[i] IS NOT false AND v_room[i] > v_taken[i]);
        EXIT WHEN v_left <= 0 OR v_share = 0;
        v_share := ceil(v_left::numeric / v_share)::integer;
        FOR v_i IN 1 .. v_n LOOP
            EXIT WHEN v_left <= 0;
            v_want := least(v_left, v_room[v_i] - v_taken[v_i], v_share);
            CONTINUE WHEN v_want <= 0 OR v_open[v_i] IS false;
            IF v_lanes[v_i] = '' THEN
                SELECT coalesce(array_agg(v.msg_id), '{}'), coalesce(array_agg(v.message), '{}') INTO v_batch, v_bmsgs
                  -- (it hands back what this claim locked before, then the next ones)
                  FROM tasker._lock_visible(p_queue, v_taken[v_i] + v_want, p_now, p_since) v
                 WHERE NOT (v.msg_id = ANY (v_ids));
            ELSE
                SELECT coalesce(array_agg(m.msg_id), '{}'), coalesce(array_agg(m.message), '{}') INTO v_batch, v_bmsgs
                  FROM (SELECT m.msg_id, m.message
                          FROM tasker.queue_messages m
                         WHERE m.queue = p_queue AND m.lane = v_lanes[v_i] AND m.vt <= p_now
                           AND NOT (m.msg_id = ANY (v_ids))
                         ORDER BY m.priority DESC, m.vt
                         LIMIT v_want
                           FOR UPDATE SKIP LOCKED) m;
            END IF;
            v_open[v_i] := cardinality(v_batch) = v_want;
            v_ids := v_ids || v_batch;
            v_msgs := v_msgs || v_bmsgs;
            v_taken[v_i] := v_taken[v_i] + cardinality(v_batch);
            v_left := v_left - cardinality(v_batch);
        END LOOP;
    END LOOP;

    o_msg_ids := v_ids;
    o_messages := v_msgs;
    o_lanes := v_lanes;
    o_vtimes := v_vtimes;
    o_taken := v_taken;
    o_open := v_open;
END
$$;
ALTER FUNCTION tasker._lock_lanes(text, integer, timestamptz, timestamptz) SET enable_seqscan = off;

-- The turns of the lanes a claim read (_lock_lanes: p_lanes, their vtimes when read, what each
-- got, whether each may have more): each lane served moves back by what it got; a lane with
-- nothing visible moves behind the lanes served, and is deleted when it holds no message at
-- all and no step of its key is in progress. claim_steps calls it last, after it claimed the
-- messages: the lane rows it locks here (and the idle ones it deletes, which a transaction
-- sending into one waits for in _note_lanes) are then held by a transaction that waits for
-- nothing more. Taken before the claim's task rows (_claim_exceptions), they closed a cycle
-- with complete_steps, which holds its tasks' rows when it sends their children into lanes.
CREATE FUNCTION tasker._serve_lanes(p_queue text, p_lanes text[], p_vtimes bigint[], p_taken integer[],
                                    p_open boolean[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_lanes   text[] := p_lanes;
    v_vtimes  bigint[] := p_vtimes;
    v_taken   integer[] := p_taken;
    v_open    boolean[] := p_open;
    v_top     bigint;
    v_idle    text[];
BEGIN
    -- turns: each lane served moves back by what it got; a lane read and found with nothing
    -- visible moves behind the furthest of them (one at its limit, or not read because the claim
    -- was full, keeps its place: it is first when a step of its key ends, or at the next claim)
    SELECT max(v_vtimes[i] + v_taken[i]) INTO v_top FROM generate_subscripts(v_lanes, 1) i WHERE v_taken[i] > 0;
    IF v_top IS NULL AND EXISTS (SELECT 1 FROM unnest(v_open) o WHERE o IS false) THEN
        -- no lane served: those found with nothing visible go behind every lane of the queue
        -- (kept in place, the same ones would be read, and found empty, at every claim, and the
        -- lanes behind them never)
        v_top := (SELECT l.vtime + 1 FROM tasker.flow_lanes l WHERE l.queue = p_queue
                   ORDER BY l.vtime DESC, l.lane DESC LIMIT 1);
    END IF;
    -- (locked in lane order first: concurrent claims of the queue wait for each other here, not
    -- in a cycle)
    PERFORM 1 FROM tasker.flow_lanes l
     WHERE l.queue = p_queue
       AND l.lane = ANY (ARRAY(SELECT u.lane FROM unnest(v_lanes, v_taken, v_open) u(lane, taken, open)
                                WHERE u.taken > 0 OR u.open IS false))
     ORDER BY l.lane
       FOR NO KEY UPDATE;
    UPDATE tasker.flow_lanes l
       SET vtime = CASE WHEN u.taken > 0 THEN l.vtime + u.taken ELSE greatest(l.vtime, coalesce(v_top, l.vtime)) END
      FROM unnest(v_lanes, v_taken, v_open) u(lane, taken, open)
     WHERE l.queue = p_queue AND l.lane = u.lane AND (u.taken > 0 OR u.open IS false);
    -- lanes with no message left at all, and no step in progress, go (unless a transaction
    -- sending into one holds it)
    -- (locked first, in a statement of its own, and checked in the next one: a transaction that
    -- sent a message into the lane held it KEY SHARE until it committed, so once the lock is
    -- ours a new snapshot sees that message; checked in the locking statement's snapshot, a
    -- message committed between that snapshot and the lock would be missed and its lane deleted)
    v_idle := ARRAY(SELECT k.lane FROM tasker.flow_lanes k
                     WHERE k.queue = p_queue AND k.lane <> ''
                       AND k.lane = ANY (ARRAY(SELECT u.lane FROM unnest(v_lanes, v_taken, v_open) u(lane, taken, open)
                                                WHERE u.taken = 0 AND u.open IS false))
                     ORDER BY k.lane
                       FOR UPDATE SKIP LOCKED);
    IF cardinality(v_idle) > 0 THEN
        DELETE FROM tasker.flow_lanes l
         WHERE l.queue = p_queue AND l.lane = ANY (v_idle)
           AND NOT EXISTS (SELECT 1 FROM tasker.queue_messages m WHERE m.queue = p_queue AND m.lane = l.lane)
           AND NOT EXISTS (SELECT 1 FROM tasker.flow_holders h JOIN tasker.steps s ON s.step_uuid = h.step_uuid
                            WHERE h.queue = p_queue AND h.concurrency_key = l.lane AND s.state = 'in_progress');
    END IF;
    -- the last lane of a queue is '': the queue goes back to plain claims (the same order: the
    -- lock, then the check in a new snapshot)
    IF EXISTS (SELECT 1 FROM tasker.flow_lanes k WHERE k.queue = p_queue AND k.lane = ''
                 FOR UPDATE SKIP LOCKED) THEN
        DELETE FROM tasker.flow_lanes l
         WHERE l.queue = p_queue AND l.lane = ''
           AND NOT EXISTS (SELECT 1 FROM tasker.flow_lanes k WHERE k.queue = p_queue AND k.lane <> '');
    END IF;
END
$$;
ALTER FUNCTION tasker._serve_lanes(text, text[], bigint[], integer[], boolean[]) SET enable_seqscan = off;

-- Creates a rate limit (a token bucket: per_second tokens a second, at most burst at once), or
-- changes one; a new bucket starts full. Returns the bucket.
CREATE FUNCTION tasker.set_rate_limit(p_name text, p_per_second double precision, p_burst integer DEFAULT NULL)
RETURNS tasker.rate_limits
LANGUAGE plpgsql AS $$
DECLARE
    v_row   tasker.rate_limits;
    v_burst integer;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'rate limit name % is invalid: 1 to 128 letters, digits, _, ., : and -, starting with a letter',
            coalesce(quote_literal(left(p_name, 200)), 'NULL') USING ERRCODE = 'TV002';
    END IF;
    IF p_per_second IS NULL OR NOT (p_per_second > 0 AND p_per_second <= 1000000) THEN
        RAISE EXCEPTION 'per_second must be > 0 and at most 1000000, got %', coalesce(p_per_second::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    v_burst := coalesce(p_burst, greatest(1, ceil(p_per_second)::integer));
    IF v_burst < 1 OR v_burst > 1000000 THEN
        RAISE EXCEPTION 'burst must be from 1 to 1000000, got %', v_burst USING ERRCODE = 'TV002';
    END IF;
    INSERT INTO tasker.rate_limits AS r (name, per_second, burst, tokens, refilled_at)
    VALUES (p_name, p_per_second, v_burst, v_burst, clock_timestamp())
    ON CONFLICT (name) DO UPDATE
       SET per_second = EXCLUDED.per_second, burst = EXCLUDED.burst,
           -- the tokens accumulated at the old rate, capped by the new burst
           tokens = least(EXCLUDED.burst::double precision,
                          r.tokens + r.per_second * greatest(0, extract(epoch FROM clock_timestamp() - r.refilled_at))),
           refilled_at = clock_timestamp(), parked_until = NULL, updated_at = clock_timestamp()
    RETURNING * INTO v_row;
    -- The steps the bucket holds wait for the times the old rate gave them (a message pushed to
    -- when its token was due): they are made visible now, and the next claims give them their
    -- turns at the new rate. A message a claim holds right now is skipped (that claim decides);
    -- so is a step waiting for a retry's backoff (its time is not the bucket's).
    UPDATE tasker.queue_messages m
       SET vt = clock_timestamp()
      FROM tasker.steps s
      JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
     WHERE s.rate_limit = p_name
       AND (s.state = 'enqueued' OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= clock_timestamp()))
       AND m.queue = t.namespace AND m.msg_id = s.msg_id AND m.vt > clock_timestamp()
       AND m.ctid IN (SELECT k.ctid FROM tasker.queue_messages k
                       WHERE k.queue = t.namespace AND k.msg_id = s.msg_id FOR UPDATE SKIP LOCKED);
    RETURN v_row;
END
$$;
COMMENT ON FUNCTION tasker.set_rate_limit(text, double precision, integer) IS
    'Creates or changes a rate limit (token bucket: per_second, burst; burst defaults to ceil(per_second)) that steps name with rate_limit.';

-- Deletes a rate limit no template step names. Returns whether it existed.
CREATE FUNCTION tasker.delete_rate_limit(p_name text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_user text;
BEGIN
    SELECT format('%s/%s %s, step %s', nt.namespace, nt.name, nt.version, n.name) INTO v_user
      FROM tasker.named_steps n JOIN tasker.named_tasks nt ON nt.named_task_id = n.named_task_id
     WHERE n.rate_limit = p_name
     ORDER BY nt.named_task_id, n.step_index
     LIMIT 1;
    IF v_user IS NOT NULL THEN
        RAISE EXCEPTION 'rate limit % is used by template %: it cannot be deleted (set a higher rate instead)',
            quote_literal(p_name), v_user USING ERRCODE = 'TV002';
    END IF;
    DELETE FROM tasker.rate_limits r WHERE r.name = p_name;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION tasker.delete_rate_limit(text) IS
    'Deletes a rate limit that no template step names; returns whether it existed.';

-- Every lane of every queue with flow control: its turn (vtime), its concurrency limit, how many
-- of its steps are in progress and how many messages it has visible now and in all.
CREATE VIEW tasker.v_flow_lanes AS
SELECT l.queue, l.lane, l.vtime, l.concurrency_limit,
       (SELECT count(*) FROM tasker.flow_holders h JOIN tasker.steps s ON s.step_uuid = h.step_uuid
         WHERE h.queue = l.queue AND h.concurrency_key = l.lane AND s.state = 'in_progress') AS in_progress,
       (SELECT count(*) FROM tasker.queue_messages m
         WHERE m.queue = l.queue AND m.lane IS NOT DISTINCT FROM nullif(l.lane, '') AND m.vt <= now()) AS visible,
       (SELECT count(*) FROM tasker.queue_messages m
         WHERE m.queue = l.queue AND m.lane IS NOT DISTINCT FROM nullif(l.lane, '')) AS queued
  FROM tasker.flow_lanes l;
COMMENT ON VIEW tasker.v_flow_lanes IS
    'The fairness lanes of each queue: turn (vtime), concurrency limit, steps in progress, messages visible and queued.';

-- Every rate limit with its tokens now.
CREATE VIEW tasker.v_rate_limits AS
SELECT r.name, r.per_second, r.burst,
       least(r.burst::double precision, r.tokens + r.per_second * greatest(0, extract(epoch FROM now() - r.refilled_at))) AS tokens_now,
       r.parked_until, r.created_at, r.updated_at,
       (SELECT count(*) FROM tasker.named_steps n WHERE n.rate_limit = r.name) AS template_steps
  FROM tasker.rate_limits r;
COMMENT ON VIEW tasker.v_rate_limits IS
    'Every rate limit (token bucket) with its tokens now, held steps'' next turn and how many template steps name it.';
