"""The sweep deletes only blobs that no row references and that are older than the grace period;
on both databases."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from flplatform import workqueue
from flplatform.blobs import FileBlobStore
from flplatform.blobs.sweep import referenced_digests, sweep
from flplatform.orm import GlobalModel, GlobalModelRound, LocalModel


async def test_sweep_keeps_referenced_and_young_blobs(app: Any, alice: Any, tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    weights, history, local, orphan, young = [await store.put(n.encode()) for n in "wxloy"]
    async with app.state.sessionmaker() as session:
        model = GlobalModel(owner_id=alice.user.id, name="g", weights_digest=weights.digest)
        session.add(model)
        await session.flush()
        session.add(GlobalModelRound(model_id=model.id, round=0, weights_digest=history.digest))
        session.add(
            LocalModel(
                owner_id=alice.user.id, base_model_id=model.id, sample_size=1, weights_digest=local.digest
            )
        )
        await session.commit()
    old = time.time() - 7200
    for info in (weights, history, local, orphan):
        os.utime(store.path(info.digest), (old, old))
    async with app.state.sessionmaker() as session:
        assert {weights.digest, history.digest, local.digest} <= await referenced_digests(session)
        report = await sweep(session, store, grace_seconds=3600)
    assert report.deleted == 1 and report.referenced == 3 and report.kept_young == 1
    assert not await store.exists(orphan.digest)
    for info in (weights, history, local, young):
        assert await store.exists(info.digest)

    # A queued job's payload keeps the blobs it names under "blob_digests" until it has run.
    job_input = await store.put(b"job input")
    os.utime(store.path(job_input.digest), (old, old))
    if workqueue.lookup("test.blob-job") is None:  # a job that keeps its payload after it ran

        async def _noop(_ctx: Any, _payload: dict[str, Any]) -> None:
            return None

        workqueue.register("test.blob-job", _noop, keep_payload=True)
    async with app.state.sessionmaker() as session:
        await workqueue.enqueue(session, "test.blob-job", {"blob_digests": [job_input.digest]})
        await session.commit()
    async with app.state.sessionmaker() as session:
        assert (await sweep(session, store, grace_seconds=3600)).deleted == 0
    assert await store.exists(job_input.digest)

    # Writing an old unreferenced blob again restarts its grace period.
    again = await store.put(b"o")
    async with app.state.sessionmaker() as session:
        assert (await sweep(session, store, grace_seconds=3600)).deleted == 0
    assert await store.exists(again.digest)
