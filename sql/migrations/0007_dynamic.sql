-- 0007_dynamic: conditional and batch workflows (decision points, batch fan-out, deferred
-- convergence). Template steps that are not created with the task (downstream of a decision,
-- batch workers, convergences after them) are marked is_dynamic; complete_steps creates them
-- when the deciding step's outcome commits (sql/functions/62_dynamic.sql). Three new limits.
ALTER TABLE tasker.named_steps
    -- not created with the task: a decision or a batchable step's outcome creates it
    ADD COLUMN is_dynamic boolean NOT NULL DEFAULT false,
    -- batch_worker steps only: batch_size, parallelism, cursor_field, failure_strategy
    -- (every default filled in), handed to the workers in inputs.batch_metadata
    ADD COLUMN batch_config jsonb,
    -- the named_step_ids of the batch_worker steps among its ancestors (empty for almost every
    -- step): a claim adds those workers' results, bounded by max_claim_dependency_bytes
    ADD COLUMN worker_ancestor_ids bigint[] NOT NULL DEFAULT '{}';

ALTER TABLE tasker.settings DROP CONSTRAINT settings_known_name;
ALTER TABLE tasker.settings ADD CONSTRAINT settings_known_name CHECK (name IN (
    'max_payload_bytes', 'max_error_bytes', 'max_text_bytes', 'max_name_bytes',
    'max_template_bytes', 'max_initialization_bytes',
    'max_steps_per_decision', 'max_batch_workers', 'max_claim_dependency_bytes'));
-- Counts (steps per decision, workers per batchable step) are at least 1 and at most 100000;
-- byte limits keep their old range.
ALTER TABLE tasker.settings DROP CONSTRAINT settings_sane_value;
ALTER TABLE tasker.settings ADD CONSTRAINT settings_sane_value CHECK (
    CASE WHEN name IN ('max_steps_per_decision', 'max_batch_workers')
         THEN value BETWEEN 1 AND 100000
         ELSE value <= 134217728
              AND value >= CASE name
                               WHEN 'max_name_bytes' THEN 256
                               WHEN 'max_error_bytes' THEN 65536
                               ELSE 1024
                           END
    END);

INSERT INTO tasker.settings (name, value, description) VALUES
    ('max_steps_per_decision', 100,
     'steps one decision outcome may create (the chosen steps and the steps downstream of them)'),
    ('max_batch_workers', 1000,
     'batch workers one batchable step''s outcome may create'),
    ('max_claim_dependency_bytes', 262144,
     'batch workers'' results included in a claim row (the rest is fetched with tasker.dependency_results)');
