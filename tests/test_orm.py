"""Joined-table inheritance, deferred blobs, and the daisy-chain creation rule, on both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import InvalidRequestError

from flplatform.orm import GlobalModel, LocalModel, MeanModel, Model, SWAGModel, Training, TrainingState


async def _models(session, owner_id):
    g = GlobalModel(owner_id=owner_id, name="g", weights=b"w" * 10, input_shape=[None, 3])
    s = SWAGModel(owner_id=owner_id, name="s", swag_first_moment=b"1", swag_second_moment=b"2")
    session.add_all([g, s])
    await session.flush()
    m = MeanModel(owner_id=owner_id, name="m", members=[g, s])
    loc = LocalModel(owner_id=owner_id, base_model_id=g.id, sample_size=5, round=0, weights=b"l")
    session.add_all([m, loc])
    await session.commit()
    return g, s, m, loc


async def test_querying_model_returns_subclasses(app, alice):
    async with app.state.sessionmaker() as session:
        g, s, m, loc = await _models(session, alice.user.id)
    async with app.state.sessionmaker() as session:
        rows = {row.id: row for row in (await session.execute(select(Model))).scalars()}
        assert type(rows[g.id]) is GlobalModel and rows[g.id].input_shape == [None, 3]
        assert type(rows[s.id]) is SWAGModel
        assert type(rows[m.id]) is MeanModel and rows[m.id].name == "m"
        assert type(rows[loc.id]) is LocalModel and rows[loc.id].sample_size == 5
        globals_ = (await session.execute(select(GlobalModel))).scalars().all()
        assert {type(x) for x in globals_} == {GlobalModel, SWAGModel, MeanModel}


async def test_list_queries_do_not_load_blobs(app, alice):
    async with app.state.sessionmaker() as session:
        g, *_ = await _models(session, alice.user.id)
    async with app.state.sessionmaker() as session:
        row = (await session.execute(select(Model).where(Model.id == g.id))).scalar_one()
        with pytest.raises(InvalidRequestError):
            _ = row.weights
        from sqlalchemy.orm import undefer

        loaded = (
            await session.execute(
                select(GlobalModel).options(undefer(GlobalModel.weights)).where(GlobalModel.id == g.id)
            )
        ).scalar_one()
        assert loaded.weights == b"w" * 10


async def test_mean_model_members_load_explicitly(app, alice):
    from sqlalchemy.orm import selectinload

    async with app.state.sessionmaker() as session:
        g, s, m, _ = await _models(session, alice.user.id)
    async with app.state.sessionmaker() as session:
        mean = (
            await session.execute(select(MeanModel).options(selectinload(MeanModel.members)))
        ).scalar_one()
        assert {x.id for x in mean.members} == {g.id, s.id}


@pytest.mark.parametrize(
    "options,given,expected",
    [({}, 5, 5), ({"daisy_chain_period": 3}, 5, 15), ({"daisy_chain_period": 0}, 4, 4)],
)
async def test_daisy_chain_rule_on_creation(app, alice, options, given, expected):
    async with app.state.sessionmaker() as session:
        g = GlobalModel(owner_id=alice.user.id, name="g")
        session.add(g)
        await session.flush()
        t = Training(model_id=g.id, actor_id=alice.user.id, target_num_updates=given, options=options)
        session.add(t)
        await session.commit()
        tid = t.id
    async with app.state.sessionmaker() as session:
        stored = await session.get(Training, tid)
        assert stored.target_num_updates == expected and stored.state is TrainingState.INITIAL
        stored.target_num_updates = 7  # the rule applies at creation only
        await session.commit()
        assert (await session.get(Training, tid)).target_num_updates == 7


async def test_timestamps_are_utc_aware(app, alice):
    async with app.state.sessionmaker() as session:
        g, *_ = await _models(session, alice.user.id)
    async with app.state.sessionmaker() as session:
        row = await session.get(Model, g.id)
        assert row.created_at.tzinfo is not None and row.created_at.utcoffset().total_seconds() == 0
