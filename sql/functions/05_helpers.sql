-- Small helpers shared by the other function files: argument checks, JSON number checks,
-- retry backoff, semantic-version sort keys, the limits the engine reads (tasker.settings)
-- and checks, and the settings it fixes (the park interval). All internal (leading underscore).

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

-- An engine limit from tasker.settings (migration 0003), e.g. 'max_payload_bytes'. Only the
-- schema owner can change the table; a session setting cannot raise a limit.
CREATE FUNCTION tasker._setting_int(p_name text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_value bigint;
BEGIN
    SELECT s.value INTO v_value FROM tasker.settings s WHERE s.name = p_name;
    IF v_value IS NULL THEN
        RAISE EXCEPTION 'tasker.settings has no row %; restore it (see sql/migrations/0003_settings.sql)',
            quote_literal(p_name) USING ERRCODE = 'P0002';
    END IF;
    RETURN v_value;
END
$$;

-- Refuses a value that is over its limit (TV021), naming it, its size and the limit. The size
-- is that of the value's text form (octet_length of the text, or of a jsonb's JSON text):
-- the real size, never the stored, possibly compressed, one.
CREATE FUNCTION tasker._raise_too_large(p_what text, p_bytes bigint, p_setting text, p_limit bigint) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RAISE EXCEPTION '% is % bytes, more than the limit of % bytes (% in tasker.settings)',
        p_what, p_bytes, p_limit, p_setting USING ERRCODE = 'TV021';
END
$$;

-- Checks a text against a limit of tasker.settings; NULL passes.
CREATE FUNCTION tasker._check_text_size(p_value text, p_setting text, p_what text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_bytes bigint := octet_length(p_value);
    v_limit bigint;
BEGIN
    IF v_bytes IS NULL THEN
        RETURN;
    END IF;
    v_limit := tasker._setting_int(p_setting);
    IF v_bytes > v_limit THEN
        PERFORM tasker._raise_too_large(p_what, v_bytes, p_setting, v_limit);
    END IF;
END
$$;

-- Checks a jsonb value (by the length of its JSON text) against a limit of tasker.settings;
-- NULL passes.
CREATE FUNCTION tasker._check_json_size(p_value jsonb, p_setting text, p_what text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM tasker._check_text_size(p_value::text, p_setting, p_what);
END
$$;

-- Visibility delay for messages of a task in error: they wait here until retry_step or
-- resolve_step wakes them; the interval only bounds how long a missed wake-up can last.
CREATE FUNCTION tasker._park_interval() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '5 minutes' $$;
