"""What one client update costs the database (issue 21, item 6): a fixed few statements, whatever
the dialect, and none after the commit while the round still waits for other participants (the
"still open?" read is made in the upload's transaction; a small update opens no fold-on-arrival
folder). The counts are the route's contract with its cost: a change that adds a statement to
every upload should show here."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.permissions.conftest import StatementCounter
from tests.training.conftest import (
    as_safetensors,
    create_training,
    post_update,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
    upload_global,
)
from tests.training.test_lifecycle_api import wait_training

# token, model, visibility, training (FOR SHARE) + participation, global model and the caller's
# update of the round if any (SQLite: one statement; PostgreSQL: two, the global model and the
# update read after the lock), the update's rows (SQLite: models, local_models; PostgreSQL: one statement), the event (SQLite: counter,
# event; PostgreSQL: one statement), the "still open?" read
FIRST_UPLOAD = {"sqlite": 9, "postgresql": 8}
# ... a re-upload: the existing rows updated (models, local_models), its metrics deleted
RE_UPLOAD = {"sqlite": 10, "postgresql": 10}


async def test_an_update_that_leaves_the_round_open_costs_a_fixed_few_statements(
    app, client, alice, make_user
):
    engine = app.state.sessionmaker.kw["bind"]
    clients = [await make_user(f"stmt{i}", client=True) for i in range(3)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client, alice.headers, model_id, [c.id for c in clients], options={"skip_model_tests": True}
    )
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202, r.text
    await wait_training(
        client, alice.headers, training_id, lambda b: b["state"] == "O" and b["phase"] == "update"
    )
    state = state_of(initial)
    for c in clients:  # as clients do before they upload (their tokens' last use is then fresh)
        assert (await client.get(f"/api/models/{model_id}/info/", headers=c.headers)).status_code == 200
    # The first update of the round warms the per-process caches (the global model's layout).
    r = await post_update(client, clients[0].headers, model_id, as_safetensors(shifted(state, 1.0)), 0)
    assert r.status_code == 201, r.text

    async def counted(headers: dict[str, str], delta: float) -> list[str]:
        with StatementCounter(engine) as counter:
            r = await post_update(client, headers, model_id, as_safetensors(shifted(state, delta)), 0)
            assert r.status_code == 201, r.text
            await asyncio.sleep(0.3)  # the after-commit work, if any
        return counter.statements

    dialect = engine.dialect.name
    first = await counted(clients[1].headers, 2.0)
    assert len(first) == FIRST_UPLOAD[dialect], _listing(first)
    again = await counted(clients[1].headers, 3.0)
    assert len(again) == RE_UPLOAD[dialect], _listing(again)
    assert not any(s.lstrip().upper().startswith("SELECT PG_TRY_ADVISORY_LOCK") for s in first + again)


def _listing(statements: list[Any]) -> str:
    return "\n".join(str(s).split("\n")[0][:120] for s in statements)


async def test_the_still_open_read_probes_membership_per_update(app, client, alice, make_user):
    """The "still open?" read runs on every upload: it must find each arrived update's owner among
    the round's members by a key lookup. As ``owner IN (members)``, SQLite re-ran the correlated
    member list for every update row, and an upload cost O(arrived × participants) (15 ms of
    server CPU per upload at 320 of 321 arrived). On SQLite the plan must hold no correlated list
    subquery and no table scan; on either database the read answers "open" while one of the
    three participants is missing and "not open" once all three have uploaded."""
    import uuid

    from flplatform.orm.base import utcnow
    from flplatform.trainings.rounds import _round_open_statement, update_round_open

    clients = [await make_user(f"probe{i}", client=True) for i in range(3)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client, alice.headers, model_id, [c.id for c in clients], options={"skip_model_tests": True}
    )
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202, r.text
    await wait_training(
        client, alice.headers, training_id, lambda b: b["state"] == "O" and b["phase"] == "update"
    )
    state = state_of(initial)
    for i, c in enumerate(clients[:2]):
        r = await post_update(client, c.headers, model_id, as_safetensors(shifted(state, float(i))), 0)
        assert r.status_code == 201, r.text
    engine = app.state.sessionmaker.kw["bind"]
    async with app.state.sessionmaker() as session:
        assert await update_round_open(session, uuid.UUID(training_id), utcnow())
        if engine.dialect.name == "sqlite":
            compiled = _round_open_statement().compile(dialect=engine.dialect)
            connection = await session.connection()
            explain = "EXPLAIN QUERY PLAN " + str(compiled)
            plan = (await connection.exec_driver_sql(explain, (uuid.UUID(training_id).hex,))).all()
            details = [row[-1] for row in plan]
            assert not any("LIST SUBQUERY" in d or d.startswith("SCAN ") for d in details), details
    r = await post_update(client, clients[2].headers, model_id, as_safetensors(shifted(state, 2.0)), 0)
    assert r.status_code == 201, r.text
    async with app.state.sessionmaker() as session:
        assert not await update_round_open(session, uuid.UUID(training_id), utcnow())
