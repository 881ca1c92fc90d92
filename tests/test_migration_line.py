"""One migration line (issue 15 item 6): the script directory has a single head, a database that
installations hold today (migrated to the five old branch heads, with data) upgrades to it with
its rows intact, and autogenerate then sees no difference from ``flplatform.orm``. Both
databases."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select

from flplatform.blobs import store_for
from flplatform.db import create_engine, create_sessionmaker
from flplatform.migrate import AUTOGENERATE_OPTIONS, alembic_config, head_revision, upgrade
from flplatform.orm import (
    Base,
    BrokerMessage,
    BrokerTopic,
    GlobalModel,
    GlobalModelRound,
    LedgerAccount,
    Operation,
    Organization,
    QueuedWork,
    Training,
    User,
)
from flplatform.orm.base import UTCDateTime

# The heads of the five domain branches before they were merged by 0801 (history: never edit).
OLD_HEADS = ("0102", "0201", "0302", "0401", "0705")
# What alembic_version holds at those heads: Alembic leaves out a revision that another one
# depends on (0302 depends on 0102 and 0201, 0705 on 0401).
OLD_VERSION_ROWS = {"0302", "0705"}


def test_one_head() -> None:
    heads = ScriptDirectory.from_config(alembic_config("")).get_heads()
    assert len(heads) == 1, (
        f"migrations/versions/ has {len(heads)} heads {sorted(heads)}; the revisions form one line: "
        "set the new revision's down_revision to the current head (the revision that was the "
        "only head before yours) instead of branching, or merge with `alembic merge heads`."
    )


@pytest.fixture
def fresh_url(db_backend: str, postgres_cluster: Any, tmp_path: Any) -> str:
    if db_backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'line.db'}"
    if postgres_cluster is None:
        pytest.skip("PostgreSQL not available")
    return str(postgres_cluster.create_database(f"flp_line_{uuid.uuid4().hex[:8]}"))


# --------------------------------------------------------------------------- rows at the old heads
#
# Written with Core tables of the schema *at the old heads*, not with the ORM: the ORM follows
# the newest schema, these rows stand for what an installation holds today. A later revision that
# rewrites one of these columns changes the expected value in this test on purpose.

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def _table(table_name: str, /, **columns: Any) -> sa.TableClause:
    return sa.table(table_name, *(sa.column(column, type_) for column, type_ in columns.items()))


ID, TEXT, BOOL, INT, TIME, JSON, BYTES = (
    sa.Uuid(),
    sa.String(),
    sa.Boolean(),
    sa.BigInteger(),
    UTCDateTime(),
    sa.JSON(),
    sa.LargeBinary(),
)

TABLES = {
    "collections": _table(
        "collections",
        id=ID,
        kind=TEXT,
        name=TEXT,
        parent_id=ID,
        organization_id=ID,
        created_at=TIME,
        updated_at=TIME,
    ),
    "users": _table(
        "users",
        id=ID,
        username=TEXT,
        email=TEXT,
        password_hash=TEXT,
        first_name=TEXT,
        last_name=TEXT,
        profile=TEXT,
        is_active=BOOL,
        is_staff=BOOL,
        is_superuser=BOOL,
        actor=BOOL,
        client=BOOL,
        time_format=TEXT,
        date_format=TEXT,
        date_separator=TEXT,
        datetime_separator=TEXT,
        decimal_separator=TEXT,
        notify_client_removed=BOOL,
        organization_id=ID,
        created_at=TIME,
        updated_at=TIME,
    ),
    "login_names": _table("login_names", name=TEXT, user_id=ID),
    "memberships": _table("memberships", id=ID, user_id=ID, collection_id=ID, created_at=TIME),
    "models": _table(
        "models",
        id=ID,
        kind=TEXT,
        owner_id=ID,
        organization_id=ID,
        round=INT,
        weights=BYTES,
        weights_format=TEXT,
        weights_size=INT,
        created_at=TIME,
        updated_at=TIME,
    ),
    "global_models": _table(
        "global_models",
        id=ID,
        name=TEXT,
        description=TEXT,
        input_shape=JSON,
        preprocessing=BYTES,
        has_preprocessing=BOOL,
    ),
    "global_model_rounds": _table(
        "global_model_rounds",
        id=ID,
        model_id=ID,
        round=INT,
        weights=BYTES,
        weights_format=TEXT,
        weights_size=INT,
        created_at=TIME,
        updated_at=TIME,
    ),
    "trainings": _table(
        "trainings",
        id=ID,
        model_id=ID,
        actor_id=ID,
        organization_id=ID,
        state=TEXT,
        phase=TEXT,
        target_num_updates=INT,
        start_round=INT,
        last_update=TIME,
        uncertainty_method=TEXT,
        aggregation_method=TEXT,
        options=JSON,
        metric_names=JSON,
        locked=BOOL,
        aggregator_state=BYTES,
        created_at=TIME,
        updated_at=TIME,
    ),
    "ledger_accounts": _table(
        "ledger_accounts",
        id=ID,
        key=TEXT,
        kind=TEXT,
        currency=TEXT,
        owner_id=ID,
        balance=INT,
        created_at=TIME,
    ),
    "ledger_entries": _table(
        "ledger_entries",
        id=ID,
        key=TEXT,
        kind=TEXT,
        description=TEXT,
        actor_id=ID,
        fingerprint=TEXT,
        created_at=TIME,
    ),
    "ledger_postings": _table(
        "ledger_postings", id=ID, entry_id=ID, account_id=ID, currency=TEXT, amount=INT, created_at=TIME
    ),
    "billing_operations": _table(
        "billing_operations",
        id=ID,
        key=TEXT,
        kind=TEXT,
        entry_id=ID,
        actor_id=ID,
        payer_id=ID,
        currency=TEXT,
        amount=INT,
        owner_income=INT,
        description=TEXT,
        created_at=TIME,
    ),
    "broker_topics": _table(
        "broker_topics",
        id=ID,
        kind=TEXT,
        slug=TEXT,
        is_public=BOOL,
        anonymous_can_consume=BOOL,
        supports_dasf=BOOL,
        store_messages=TEXT,
        dispatch=TEXT,
        owner_id=ID,
        organization_id=ID,
        api_info=JSON,
        created_at=TIME,
        updated_at=TIME,
    ),
    "broker_messages": _table(
        "broker_messages",
        id=INT,
        topic_id=ID,
        message_id=ID,
        user_id=ID,
        content=TEXT,
        transient=BOOL,
        created_at=TIME,
    ),
    "works": _table("works", id=ID, kind=TEXT, status=TEXT, model_id=ID, created_at=TIME),
    "queued_works": _table(
        "queued_works",
        id=ID,
        handler=TEXT,
        payload=JSON,
        dedupe_key=TEXT,
        attempts=INT,
        max_attempts=INT,
        submitter_id=ID,
    ),
}


def _rows() -> dict[str, list[dict[str, Any]]]:
    """A user in an organisation, a model with a training, a paid top-up in the ledger, a broker
    topic with a stored message and a queued aggregation job: one row per table (two where a
    ledger entry needs both sides), in insertion order."""
    org, user, model, account, system, entry, operation, topic, work = (uuid.uuid4() for _ in range(9))
    stamps = {"created_at": T0, "updated_at": T0}
    return {
        "collections": [
            {
                "id": org,
                "kind": "organization",
                "name": "Acme",
                "parent_id": None,
                "organization_id": org,
                **stamps,
            }
        ],
        "users": [
            {
                "id": user,
                "username": "carol",
                "email": "carol@example.org",
                "password_hash": "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
                "first_name": "Carol",
                "last_name": "Example",
                "profile": "",
                "is_active": True,
                "is_staff": False,
                "is_superuser": False,
                "actor": True,
                "client": False,
                "time_format": "24H",
                "date_format": "DMY",
                "date_separator": ".",
                "datetime_separator": " ",
                "decimal_separator": ".",
                "notify_client_removed": False,
                "organization_id": org,
                **stamps,
            }
        ],
        # 0705 backfilled login_names for the users it found; rows written after it carry their own.
        "login_names": [{"name": "carol", "user_id": user}, {"name": "carol@example.org", "user_id": user}],
        "memberships": [{"id": uuid.uuid4(), "user_id": user, "collection_id": org, "created_at": T0}],
        "models": [
            {
                "id": model,
                "kind": "global",
                "owner_id": user,
                "organization_id": org,
                "round": 3,
                "weights": b"\x00\x01weights\xff",
                "weights_format": "safetensors",
                "weights_size": 10,
                **stamps,
            }
        ],
        "global_models": [
            {
                "id": model,
                "name": "digits",
                "description": "a CNN",
                "input_shape": [1, 8, 8],
                "preprocessing": b"\x10preprocessing",
                "has_preprocessing": True,
            }
        ],
        "global_model_rounds": [
            {
                "id": uuid.uuid4(),
                "model_id": model,
                "round": 2,
                "weights": b"\x00round-2",
                "weights_format": "safetensors",
                "weights_size": 8,
                **stamps,
            }
        ],
        "trainings": [
            {
                "id": uuid.uuid4(),
                "model_id": model,
                "actor_id": user,
                "organization_id": org,
                "state": "O",
                "phase": "update",
                "target_num_updates": 2,
                "start_round": 0,
                "last_update": T0,
                "uncertainty_method": "NONE",
                "aggregation_method": "FedAvg",
                "options": {"mu": 0.01},
                "metric_names": ["accuracy"],
                "locked": False,
                "aggregator_state": b"\x00state",
                **stamps,
            }
        ],
        "ledger_accounts": [
            {
                "id": account,
                "key": f"user:{user}:available:USD",
                "kind": "available",
                "currency": "USD",
                "owner_id": user,
                "balance": 500,
                "created_at": T0,
            },
            {
                "id": system,
                "key": "system:external_payments:USD",
                "kind": "external_payments",
                "currency": "USD",
                "owner_id": None,
                "balance": None,
                "created_at": T0,
            },
        ],
        "ledger_entries": [
            {
                "id": entry,
                "key": "top_up:carol:1",
                "kind": "top_up",
                "description": "top-up",
                "actor_id": user,
                "fingerprint": "f" * 64,
                "created_at": T0,
            }
        ],
        "ledger_postings": [
            {
                "id": uuid.uuid4(),
                "entry_id": entry,
                "account_id": account,
                "currency": "USD",
                "amount": 500,
                "created_at": T0,
            },
            {
                "id": uuid.uuid4(),
                "entry_id": entry,
                "account_id": system,
                "currency": "USD",
                "amount": -500,
                "created_at": T0,
            },
        ],
        "billing_operations": [
            {
                "id": operation,
                "key": "top_up:carol:1",
                "kind": "top_up",
                "entry_id": entry,
                "actor_id": user,
                "payer_id": user,
                "currency": "USD",
                "amount": 500,
                "owner_income": 0,
                "description": "top-up",
                "created_at": T0,
            }
        ],
        "broker_topics": [
            {
                "id": topic,
                "kind": "topic",
                "slug": "acme-backend",
                "is_public": False,
                "anonymous_can_consume": False,
                "supports_dasf": True,
                "store_messages": "store",
                "dispatch": "broadcast",
                "owner_id": user,
                "organization_id": org,
                "api_info": {"functions": []},
                **stamps,
            }
        ],
        "broker_messages": [
            {
                "id": 1,
                "topic_id": topic,
                "message_id": uuid.uuid4(),
                "user_id": user,
                "content": '{"payload": "aGk="}',
                "transient": False,
                "created_at": T0,
            }
        ],
        "works": [
            {"id": work, "kind": "aggregation", "status": "waiting", "model_id": model, "created_at": T0}
        ],
        "queued_works": [
            {
                "id": work,
                "handler": "training.aggregate",
                "payload": {"training_id": "t", "round": 3},
                "dedupe_key": "aggregate:t:3",
                "attempts": 0,
                "max_attempts": 5,
                "submitter_id": user,
            }
        ],
    }


async def _versions(conn: Any) -> set[str]:
    return set((await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalars())


async def _read(conn: Any, expected: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for name, rows in expected.items():
        table = TABLES[name]
        ids = [row["id"] if "id" in row else row["name"] for row in rows]
        key = table.c.id if "id" in rows[0] else table.c.name
        result = await conn.execute(select(table).where(key.in_(ids)))
        by_key = {row[key.name]: dict(row) for row in result.mappings()}
        found[name] = [by_key.get(i) for i in ids]
    return found


def _drift(conn: Any) -> list[Any]:
    # The same comparison `alembic revision --autogenerate` makes (types and server defaults).
    context = MigrationContext.configure(conn, opts=AUTOGENERATE_OPTIONS)
    return list(compare_metadata(context, Base.metadata))


async def test_a_database_at_the_old_heads_upgrades_to_the_one_head_with_its_rows(fresh_url: str) -> None:
    for revision in OLD_HEADS:  # the state `alembic upgrade heads` left every installation in
        upgrade(fresh_url, revision)
    rows = _rows()
    engine = create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            assert await _versions(conn) == OLD_VERSION_ROWS
            for name, table_rows in rows.items():
                await conn.execute(sa.insert(TABLES[name]), table_rows)

        upgrade(fresh_url, "0801")  # the one line's first revision: the rows as they were
        async with engine.connect() as conn:
            assert await _versions(conn) == {"0801"}
            assert await _read(conn, rows) == rows

        upgrade(fresh_url)  # `flplatform migrate`: to the one head

        async with engine.connect() as conn:
            assert await _versions(conn) == {head_revision()}
            assert await conn.run_sync(_drift) == [], "ORM and migrations differ (write an Alembic revision)"

        # The application reads them as before.
        first = {name: table_rows[0] for name, table_rows in rows.items()}
        async with create_sessionmaker(engine)() as session:
            user = await session.get_one(User, first["users"]["id"])
            assert (user.username, user.email, user.organization_id) == (
                "carol",
                "carol@example.org",
                first["collections"]["id"],
            )
            assert (await session.get_one(Organization, first["collections"]["id"])).name == "Acme"
            model = await session.get_one(GlobalModel, first["models"]["id"])
            assert (model.name, model.round, model.owner_id) == ("digits", 3, user.id)
            # 0901 moved the weights into the blob store; the row keeps their digest and size.
            weights = first["models"]["weights"]
            assert (model.weights_digest, model.weights_size) == (hashlib.sha256(weights).hexdigest(), 10)
            assert await store_for(session).read(model.weights_digest) == weights
            moved = {
                model.preprocessing_digest: first["global_models"]["preprocessing"],
                (await session.execute(select(GlobalModelRound.weights_digest))).scalar_one(): first[
                    "global_model_rounds"
                ]["weights"],
                (await session.execute(select(Training.aggregator_state_digest))).scalar_one(): first[
                    "trainings"
                ]["aggregator_state"],
            }
            for digest, data in moved.items():
                assert digest == hashlib.sha256(data).hexdigest()
                assert await store_for(session).read(digest) == data
            training = (
                await session.execute(select(Training).where(Training.model_id == model.id))
            ).scalar_one()
            assert (training.state, training.options) == ("O", {"mu": 0.01})
            account = await session.get_one(LedgerAccount, first["ledger_accounts"]["id"])
            operation = await session.get_one(Operation, first["billing_operations"]["id"])
            assert (account.balance, operation.amount, operation.payer_id) == (500, 500, user.id)
            topic = await session.get_one(BrokerTopic, first["broker_topics"]["id"])
            message = (
                await session.execute(select(BrokerMessage).where(BrokerMessage.topic_id == topic.id))
            ).scalar_one()
            assert (topic.slug, message.message_id) == (
                "acme-backend",
                first["broker_messages"]["message_id"],
            )
            job = await session.get_one(QueuedWork, first["works"]["id"])
            assert (job.handler, job.dedupe_key) == ("training.aggregate", "aggregate:t:3")
    finally:
        await engine.dispose()


async def test_upgrading_again_at_the_head_changes_nothing(fresh_url: str) -> None:
    """Hosts restart with `serve`/`worker`, which migrate first: at the head that is a no-op."""
    upgrade(fresh_url)
    upgrade(fresh_url)
    engine = create_engine(fresh_url)
    try:
        async with engine.connect() as conn:
            assert await _versions(conn) == {head_revision()}
            assert await conn.run_sync(_drift) == []
    finally:
        await engine.dispose()
