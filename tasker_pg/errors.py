"""The project's exceptions: one base class, stable error codes, messages that say what to do.

Every error raised by tasker-pg is a `TaskerError`. `error_code` is stable and meant for
programs (logs, metrics, step outcomes); the message is meant for people and names the thing
that is wrong and, where there is one, the command or setting that fixes it.

`PermanentError` and `RetryableError` are raised by step handlers to steer retries; the rest are
raised by the library itself.
"""

from __future__ import annotations

from typing import Any


class TaskerError(Exception):
    """Base class of every tasker-pg error."""

    error_code: str = "tasker_error"
    # Set when the error came from PostgreSQL (see tasker_pg.db): its SQLSTATE.
    sqlstate: str | None = None

    def __init__(self, message: str, *, error_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if error_code is not None:
            self.error_code = error_code

    def __str__(self) -> str:
        return self.message


# --- handler-raised errors -------------------------------------------------------------------


class PermanentError(TaskerError):
    """A step failure retrying cannot fix (bad input, missing record): the step goes to error."""

    error_code = "permanent_error"

    def __init__(
        self,
        message: str,
        error_code: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, error_code=error_code)
        self.context: dict[str, Any] = dict(context or {})


class RetryableError(TaskerError):
    """A transient step failure: the step is retried, after `retry_after` seconds when given."""

    error_code = "retryable_error"

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        context: dict[str, Any] | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(message, error_code=error_code)
        if retry_after is not None and retry_after < 0:
            raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
        self.retry_after = retry_after
        self.context: dict[str, Any] = dict(context or {})


# --- configuration and database -------------------------------------------------------------


class ConfigurationError(TaskerError):
    """Something in the environment or the arguments is wrong before any work starts."""

    error_code = "configuration_error"


class DatabaseNotFoundError(ConfigurationError):
    """No database answered at any of the places tasker-pg looks for one."""

    error_code = "database_not_found"


class EmbeddedDatabaseError(TaskerError):
    """The embedded (self-started) PostgreSQL could not be initialised, started or stopped."""

    error_code = "embedded_database_error"


class DatabaseError(TaskerError):
    """PostgreSQL reported an error that has no more specific tasker-pg meaning."""

    error_code = "database_error"

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        error_code: str | None = None,
        position: int | None = None,
    ) -> None:
        super().__init__(message, error_code=error_code)
        self.sqlstate = sqlstate
        # 0-based character offset of the error in the statement text, when PostgreSQL gave one
        self.position = position


class TransientDatabaseError(DatabaseError):
    """PostgreSQL could not do it now (a lock or statement timeout, a cancelled query, a
    serialization failure or deadlock, too many connections, out of memory): sending the same
    thing again later can succeed, so nothing about it is a verdict on what was sent."""

    error_code = "database_busy"


class ConnectionLostError(TransientDatabaseError):
    """The connection to PostgreSQL failed or was closed; the operation may be retried."""

    error_code = "connection_lost"


class SchemaError(TaskerError):
    """The database schema is missing or older than this version of tasker-pg expects."""

    error_code = "schema_outdated"


class MigrationError(TaskerError):
    """A migration failed, or an applied migration file has changed since it was applied."""

    error_code = "migration_failed"


class ValidationError(TaskerError):
    """Input (a template, a context, a result, a name) breaks a rule; nothing was changed."""

    error_code = "validation_error"


class NotFoundError(TaskerError):
    """A named thing (queue, template, task, step) does not exist."""

    error_code = "not_found"


class InvalidStateError(TaskerError):
    """An operation is not allowed in the current state of a task or step."""

    error_code = "invalid_state"
