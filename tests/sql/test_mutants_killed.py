"""Checks the mutation campaign (`make mutate`, tests/mutation) found missing at the SQL level:
each test kills the SQL mutant named in its docstring (re-run one with
`python -m tests.mutation.sql_mutants --only ID`)."""

from __future__ import annotations

import pytest

from tasker_pg import db
from tasker_pg.errors import ValidationError
from tests.support.engine import assert_healthy, claim, single, start


async def test_extend_leases_refuses_a_zero_or_over_a_year_lease(conn: db.Connection) -> None:
    """70_leases:74:le_to_lt:0 (`p_lease_seconds < 0`): a 0 s heartbeat was accepted and made
    the claimed message visible at once, handing the running step to the next claimer."""
    await start(conn, single())
    [row] = await claim(conn, lease=30)
    fence = {"step_uuid": str(row["step_uuid"]), "attempt": 1, "claim_seq": row["claim_seq"]}
    for bad in (0, -1, 31536000.5):
        with pytest.raises(ValidationError, match="lease_seconds must be > 0") as err:
            await conn.extend_leases([fence], bad)
        assert err.value.error_code == "invalid_argument"
    [ok] = await conn.extend_leases([fence], 31536000)
    assert ok["extended"] is True
    await assert_healthy(conn)
