-- 0001_queues: the pgmq-style queue layer (usable on its own, and the transport of the engine).
--
-- Layout. All live messages sit in one list-partitioned table, tasker.queue_messages, with one
-- partition per queue named tasker.q_<queue>; archived messages likewise in tasker.queue_archive
-- with partitions tasker.a_<queue>. One parent table lets every hot statement be static SQL
-- (planned once per session and cached) while each queue still has its own small table, its
-- own indexes and its own vacuum.
--
-- This file holds what has state (tables, indexes); the queue functions live in
-- sql/functions/10_queues.sql.
CREATE TABLE tasker.queues (
    queue_name  text PRIMARY KEY,
    -- per-queue sequence: msg_id source, and its last value is the total ever sent
    msg_seq     regclass NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE tasker.queues IS 'One row per queue; the partitions tasker.q_<name> and tasker.a_<name> hold its messages.';

CREATE TABLE tasker.queue_messages (
    queue        text        NOT NULL,
    msg_id       bigint      NOT NULL,
    read_ct      integer     NOT NULL DEFAULT 0,
    enqueued_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- visibility time: the message can be read when vt <= now; read() pushes it forward
    vt           timestamptz NOT NULL,
    priority     integer     NOT NULL DEFAULT 0,
    message      jsonb       NOT NULL,
    PRIMARY KEY (queue, msg_id)
) PARTITION BY LIST (queue);

-- The claim index: read() walks it in hand-out order (highest priority, then oldest) and
-- filters on vt. It deliberately leaves vt and read_ct out so that read()/set_vt() updates
-- stay HOT (an index on a column that changes on every read kills HOT updates).
CREATE INDEX queue_messages_claim_idx ON tasker.queue_messages (queue, priority DESC, msg_id);

CREATE TABLE tasker.queue_archive (
    queue        text        NOT NULL,
    msg_id       bigint      NOT NULL,
    read_ct      integer     NOT NULL,
    enqueued_at  timestamptz NOT NULL,
    archived_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    vt           timestamptz NOT NULL,
    priority     integer     NOT NULL,
    message      jsonb       NOT NULL,
    PRIMARY KEY (queue, msg_id)
) PARTITION BY LIST (queue);
