"""Which database errors refuse an outcome and which only delay it (tasker_pg.db).

Only a deterministic refusal may turn a handler's outcome into a failure; everything else,
unknown errors included, is transient and the worker sends the outcome again. The errors are
built the way asyncpg builds them from a server's ErrorResponse (its class per SQLSTATE) and
go through the one seam that translates them.
"""

from __future__ import annotations

import asyncpg
import pytest
from asyncpg.exceptions._base import PostgresMessageMeta

from tasker_pg import StepHandlerResult, db, jsonutil
from tasker_pg.errors import (
    ConnectionLostError,
    DatabaseError,
    InvalidStateError,
    NotFoundError,
    PermanentError,
    RetryableError,
    TransientDatabaseError,
    ValidationError,
)
from tasker_pg.outcome import (
    Fence,
    outcome_from_exception,
    outcome_from_result,
    refused_outcome,
    storable_text,
)

# (SQLSTATE, what it is, how the worker must treat it)
TABLE = [
    # our own SQLSTATEs: the engine refused what was sent
    ("TV030", "invalid outcome", "refusal"),
    ("TV021", "payload too large", "refusal"),
    ("TN004", "step not found", "refusal"),
    ("TS003", "step finished", "refusal"),
    # data exceptions coming from the outcome's values
    ("22001", "string_data_right_truncation (value too long)", "refusal"),
    ("22P02", "invalid_text_representation", "refusal"),
    ("22P05", "untranslatable_character (\\u0000 in jsonb)", "refusal"),
    ("22021", "character_not_in_repertoire (NUL byte)", "refusal"),
    ("22003", "numeric_value_out_of_range", "refusal"),
    ("54000", "program_limit_exceeded (jsonb too large)", "refusal"),
    # transient: the same statement can succeed later
    ("40001", "serialization_failure", "transient"),
    ("40P01", "deadlock_detected", "transient"),
    ("53000", "insufficient_resources", "transient"),
    ("53100", "disk_full", "transient"),
    ("53200", "out_of_memory", "transient"),
    ("53300", "too_many_connections", "transient"),
    ("55P03", "lock_not_available (lock_timeout)", "transient"),
    ("57014", "query_canceled (statement_timeout, pg_cancel_backend)", "transient"),
    # the session is gone
    ("08006", "connection_failure", "connection"),
    ("08003", "connection_does_not_exist", "connection"),
    ("57P01", "admin_shutdown", "connection"),
    ("57P02", "crash_shutdown", "connection"),
    ("57P03", "cannot_connect_now", "connection"),
    # anything else is never taken for a verdict
    ("XX000", "internal_error", "transient"),
    ("XX001", "data_corrupted", "transient"),
    ("42P01", "undefined_table (e.g. a concurrent migration)", "transient"),
    ("25P02", "in_failed_sql_transaction", "transient"),
    ("55000", "object_not_in_prerequisite_state", "transient"),
    ("58030", "io_error", "transient"),
    ("ZZ999", "a SQLSTATE nobody knows", "transient"),
]


def server_error(sqlstate: str, message: str = "boom") -> asyncpg.PostgresError:
    """The exception asyncpg raises for an ErrorResponse carrying `sqlstate`."""
    cls = PostgresMessageMeta.get_message_class_for_sqlstate(sqlstate)
    exc = cls(message)
    exc.sqlstate = sqlstate  # UnknownPostgresError has no class-level SQLSTATE
    return exc


@pytest.mark.parametrize(("sqlstate", "what", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_classification_table(sqlstate: str, what: str, expected: str) -> None:
    assert db.classify_sqlstate(sqlstate) == expected, what
    error = db.translate_error(server_error(sqlstate))
    assert error.sqlstate == sqlstate
    assert db.is_refusal(error) is (expected == "refusal"), what
    if expected == "connection":
        assert isinstance(error, ConnectionLostError)
    if expected != "refusal":
        assert isinstance(error, DatabaseError)
    if sqlstate in ("40001", "40P01", "53300", "55P03", "57014"):
        assert isinstance(error, TransientDatabaseError)
        assert error.error_code == "database_busy"


def test_own_sqlstates_keep_their_exception_types() -> None:
    assert isinstance(db.translate_error(server_error("TV030")), ValidationError)
    assert isinstance(db.translate_error(server_error("TN004")), NotFoundError)
    assert isinstance(db.translate_error(server_error("TS003")), InvalidStateError)


def test_missing_sqlstate_is_transient() -> None:
    assert db.classify_sqlstate(None) == "transient"
    assert db.classify_sqlstate("") == "transient"
    assert not db.is_refusal(DatabaseError("no SQLSTATE at all"))


def test_a_value_the_driver_cannot_encode_is_a_refusal() -> None:
    # asyncpg refuses a query argument before sending it: the outcome itself is at fault.
    error = db.translate_error(asyncpg.exceptions._base.DataError("invalid input for $1"))
    assert isinstance(error, ValidationError)
    assert db.is_refusal(error)


def test_non_database_errors_are_never_refusals() -> None:
    assert not db.is_refusal(ConnectionLostError("lost the database connection"))
    assert not db.is_refusal(TransientDatabaseError("busy", sqlstate="22001"))
    assert not db.is_refusal(RuntimeError("a bug"))
    assert not db.is_refusal(db.translate_error(TimeoutError()))
    assert not db.is_refusal(db.translate_error(OSError("connection reset")))


# --- outcomes hold only what jsonb can store ---------------------------------------------------


def test_unstorable_characters_are_replaced_and_counted_in_failures() -> None:
    fence = Fence("00000000-0000-0000-0000-000000000001", 1, 1)
    failure = outcome_from_exception(
        PermanentError("a\x00b\udcff", context={"k\x00": ["v\ud800"]}), fence=fence, duration_ms=1
    )
    error = failure.to_json()["error"]
    assert error["message"] == "a\ufffdb\ufffd [tasker: 4 NUL / lone-surrogate characters replaced]"
    assert error["context"] == {"k\ufffd": ["v\ufffd"]}
    jsonutil.dumps(failure.to_json()).encode("utf-8")  # encodable: no lone surrogate left


def test_unstorable_characters_are_replaced_in_results_and_metadata() -> None:
    fence = Fence("00000000-0000-0000-0000-000000000001", 1, 1)
    success = outcome_from_result(
        StepHandlerResult.success({"f\x00": ("x\udcff", 1)}, metadata={"m": "\x00"}),
        fence=fence,
        duration_ms=1,
    ).to_json()
    assert success["kind"] == "success"
    assert success["result"] == {"f\ufffd": ["x\ufffd", 1]}
    assert success["metadata"] == {"m": "\ufffd", "tasker_replaced_characters": 3}
    clean = outcome_from_result(StepHandlerResult.success({"a": "ok"}), fence=fence, duration_ms=1)
    assert clean.to_json()["metadata"] == {}
    assert storable_text("x\x00y") == ("x\ufffdy", 1)


def test_a_refused_failure_becomes_a_minimal_one_once() -> None:
    fence = Fence("00000000-0000-0000-0000-000000000001", 1, 1)
    failure = outcome_from_exception(
        RetryableError("slow down", retry_after=1e12), fence=fence, duration_ms=1
    )
    refusal = ValidationError("outcome #1: error.retry_after must be ...", error_code="x")
    minimal = refused_outcome(failure, refusal)
    assert minimal is not None
    error = minimal.to_json()["error"]
    assert error["error_code"] == "outcome_refused"
    assert error["retryable"] is True and error["retry_after"] is None
    assert "retry_after must be" in error["message"] and "slow down" in error["message"]
    assert refused_outcome(minimal, refusal) is None
