-- 0003_settings: engine limits kept in a table that only the schema owner can change.
--
-- Every value a caller can send (task contexts and options, outcomes, errors, templates,
-- operator arguments, worker ids) is measured by the length in bytes of its text form (the
-- JSON text of a jsonb, the UTF-8 bytes of a text), never by its stored (compressed) size,
-- and refused with TV021 when it is over its limit here. The limits used to be a session
-- setting (tasker.max_payload_bytes) that any caller could raise with SET; they are not read
-- from settings any more. Nobody is granted anything on this table: change a limit as the
-- schema owner, e.g.
--   UPDATE tasker.settings SET value = 4194304 WHERE name = 'max_payload_bytes';
CREATE TABLE tasker.settings (
    name        text PRIMARY KEY,
    value       bigint NOT NULL,
    description text NOT NULL,
    CONSTRAINT settings_known_name CHECK (name IN (
        'max_payload_bytes', 'max_error_bytes', 'max_text_bytes', 'max_name_bytes',
        'max_template_bytes', 'max_initialization_bytes')),
    -- Sane values: at most 128 MiB (a jsonb value holds at most 255 MB), and at least enough
    -- for what the engine and its worker send themselves: the worker caps a failure's error
    -- object below 64 KiB (tasker_pg/outcome.py) and names itself in far less than 256 bytes.
    CONSTRAINT settings_sane_value CHECK (
        value <= 134217728
        AND value >= CASE name
                         WHEN 'max_name_bytes' THEN 256
                         WHEN 'max_error_bytes' THEN 65536
                         ELSE 1024
                     END)
);
COMMENT ON TABLE tasker.settings IS
    'Engine limits (bytes of the text form of each value a caller sends); only the schema owner can change them.';

INSERT INTO tasker.settings (name, value, description) VALUES
    ('max_payload_bytes', 1048576,
     'a task context, a step result, a checkpoint, step metadata, a resolve_step result'),
    ('max_error_bytes', 65536,
     'the error object of a failure (message, type, code, context, traceback)'),
    ('max_text_bytes', 65536,
     'free text: task option reason, cancel reason, template and step descriptions, a task option tags list'),
    ('max_name_bytes', 1024,
     'short strings: worker_id, idempotency_key, correlation_id, initiator, source_system, error_type, error_code'),
    ('max_template_bytes', 1048576,
     'a whole template body at register_template'),
    ('max_initialization_bytes', 65536,
     'one step''s handler.initialization (sent to the worker with every claim)');
