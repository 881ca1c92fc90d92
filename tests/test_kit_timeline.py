"""The close's debug timeline (flplatform.kit.timeline): off unless its logger is at DEBUG; marks
noted before an operation, taken in it (worker threads included) and logged once, in time order."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from flplatform.kit import timeline


def test_nothing_is_kept_while_the_logger_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flplatform.timeline")
    timeline.note("t-off", "before")
    with timeline.opened("t-off", "close off"):
        timeline.mark("inside")
    assert "t-off" not in timeline._pending
    assert not [r for r in caplog.records if r.name == "flplatform.timeline"]


async def test_marks_from_before_inside_and_threads_are_logged_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flplatform.timeline")
    timeline.note("t-on", "upload_committed")
    timeline.note("t-on", "upload_committed")  # the last one wins
    timeline.mark("outside")  # no operation open: dropped
    with timeline.opened("t-on", "close training=t-on round=0"):
        timeline.mark("job_started")
        await asyncio.to_thread(timeline.mark, "in_a_thread")
        timeline.mark("committed")
    timeline.mark("after")  # closed: dropped
    (record,) = [r for r in caplog.records if r.name == "flplatform.timeline"]
    head, _, marks = record.getMessage().partition(" round=0 ")
    assert head == "timeline close training=t-on"
    names = [name for name, _ in json.loads(marks)]
    assert names == ["upload_committed", "job_started", "in_a_thread", "committed"]
    times = [at for _, at in json.loads(marks)]
    assert times == sorted(times)
    assert "t-on" not in timeline._pending
