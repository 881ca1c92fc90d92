"""The sweep deletes only blobs that no row references and that are older than the grace period;
on both databases."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

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

    # Writing an old unreferenced blob again restarts its grace period.
    again = await store.put(b"o")
    async with app.state.sessionmaker() as session:
        assert (await sweep(session, store, grace_seconds=3600)).deleted == 0
    assert await store.exists(again.digest)
