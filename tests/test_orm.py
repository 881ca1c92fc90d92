"""Joined-table inheritance, digests instead of bytes, and the daisy-chain creation rule, on both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import LargeBinary, select

from flplatform.orm import GlobalModel, LocalModel, MeanModel, Model, SWAGModel, Training, TrainingState


async def _models(session, owner_id):
    g = GlobalModel(owner_id=owner_id, name="g", weights_digest="a" * 64, input_shape=[None, 3])
    s = SWAGModel(owner_id=owner_id, name="s", swag_first_digest="1" * 64, swag_second_digest="2" * 64)
    session.add_all([g, s])
    await session.flush()
    m = MeanModel(owner_id=owner_id, name="m", members=[g, s])
    loc = LocalModel(owner_id=owner_id, base_model_id=g.id, sample_size=5, round=0, weights_digest="b" * 64)
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


async def test_rows_hold_digests_never_bytes(app, alice):
    async with app.state.sessionmaker() as session:
        g, *_ = await _models(session, alice.user.id)
    async with app.state.sessionmaker() as session:
        row = (await session.execute(select(Model).where(Model.id == g.id))).scalar_one()
        assert row.weights_digest == "a" * 64
    binary = [
        f"{table.name}.{column.name}"
        for table in Model.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, LargeBinary) and table.name != "metrics"
    ]
    assert binary == [], "model bytes belong in the blob store (flplatform.blobs)"


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
