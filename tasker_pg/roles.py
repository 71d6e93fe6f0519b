"""The least-privilege group roles: list them and their members, give a login role one of them.

`migrate` creates the roles (`<prefix>tasker_owner`, `_worker`, `_client`, `_operator`,
`_reader`; NOLOGIN) and sql/functions/99_grants.sql grants each its entry points; this module
is what `tasker-pg roles` runs. A service gets its rights by membership:
`GRANT tasker_worker TO orders_worker` (or `tasker-pg roles grant --role worker orders_worker`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasker_pg import db, migrations
from tasker_pg.errors import NotFoundError, SchemaError, ValidationError

# The kinds a service may be given; the owner role is for the migrating user only.
GRANTABLE = ("worker", "client", "operator", "reader")


@dataclass(frozen=True)
class RoleInfo:
    """One group role of this database: its kind, name, whether it exists, its members."""

    kind: str
    name: str
    exists: bool
    members: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "exists": self.exists,
            "members": list(self.members),
        }


async def _prefix(conn: db.Connection) -> str:
    prefix = await migrations.role_prefix(conn)
    if prefix is None:
        raise SchemaError(
            "this database has no roles yet (no tasker.roles_config): run `tasker-pg migrate`",
            error_code="schema_outdated",
        )
    return prefix


async def list_roles(conn: db.Connection) -> tuple[str, list[RoleInfo]]:
    """(prefix, every group role with the roles that are direct members of it)."""
    prefix = await _prefix(conn)
    out = []
    for kind in migrations.ROLE_KINDS:
        name = migrations.role_name(prefix, kind)
        row = await conn.fetchrow(
            """
            SELECT r.oid IS NOT NULL AS exists,
                   ARRAY(SELECT m.rolname::text FROM pg_auth_members am
                           JOIN pg_roles m ON m.oid = am.member
                          WHERE am.roleid = r.oid ORDER BY 1) AS members
              FROM (SELECT $1::text AS name) n LEFT JOIN pg_roles r ON r.rolname = n.name
            """,
            name,
        )
        assert row is not None
        out.append(RoleInfo(kind, name, bool(row["exists"]), tuple(row["members"] or ())))
    return prefix, out


async def set_membership(conn: db.Connection, kind: str, login: str, *, grant: bool) -> str:
    """GRANT (or REVOKE) this database's `kind` role to (from) the existing role `login`;
    returns the group role's name."""
    if kind not in GRANTABLE:
        raise ValidationError(
            f"role kind {kind!r} cannot be granted here; one of {', '.join(GRANTABLE)}",
            error_code="invalid_argument",
        )
    name = migrations.role_name(await _prefix(conn), kind)
    if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", login):
        raise NotFoundError(
            f"role {login!r} does not exist; create it first, e.g. "
            f"CREATE ROLE {login} LOGIN PASSWORD '...'",
            error_code="role_not_found",
        )
    statement = await conn.fetchval(
        "SELECT format(CASE WHEN $3 THEN 'GRANT %I TO %I' ELSE 'REVOKE %I FROM %I' END, $1::text,"
        " $2::text)",
        name,
        login,
        grant,
    )
    await conn.execute(str(statement))
    return name
