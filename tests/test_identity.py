"""Identity hygiene (issue 14): a username never equals another user's email (or the reverse),
names never differ in case only, login look-ups find one user, clashes are 409 — enforced by the
``login_names`` unique key, also under concurrency — and the organisation-less space does not
list superusers or other users' contact details."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import uuid

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import select

from flplatform.auth import login_names
from flplatform.db import create_engine, create_sessionmaker
from flplatform.errors import Conflict
from flplatform.migrate import alembic_config, upgrade
from flplatform.orm import LoginName, User
from flplatform.orm.audit import AuditLog
from flplatform.users.schemas import UserCreate
from flplatform.users.service import create_user

ROOT = User(username="<tests>", is_superuser=True)


def basic(login: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}


async def _names(app, user_id) -> set[str]:
    async with app.state.sessionmaker() as session:
        return set(
            (await session.execute(select(LoginName.name).where(LoginName.user_id == user_id))).scalars()
        )


class TestClashes:
    async def test_username_equal_to_another_users_email_is_409(self, client, admin, alice):
        for name in ("alice@example.org", "ALICE@Example.ORG"):
            body = {"username": name, "password": "long-password"}
            resp = await client.post("/api/users/", json=body, headers=admin.headers)
            assert resp.status_code == 409, resp.text
            assert resp.json()["code"] == "username_taken" and resp.json()["detail"]

    async def test_email_equal_to_another_users_username_is_409(self, client, admin, make_user):
        await make_user("carol@example.org", email="carol-real@example.org")
        body = {"username": "dave", "password": "long-password", "email": "Carol@example.org"}
        resp = await client.post("/api/users/", json=body, headers=admin.headers)
        assert resp.status_code == 409 and resp.json()["code"] == "email_taken"

    async def test_names_differing_in_case_or_unicode_form_clash(self, client, admin, alice):
        for name in ("Alice", "ＡＬＩＣＥ"):  # fullwidth letters normalise (NFKC) to ALICE
            resp = await client.post(
                "/api/users/", json={"username": name, "password": "long-password"}, headers=admin.headers
            )
            assert resp.status_code in (409, 422), resp.text
        resp = await client.post(
            "/api/users/", json={"username": "Alice", "password": "long-password"}, headers=admin.headers
        )
        assert resp.status_code == 409 and resp.json()["code"] == "username_taken"

    async def test_own_username_may_equal_own_email(self, client, admin, app):
        body = {"username": "erin@example.org", "password": "long-password", "email": "erin@example.org"}
        resp = await client.post("/api/users/", json=body, headers=admin.headers)
        assert resp.status_code == 201, resp.text
        assert await _names(app, uuid.UUID(resp.json()["id"])) == {"erin@example.org"}

    @pytest.mark.parametrize("method", ["PATCH", "PUT"])
    async def test_update_to_another_users_name_or_email_is_409(self, client, admin, alice, bob, method):
        for caller in (bob, admin):
            for body, code in (
                ({"username": "alice"}, "username_taken"),
                ({"username": "ALICE"}, "username_taken"),
                ({"username": "alice@example.org"}, "username_taken"),
                ({"email": "alice@example.org"}, "email_taken"),
            ):
                resp = await client.request(
                    method, f"/api/users/{bob.id}/", json=body, headers=caller.headers
                )
                assert resp.status_code == 409, (method, body, resp.text)
                assert resp.json()["code"] == code
        me = await client.get("/api/users/myself/", headers=bob.headers)
        assert me.json()["username"] == "bob" and me.json()["email"] == "bob@example.org"

    async def test_renaming_and_deleting_free_the_old_names(self, client, admin, alice, app):
        resp = await client.patch(
            f"/api/users/{alice.id}/",
            json={"username": "alicia", "email": "a2@example.org"},
            headers=alice.headers,
        )
        assert resp.status_code == 200
        assert await _names(app, alice.user.id) == {"alicia", "a2@example.org"}
        again = await client.post(
            "/api/users/",
            json={"username": "alice", "password": "long-password", "email": "alice@example.org"},
            headers=admin.headers,
        )
        assert again.status_code == 201, again.text
        assert (
            await client.delete(f"/api/users/{again.json()['id']}/", headers=admin.headers)
        ).status_code == 200
        third = await client.post(
            "/api/users/",
            json={"username": "Alice@Example.org", "password": "long-password"},
            headers=admin.headers,
        )
        assert third.status_code == 201, third.text


class TestLogin:
    async def test_login_is_case_insensitive_and_finds_one_user(self, client, alice, make_user):
        # The attack of the finding: a username spelling alice's email is refused, so her email
        # login keeps working (it answered 500 MultipleResultsFound).
        with pytest.raises(Conflict):
            await make_user("alice@example.org", email="mallory@example.org")
        for login in ("alice", "ALICE", "alice@example.org", "Alice@Example.ORG"):
            resp = await client.get("/api/users/myself/", headers=basic(login, alice.password))
            assert resp.status_code == 200 and resp.json()["username"] == "alice", login
        token = await client.post(
            "/api/auth/token/", data={"username": "ALICE@example.org", "password": alice.password}
        )
        assert token.status_code == 200


class TestOrganisationLessSpace:
    async def test_superusers_and_contact_details_are_not_listed(self, client, admin, alice, bob):
        listed = await client.get("/api/users/", headers=alice.headers)
        assert listed.status_code == 200
        users = {u["username"]: u for u in listed.json()}
        assert "admin" not in users and "admin@example.org" not in listed.text
        assert listed.headers["X-Total-Count"] == str(len(users))
        assert users["bob"]["email"] is None and users["bob"]["message_endpoint"] is None
        assert users["alice"]["email"] == "alice@example.org"  # one's own
        assert (await client.get(f"/api/users/{admin.id}/", headers=alice.headers)).status_code == 404
        other = await client.get(f"/api/users/{bob.id}/", headers=alice.headers)
        assert other.status_code == 200 and other.json()["email"] is None
        everyone = await client.get("/api/users/", headers=admin.headers)
        assert {"admin", "alice", "bob"} <= {u["username"] for u in everyone.json()}
        assert "bob@example.org" in everyone.text


# --------------------------------------------------------------------------- concurrency


def _data(username: str, email: str | None) -> UserCreate:
    return UserCreate(username=username, email=email, password="long-password")


@pytest.mark.postgres_only
async def test_simultaneous_name_and_email_claims_one_wins(app):
    """Two registrations in flight at once — name X and email X — both pass the friendly check;
    the unique key decides: the second waits for the first and gets a 409, never a duplicate."""
    maker = app.state.sessionmaker
    async with maker() as first, maker() as second:
        await create_user(first, _data("x@example.org", None), created_by=ROOT)  # flushed, not committed
        racing = asyncio.create_task(create_user(second, _data("xavier", "X@example.org"), created_by=ROOT))
        await asyncio.sleep(0.5)
        assert not racing.done()  # blocked on the unique key held by the first transaction
        await first.commit()
        with pytest.raises(Conflict) as refused:
            await racing
        assert refused.value.code == "email_taken"
        await second.rollback()
    async with maker() as session:
        owners = (
            await session.execute(select(LoginName.user_id).where(LoginName.name == "x@example.org"))
        ).all()
        assert len(owners) == 1
        assert (await session.execute(select(User).where(User.username == "xavier"))).first() is None


async def test_many_simultaneous_registrations_of_one_name(client, app, monkeypatch):
    monkeypatch.setattr(app.state.settings, "allow_self_registration", True)
    bodies = [
        {"username": "zed@example.org", "password": "long-password"}
        if i % 2
        else {"username": f"zed{i}", "email": "ZED@example.org", "password": "long-password"}
        for i in range(6)
    ]
    answers = await asyncio.gather(*(client.post("/api/users/", json=b) for b in bodies))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201] + [409] * 5, [a.text for a in answers]


# --------------------------------------------------------------------------- the migration


@pytest.fixture
def fresh_url(db_backend, postgres_cluster, tmp_path):
    if db_backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    if postgres_cluster is None:
        pytest.skip("PostgreSQL not available")
    return postgres_cluster.create_database(f"flp_m_{uuid.uuid4().hex[:8]}")


def _upgrade_to_just_before_login_names(url: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(url))
    target = next(r for r in script.walk_revisions() if r.path.endswith("_login_names.py"))

    def ancestry(revision: str) -> set[str]:  # the revision and everything it needs
        return {r.revision for r in script.iterate_revisions(revision, "base")}

    # Every revision but login_names and what comes after it: upgrade to the latest of them.
    before = [r.revision for r in script.walk_revisions() if target.revision not in ancestry(r.revision)]
    for revision in before:
        if not any(revision in ancestry(other) for other in before if other != revision):
            upgrade(url, revision)


async def test_migration_backfills_and_repairs_collisions(fresh_url):
    _upgrade_to_just_before_login_names(fresh_url)
    engine = create_engine(fresh_url)
    maker = create_sessionmaker(engine)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    people = [  # (username, email), oldest first
        ("victim", "victim@example.org"),
        ("victim@example.org", None),  # the attack: a username spelling the victim's email
        ("Victim", "other@example.org"),  # differs in case only
        ("same@example.org", "same@example.org"),  # own username = own email: fine
        ("plain", None),
    ]
    async with maker() as session:
        for i, (username, email) in enumerate(people):
            session.add(
                User(username=username, email=email, password_hash=None, created_at=start + dt.timedelta(i))
            )
        await session.commit()
    upgrade(fresh_url)
    async with maker() as session:
        users = {u.email or u.username: u for u in (await session.execute(select(User))).scalars()}
        names = {n.name: n.user_id for n in (await session.execute(select(LoginName))).scalars()}
        repairs = (
            (await session.execute(select(AuditLog).where(AuditLog.action == "identity.login_name_repaired")))
            .scalars()
            .all()
        )
    await engine.dispose()
    victim = users["victim@example.org"]
    assert victim.username == "victim" and names["victim"] == names["victim@example.org"] == victim.id
    renamed = {u.username for u in users.values()} - {"victim", "same@example.org", "plain"}
    assert renamed == {"victim@example.org-2", "Victim-2"}
    assert names["same@example.org"] == users["same@example.org"].id
    assert len(names) == 7 and len(set(names.values())) == 5
    assert len(repairs) == 2 and all("renamed" in r.message for r in repairs)


def test_login_key_is_the_one_normalisation():
    assert login_names.login_key("ＡＬＩＣＥ") == login_names.login_key("alice") == "alice"
    assert login_names.login_key("Straße") == login_names.login_key("STRASSE")


async def test_admin_bootstrap_respects_login_names(app, make_user):
    """FLP_ADMIN_*: a user already holding the name (in another case) or a clashing email leaves
    things as they are instead of failing the start-up."""
    from flplatform.users.service import ensure_admin

    await make_user("Root", email="root-owner@example.org")
    async with app.state.sessionmaker() as session:
        assert await ensure_admin(session, username="root", email=None, password="long-password") is None
        await make_user("root@example.org", email="x@example.org")
        assert (
            await ensure_admin(session, username="ops", email="root@example.org", password="long-password")
            is None
        )
        created = await ensure_admin(
            session, username="ops", email="ops@example.org", password="long-password"
        )
        assert created is not None and created.is_superuser
        await session.commit()
