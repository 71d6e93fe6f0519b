"""`tasker-pg roles`: list the group roles with their members, grant and revoke membership."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.cli.test_cli import cli, ok_json


@pytest.fixture
async def service(dsn: str) -> AsyncIterator[str]:
    """A login role (no membership yet), dropped afterwards."""
    name = f"svc_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE ROLE {name} LOGIN")
    try:
        yield name
    finally:
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


def _members(dsn: str) -> dict[str, list[str]]:
    doc = ok_json(dsn, "roles", "list")
    assert doc["prefix"] == ""
    assert all(r["exists"] for r in doc["roles"])
    return {r["kind"]: r["members"] for r in doc["roles"]}


async def test_roles_grant_list_revoke(dsn: str, service: str) -> None:
    assert service not in _members(dsn)["worker"]
    granted = ok_json(dsn, "roles", "grant", "--role", "worker", service)
    assert granted == {"role": "tasker_worker", "login": service, "member": True}
    assert service in _members(dsn)["worker"]
    text = cli(dsn, "roles", "list")
    assert text.returncode == 0, text.stderr
    assert "tasker_worker" in text.stdout and service in text.stdout
    revoked = cli(dsn, "roles", "revoke", "--role", "worker", service)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked tasker_worker from {service}" in revoked.stdout
    assert service not in _members(dsn)["worker"]


async def test_roles_grant_refuses_unknown_login_and_owner(dsn: str) -> None:
    missing = cli(dsn, "roles", "grant", "--role", "client", "no_such_login_x")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr and "CREATE ROLE" in missing.stderr
    owner = cli(dsn, "roles", "grant", "--role", "owner", "postgres")
    assert owner.returncode == 2  # argparse: not a choice


async def test_migrate_refuses_another_role_prefix(dsn: str) -> None:
    result = cli(dsn, "migrate", "--role-prefix", "acme_")
    assert result.returncode == 1
    assert "role_prefix_mismatch" in result.stderr
    again = cli(dsn, "migrate", "--role-prefix", "")
    assert again.returncode == 0, again.stderr
    assert "no change" in again.stdout
