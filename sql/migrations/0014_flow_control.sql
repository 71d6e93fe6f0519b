-- 0014_flow_control: concurrency limits per key, fairness across keys and rate limits, all
-- enforced in the claim (sql/functions/55_flow.sql).
--
-- A step's flow settings come from its template (`concurrency: {key, limit}`, `fairness: {key}`,
-- `rate_limit: name`, at template or step level). The key values are read from the task
-- context when the step is created and stored on the step; they never change afterwards.
--
-- Lanes: every message of a step with a fairness key (the concurrency key unless another is
-- declared) carries that key's value in queue_messages.lane. A queue that has lanes is claimed
-- lane by lane, round-robin (tasker.flow_lanes.vtime: how much each lane was served), so one
-- key's backlog cannot starve another's; the messages without a lane form one more lane, ''.
-- The claim index holds only messages without a lane, the lane index only those with one: a
-- lane held back by its concurrency limit is skipped without reading its messages.

-- Rate limits: named token buckets, refilled at per_second up to burst; a claim of a step that
-- names one takes a token. parked_until: the time up to which held steps were given a turn
-- (each held message is made visible again when its token is due).
CREATE TABLE tasker.rate_limits (
    name          text PRIMARY KEY CHECK (name ~ '^[A-Za-z][A-Za-z0-9_.:-]{0,127}$'),
    per_second    double precision NOT NULL CHECK (per_second > 0 AND per_second <= 1000000),
    burst         integer NOT NULL CHECK (burst >= 1 AND burst <= 1000000),
    tokens        double precision NOT NULL,
    refilled_at   timestamptz NOT NULL,
    parked_until  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tasker.rate_limits IS
    'Named token buckets (per_second, burst) that steps reference with rate_limit: a claim takes one token per step started.';

ALTER TABLE tasker.named_steps
    -- the effective settings of the step (its own, else its template's)
    ADD COLUMN concurrency_path  text,     -- $.path of the concurrency key in the task context
    ADD COLUMN concurrency_limit integer,  -- at most this many in progress per key value
    ADD COLUMN lane_path         text,     -- $.path of the fairness key (default: concurrency_path)
    ADD COLUMN rate_limit        text REFERENCES tasker.rate_limits (name);

ALTER TABLE tasker.steps
    ADD COLUMN concurrency_key text,       -- the value of concurrency_path in the task context
    ADD COLUMN lane            text,       -- the value of lane_path
    ADD COLUMN rate_limit      text;       -- named_steps.rate_limit, copied at creation

ALTER TABLE tasker.queue_messages ADD COLUMN lane text;

-- The claim index keeps what has no lane; the lane index what has one (neither predicate
-- column ever changes, so what was HOT stays HOT).
DROP INDEX tasker.queue_messages_claim_idx;
CREATE INDEX queue_messages_claim_idx ON tasker.queue_messages (priority DESC, vt) WHERE lane IS NULL;
CREATE INDEX queue_messages_lane_idx ON tasker.queue_messages (lane, priority DESC, vt) WHERE lane IS NOT NULL;

-- One row per lane of a queue that has messages with a lane (and '' for the queue's messages
-- without one). Written by the transaction that sends a message into the lane (which holds a
-- KEY SHARE lock on it until it commits, so the lane cannot be deleted under it), served and
-- deleted when idle by claims.
CREATE TABLE tasker.flow_lanes (
    queue   text   NOT NULL,
    lane    text   NOT NULL,
    -- how much the lane was served (claims take from the lanes with the lowest first); a new
    -- lane starts at the queue's lowest
    vtime   bigint NOT NULL DEFAULT 0,
    -- the concurrency limit of the lane's steps when the lane is their concurrency key (a claim
    -- skips a lane whose in-progress steps reach it); NULL: none, or another key
    concurrency_limit integer,
    PRIMARY KEY (queue, lane)
);
CREATE INDEX flow_lanes_turn_idx ON tasker.flow_lanes (queue, vtime, lane);
COMMENT ON TABLE tasker.flow_lanes IS
    'The fairness lanes of each queue (one per key value with queued steps, and '''' for steps without a key); claims serve the lowest vtime first.';

-- The steps of each concurrency key that a claim admitted. A row counts while its step is
-- in_progress: a completion, cancel_task, resolve_step and purge_finished delete it; a row
-- whose step left in_progress otherwise (a lost lease, a release) is deleted by the next claim
-- of the key that it would hold back.
CREATE TABLE tasker.flow_holders (
    step_uuid        uuid PRIMARY KEY,
    queue            text NOT NULL,
    concurrency_key  text NOT NULL,
    claimed_at       timestamptz NOT NULL
);
CREATE INDEX flow_holders_key_idx ON tasker.flow_holders (queue, concurrency_key);
COMMENT ON TABLE tasker.flow_holders IS
    'The claims each concurrency key admitted; those whose step is still in_progress count against its limit.';

-- Whether any step of the template has flow settings (task creation reads the keys only then).
ALTER TABLE tasker.named_tasks ADD COLUMN has_flow boolean NOT NULL DEFAULT false;
