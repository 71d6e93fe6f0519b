-- Small helpers shared by the other function files: argument checks, JSON number checks,
-- retry backoff, semantic-version sort keys, and the limits the engine reads (tasker.settings)
-- and checks. All internal (leading underscore).

-- A number of seconds from 0 to a year (NaN is above every number in SQL, so it is refused too;
-- a larger value would overflow the interval it becomes).
CREATE FUNCTION tasker._check_positive(p_value double precision, p_what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL OR p_value < 0 OR p_value > 31536000 THEN
        RAISE EXCEPTION '% must be a number of seconds from 0 to 31536000 (a year), got %', p_what, coalesce(p_value::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
END
$$;

-- A version 7 UUID (RFC 9562) for the ids of tasks and steps: the first 48 bits are the Unix
-- time in milliseconds of the call, the rest are random (gen_random_uuid's, with the version
-- nibble changed from 4 to 7). Ids made later sort later, so the primary-key indexes of tasks
-- and steps grow at their right edge, and a queue drained in creation order reads their
-- pages in order: with random (version 4) ids every lookup touched a random leaf page, and a
-- million queued tasks kept the whole of both indexes hot (the `deep` bench scenario).
CREATE FUNCTION tasker._uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
    SELECT encode(set_bit(set_bit(
               overlay(uuid_send(gen_random_uuid())
                       PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                       FROM 1 FOR 6),
               52, 1), 53, 1), 'hex')::uuid
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

-- Is this JSON value null/absent or a number in [p_min, p_max] that double precision can hold?
-- (jsonb keeps any numeric: 1e400 or 1e-400 pass a numeric range test and then fail the cast
-- to double precision deep inside the caller; a non-zero magnitude below 2.5e-324 rounds to 0.)
CREATE FUNCTION tasker._is_number_json(p_value jsonb, p_min double precision, p_max double precision) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_value IS NULL OR jsonb_typeof(p_value) = 'null'
           OR coalesce(jsonb_typeof(p_value) = 'number'
                       AND (p_value::text)::numeric BETWEEN p_min::numeric AND p_max::numeric
                       AND ((p_value::text)::numeric = 0 OR abs((p_value::text)::numeric) >= 2.5e-324), false)
$$;

-- Does this JSON value hold, anywhere inside, a number too large for double precision (1e400)?
-- jsonb keeps it, but the Python side reads it as infinity and cannot write it back.
CREATE FUNCTION tasker._has_huge_number(p_value jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_path_exists(p_value, '$.** ? (@.type() == "number" && @.abs() > 1.7976931348623157e308)'), false)
$$;

-- The parts of a semantic version (semver 2.0.0): {major, minor, patch, pre-release or NULL},
-- or NULL when p_version is not one. Pre-release identifiers are non-empty, [0-9A-Za-z-], and a
-- numeric one has no leading zero; MAJOR, MINOR and PATCH fit an integer. Build metadata
-- (+...) is refused by register_template: semver ignores it for precedence, so two versions
-- differing only in it could not be told apart when picking the newest.
CREATE FUNCTION tasker._semver_parts(p_version text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN length(p_version) <= 64
                 AND m[1]::numeric <= 2147483647 AND m[2]::numeric <= 2147483647 AND m[3]::numeric <= 2147483647
                THEN m END
      FROM (SELECT regexp_match(p_version,
                '^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?$') AS m) x
$$;

-- Sort key of a semantic-version pre-release, one element per identifier (semver 2.0.0
-- precedence): a numeric identifier is '0', its length in two digits, then its digits, so
-- numbers of any length compare by value and below alphanumeric ones; an alphanumeric one is
-- '1' and its bytes in hex, so it compares in ASCII order under any collation; a longer list
-- of equal leading identifiers sorts higher. Compare keys of equal MAJOR.MINOR.PATCH only; a
-- release (no pre-release, NULL key) sorts above all of its pre-releases.
CREATE FUNCTION tasker._semver_pre_key(p_pre text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_pre IS NULL THEN NULL ELSE ARRAY(
        SELECT CASE WHEN ident ~ '^[0-9]+$' THEN '0' || lpad(length(ident)::text, 2, '0') || ident
                    ELSE '1' || encode(convert_to(ident, 'UTF8'), 'hex') END
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
