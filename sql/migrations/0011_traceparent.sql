-- 0011_traceparent: the W3C trace context a task was created under (the `traceparent` option),
-- handed to every step of it by claim_steps so a worker's step spans join the creator's trace.
-- Version 00 of the format only: `00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>`,
-- lowercase, neither id all zeros (55 characters; the format bounds its size).
ALTER TABLE tasker.tasks ADD COLUMN traceparent text
    CONSTRAINT tasks_traceparent_format CHECK (
        traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        AND substr(traceparent, 4, 32) <> repeat('0', 32)
        AND substr(traceparent, 37, 16) <> repeat('0', 16)
    );
COMMENT ON COLUMN tasker.tasks.traceparent IS
    'W3C trace context (traceparent header, version 00) the task was created under; its steps'' spans are children of it.';
