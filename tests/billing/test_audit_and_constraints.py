"""Audit trail of credentials, user deletion with billing history, append-only and Work constraints."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from flplatform.billing import works
from flplatform.orm.base import utcnow
from flplatform.orm.workqueue import Work, WorkKind, WorkStatus
from tests.billing.conftest import usd


async def _actions(client, admin, prefix):
    rows = (await client.get("/api/audit-log/", params={"action": prefix}, headers=admin.headers)).json()
    return [r["action"] for r in rows], rows


async def test_failed_logins_and_token_lifecycle_are_audited(client, app, admin, alice):
    r = await client.post("/api/auth/token/", data={"username": "alice", "password": "wrong-password"})
    assert r.status_code == 401
    basic = base64.b64encode(b"alice:also-wrong").decode()
    assert (
        await client.get("/api/users/myself/", headers={"Authorization": f"Basic {basic}"})
    ).status_code == 401
    # Failed logins are aggregated: one row per name, address and window, written when it ends.
    assert await app.state.login_guard.audit.flush(everything=True) == 1
    actions, rows = await _actions(client, admin, "auth.login_failed")
    assert actions == ["auth.login_failed"]
    assert rows[0]["count"] == 2 and rows[0]["subject_user_id"] == alice.id
    assert all(r["level"] == "WARNING" and r["ip"] for r in rows)
    created = await client.post("/api/users/myself/tokens/", json={"name": "ci"}, headers=alice.headers)
    assert created.status_code == 201, created.text
    token_id = created.json()["id"]
    assert (
        await client.delete(f"/api/users/myself/tokens/{token_id}/", headers=alice.headers)
    ).status_code in (200, 204)
    actions, rows = await _actions(client, admin, "auth.token")
    assert sorted(actions) == ["auth.token_created", "auth.token_revoked"]
    assert {r["actor_id"] for r in rows} == {alice.id}


async def test_user_with_billing_history_is_not_deleted(client, admin, alice, bob, books):
    await books.top_up(alice.user.id, usd(1))
    r = await client.delete(f"/api/users/{alice.id}/", headers=admin.headers)
    assert r.status_code == 409 and r.json()["code"] == "user_has_billing_history"
    assert (await client.delete(f"/api/users/{bob.id}/", headers=admin.headers)).status_code in (200, 204)


@pytest.mark.postgres_only
async def test_history_is_append_only_on_postgres(session, books, alice):
    op = await books.top_up(alice.user.id, usd(1))
    for statement in (
        "UPDATE ledger_postings SET amount = amount * 2",
        "DELETE FROM ledger_entries",
        "UPDATE billing_operations SET amount = 0",
        "DELETE FROM audit_log",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            await session.execute(text(statement))
        await session.rollback()
    assert await books.postings(op.entry_id)


async def test_work_status_is_one_constrained_column(session):
    server = await works.register_server(session, "gpu-1", gpu_memory=[80 * 2**30])
    work = await works.create_work(session, WorkKind.AGGREGATION, estimate_seconds=1.5)
    assert work.status == WorkStatus.WAITING
    work = await works.start_work(session, work.id, server)
    assert work.status == WorkStatus.PROCESSING and work.server_id == server.id
    work = await works.finish_work(session, work.id)
    assert work.status == WorkStatus.FINISHED and work.finished_at is not None
    from flplatform.errors import Conflict

    with pytest.raises(Conflict):
        await works.start_work(session, work.id)
    await session.commit()
    session.add(Work(kind=WorkKind.INFERENCE, status=WorkStatus.FINISHED))  # no finished_at
    with pytest.raises(IntegrityError):
        await session.flush()
    await session.rollback()
    with pytest.raises(IntegrityError):
        await session.execute(
            text(
                "INSERT INTO works (id, kind, status, created_at) VALUES ('00000000-0000-0000-0000-000000000001', "
                "'inference', 'sleeping', :now)"
            ),
            {"now": utcnow()},
        )
    await session.rollback()
