-- Small helpers shared by the other function files: argument checks, JSON number checks,
-- retry backoff, semantic-version sort keys, and the settings the engine reads
-- (tasker.max_payload_bytes). All internal (leading underscore).

CREATE FUNCTION tasker._check_positive(p_value double precision, p_what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL OR p_value < 0 THEN
        RAISE EXCEPTION '% must be a number >= 0, got %', p_what, coalesce(p_value::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
END
$$;

-- Retry delay in seconds for the attempt that just failed (1-based), from the step's backoff
-- settings: exponential base*2^(n-1), linear base*n, fixed base, none 0; capped; jitter j
-- takes a random share of up to j off the delay (it never exceeds the cap).
CREATE FUNCTION tasker._backoff_seconds(
    p_backoff text, p_base_ms integer, p_cap_ms integer, p_jitter double precision, p_attempt integer
) RETURNS double precision
LANGUAGE sql VOLATILE AS $$
    SELECT (d * (1 - p_jitter * random())) / 1000.0
      FROM (SELECT least(p_cap_ms::double precision,
                   CASE p_backoff
                       WHEN 'exponential' THEN p_base_ms * power(2::double precision, least(greatest(p_attempt, 1) - 1, 60))
                       WHEN 'linear' THEN p_base_ms::double precision * greatest(p_attempt, 1)
                       WHEN 'fixed' THEN p_base_ms::double precision
                       ELSE 0
                   END) AS d) x
$$;

-- Is this JSON value an integer in [p_min, 2^31-1]? (2.0 is not: it is a float in JSON.)
CREATE FUNCTION tasker._is_int_json(p_value jsonb, p_min integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_typeof(p_value) = 'number'
                    AND p_value::text ~ '^-?[0-9]{1,12}$'
                    AND (p_value::text)::numeric BETWEEN p_min AND 2147483647, false)
$$;

-- Is this JSON value null/absent or a finite number in [p_min, p_max]?
CREATE FUNCTION tasker._is_number_json(p_value jsonb, p_min double precision, p_max double precision) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_value IS NULL OR jsonb_typeof(p_value) = 'null'
           OR coalesce(jsonb_typeof(p_value) = 'number'
                       AND (p_value::text)::numeric BETWEEN p_min::numeric AND p_max::numeric, false)
$$;

-- Sort key of a semantic-version pre-release ('rc.10' -> {'0000000000rc'...}): numeric
-- identifiers compare by value and below alphanumeric ones; a longer list of equal leading
-- identifiers sorts higher, as the semver rules say.
CREATE FUNCTION tasker._semver_pre_key(p_pre text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_pre IS NULL THEN NULL ELSE ARRAY(
        SELECT CASE WHEN ident ~ '^[0-9]+$' THEN '0' || lpad(ident, 20, '0') ELSE '1' || ident END
          FROM unnest(string_to_array(p_pre, '.')) WITH ORDINALITY AS x(ident, ord)
         ORDER BY ord) END
$$;

-- The largest task context / step result accepted, in bytes (setting tasker.max_payload_bytes,
-- default 1 MiB; set it per database with ALTER DATABASE ... SET tasker.max_payload_bytes).
CREATE FUNCTION tasker._max_payload_bytes() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('tasker.max_payload_bytes', true), '')::integer, 1048576)
$$;
