"""Issue 18, flat rounds: a round transition and the training routes cost the same number of SQL
statements, and load the same number of ``User`` ORM objects, whatever the number of registered
participants (the training's participant list is never loaded as ORM objects; what needs every
participant reads column tuples in one statement),
and the detail's ``participant_status`` can be paged (``participants_limit``/``participants_offset``
and ``GET /api/trainings/{id}/participants/``). Counted with the ``before_cursor_execute``
listener of the permission tests, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event, func, select

from flplatform.orm import Notification, RoundSelection, User
from flplatform.orm.base import utcnow
from flplatform.trainings import notifications as notify
from flplatform.trainings import participants, selection
from flplatform.trainings.phases import next_or_finish
from flplatform.trainings.repository import get_training, global_model
from flplatform.trainings.rounds import round_condition
from tests.permissions.conftest import StatementCounter
from tests.training.conftest import create_training, upload_global

SAMPLE = 3
_LOADING: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("users_loaded", default=None)


def _on_load(target: Any, _context: Any) -> None:
    seen = _LOADING.get()
    if seen is not None:
        seen.append(target)


@contextlib.contextmanager
def users_loaded() -> Iterator[list[Any]]:
    """The ``User`` ORM objects loaded from the database by this context (and the tasks it
    starts: the request), not by background tasks."""
    seen: list[Any] = []
    token = _LOADING.set(seen)
    event.listen(User, "load", _on_load)
    try:
        yield seen
    finally:
        event.remove(User, "load", _on_load)
        _LOADING.reset(token)


async def _fleet(app: Any, client: Any, alice: Any, n: int, tag: str) -> tuple[str, list[User]]:
    """A started training of ``n`` participants (created directly: no password hashing), asking
    ``SAMPLE`` per round."""
    async with app.state.sessionmaker() as session:
        users = [User(username=f"{tag}-c{i:03d}", client=True) for i in range(n)]
        session.add_all(users)
        await session.commit()
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [str(u.id) for u in users],
        target_num_updates=50,
        options={"clients_per_round": SAMPLE, "seed": 7},
    )
    return training_id, users


async def _round_transition(app: Any, training_id: str) -> None:
    """What the runtime does when a round's last update arrived and the round ends (minus the
    aggregation itself): the training under its row lock, the round condition, the next round's
    draw, selection, billing hold and notifications."""
    async with app.state.sessionmaker() as session:
        training = await get_training(session, uuid.UUID(training_id), lock=True)
        model = await global_model(session, training.model_id)
        await round_condition(session, training, model, utcnow())
        model.round += 1
        await next_or_finish(session, training, model)
        await session.commit()


async def _costs(app: Any, client: Any, alice: Any, n: int, tag: str) -> dict[str, int]:
    engine = app.state.sessionmaker.kw["bind"]
    training_id, _ = await _fleet(app, client, alice, n, tag)
    out: dict[str, int] = {}
    with StatementCounter(engine) as counter, users_loaded() as users:
        r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
        assert r.status_code == 202, r.text
    out["start"], out["start: users loaded"] = counter.count, len(users)
    with StatementCounter(engine) as counter, users_loaded() as users:
        await _round_transition(app, training_id)
    out["round transition"], out["round transition: users loaded"] = counter.count, len(users)
    for name, url in {
        "detail (paged)": f"/api/trainings/{training_id}/?participants_limit=5",
        "participants page": f"/api/trainings/{training_id}/participants/?limit=5",
        "rounds": f"/api/trainings/{training_id}/rounds/",
        "models": f"/api/trainings/{training_id}/models/",
    }.items():
        with StatementCounter(engine) as counter, users_loaded() as users:
            r = await client.get(url, headers=alice.headers)
            assert r.status_code == 200, (url, r.text)
        out[name], out[f"{name}: users loaded"] = counter.count, len(users)
    async with app.state.sessionmaker() as session:
        selected = (
            await session.execute(
                select(func.count()).where(RoundSelection.training_id == uuid.UUID(training_id))
            )
        ).scalar_one()
    assert selected == 2 * SAMPLE  # round 0 (start) and round 1 (the transition)
    return out


async def test_round_and_routes_do_not_grow_with_the_fleet(app, client, alice):
    small = await _costs(app, client, alice, 5, "small")
    big = await _costs(app, client, alice, 50, "big")
    assert small == big, {"5 participants": small, "50 participants": big}
    assert max(v for k, v in big.items() if k.endswith("users loaded")) <= 2  # the caller, the actor


async def test_participants_paging(app, client, alice):
    training_id, users = await _fleet(app, client, alice, 12, "pg")
    full = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    everyone = full["participant_status"]
    assert [p["username"] for p in everyone] == sorted(u.username for u in users)  # unchanged default
    assert len(full["participants"]) == 12

    r = await client.get(
        f"/api/trainings/{training_id}/participants/?limit=5&offset=5", headers=alice.headers
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Total-Count"] == "12"
    assert r.json() == everyone[5:10]
    pages = []
    for offset in (0, 5, 10):
        r = await client.get(
            f"/api/trainings/{training_id}/participants/?limit=5&offset={offset}", headers=alice.headers
        )
        pages += r.json()
    assert pages == everyone

    paged = (
        await client.get(
            f"/api/trainings/{training_id}/?participants_limit=4&participants_offset=8", headers=alice.headers
        )
    ).json()
    assert paged["participant_status"] == everyone[8:12]
    assert paged["participants"] == full["participants"]  # the id list stays whole
    only_offset = (
        await client.get(f"/api/trainings/{training_id}/?participants_offset=10", headers=alice.headers)
    ).json()
    assert only_offset["participant_status"] == everyone[10:]

    r = await client.get(f"/api/trainings/{training_id}/participants/?limit=0", headers=alice.headers)
    assert r.status_code == 422
    r = await client.get(f"/api/trainings/{training_id}/?participants_limit=0", headers=alice.headers)
    assert r.status_code == 422


async def test_participants_page_is_for_readers_only(app, client, alice, bob):
    training_id, _ = await _fleet(app, client, alice, 3, "ro")
    r = await client.get(f"/api/trainings/{training_id}/participants/", headers=bob.headers)
    assert r.status_code in (403, 404)


async def test_start_notifies_everyone_in_one_insert(app, client, alice):
    """TRAINING_START for every participant: one row each, written by one statement."""
    engine = app.state.sessionmaker.kw["bind"]
    training_id, users = await _fleet(app, client, alice, 40, "nt")
    with StatementCounter(engine) as counter:
        r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
        assert r.status_code == 202, r.text
    inserts = [s for s in counter.statements if s.lstrip().upper().startswith("INSERT INTO NOTIFICATIONS")]
    assert len(inserts) == 2  # TRAINING_START to all 40, UPDATE_ROUND_START to the 3 drawn
    async with app.state.sessionmaker() as session:
        rows = (
            await session.execute(
                select(Notification.recipient_id).where(
                    Notification.training_id == uuid.UUID(training_id),
                    Notification.notification_type == notify.TRAINING_START,
                )
            )
        ).scalars()
        assert set(rows) == {u.id for u in users}


async def test_draw_by_position_is_the_documented_draw(app, client, alice):
    """Sampling reads only the drawn participants (positions of the (username, id) order picked
    by the seeded sample over the count); the selection is the one the documented draw over all
    participants makes, also with usernames whose order differs between collations."""
    names = ["Zed", "alpha", "Émile", "émile", "_x", "b-1", "B-2", "zz", "Ωmega", "a b", "A", "0"]
    async with app.state.sessionmaker() as session:
        users = [User(username=f"{name}{i}", client=True) for i in range(3) for name in names]
        session.add_all(users)
        await session.commit()
    model_id = await upload_global(client, alice.headers)
    for options in ({"clients_per_round": 5, "seed": 3}, {"clients_per_round": 0.25}):
        training_id = await create_training(
            client, alice.headers, model_id, [str(u.id) for u in users], options=options
        )
        async with app.state.sessionmaker() as session:
            training = await get_training(session, uuid.UUID(training_id))
            everyone = await participants.candidates(session, training.id)
            for round_ in range(6):
                by_position = await selection.draw_participants(session, training, round_)
                documented = await selection.draw(session, training, round_, everyone)
                assert [r.id for r in by_position] == [r.id for r in documented]
                assert len(by_position) == selection.sample_size(options, len(users))
