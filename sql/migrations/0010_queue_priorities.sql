-- 0010_queue_priorities: the priorities other than 0 each queue's messages may carry, so a claim
-- can probe each of them by index descent instead of discovering them from the claim index.
--
-- A claim with a visibility window (claim_steps' p_visible_since, which the worker passes) reads,
-- per priority, only the index range vt BETWEEN since AND now. Finding which priorities are
-- present by walking the claim index (what a claim without a window does) visits, from the start
-- of the index, every entry that is dead but not yet removable: under a held snapshot that is
-- every message handled since it began. Priority 0 is always probed; a message of any other
-- priority is preceded by its row here, written in the transaction that creates its task
-- (create_task, create_tasks) or sends it (send, send_batch): a task's messages all carry its
-- priority. Rows are never rewritten, so a claim reading this table meets no dead tuples.
CREATE TABLE tasker.queue_priorities (
    queue     text    NOT NULL,
    priority  integer NOT NULL CHECK (priority <> 0),
    PRIMARY KEY (queue, priority)
);
COMMENT ON TABLE tasker.queue_priorities IS
    'The priorities other than 0 a queue''s messages may carry (written when a task or message with one is created); windowed claims probe each.';

INSERT INTO tasker.queue_priorities (queue, priority)
SELECT DISTINCT queue, priority FROM tasker.queue_messages WHERE priority <> 0
UNION
SELECT DISTINCT namespace, priority FROM tasker.tasks WHERE priority <> 0;
