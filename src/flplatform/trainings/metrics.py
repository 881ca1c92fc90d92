"""A training's metrics as per-round series: what a plot of "accuracy over rounds" needs.

A training's metrics are of two sources, both stored as ``Metric`` rows at ``step`` = a round:

* ``update``: what a participant sent with its update for round *r* (on its local model; the
  update's ``sample_size`` is known, so the round's aggregate is the mean weighted by it);
* ``test``: what a participant reported on the global model of round *r* (after *r*
  aggregations) in a test round; no sample size comes with it, so the aggregate is the plain mean.

Every series is a list of points: the per-participant points (``reporter`` set) and one aggregate
per round and source (``reporter`` null, ``count`` points). Only the rows the caller may read
count (the metric policy: metrics follow their model), so an aggregate never averages a value
the caller could not read itself. Non-numeric and non-finite values are left out (JSON has no NaN).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import or_, select

from flplatform.orm import LocalModel, Metric, Training
from flplatform.permissions import Requester, readable
from flplatform.trainings.schemas import MetricPoint, MetricSource


@dataclass(frozen=True)
class SeriesFilter:
    names: list[str]
    round_from: int | None = None
    round_to: int | None = None


async def metric_series(
    requester: Requester, training: Training, wanted: SeriesFilter
) -> dict[str, list[MetricPoint]]:
    """``{name: [points]}``, each list ordered by round, aggregates before the round's points."""
    local_ids = select(LocalModel.id).where(LocalModel.base_model_id == training.model_id)
    statement = (
        select(Metric.key, Metric.step, Metric.value_float, Metric.reporter_id, LocalModel.sample_size)
        .outerjoin(LocalModel, LocalModel.id == Metric.model_id)
        .where(
            or_(Metric.model_id == training.model_id, Metric.model_id.in_(local_ids)),
            Metric.value_float.is_not(None),
            readable(requester, Metric),
        )
        .order_by(Metric.key, Metric.step, Metric.created_at, Metric.id)
    )
    if wanted.names:
        statement = statement.where(Metric.key.in_(wanted.names))
    if wanted.round_from is not None:
        statement = statement.where(Metric.step >= wanted.round_from)
    if wanted.round_to is not None:
        statement = statement.where(Metric.step <= wanted.round_to)
    groups: dict[tuple[str, int, MetricSource], list[MetricPoint]] = defaultdict(list)
    for key, step, value, reporter, sample_size in (await requester.session.execute(statement)).all():
        if value is None or not math.isfinite(value):
            continue
        source = MetricSource.UPDATE if sample_size is not None else MetricSource.TEST
        groups[(key, step, source)].append(
            MetricPoint(round=step, value=value, reporter=reporter, source=source, sample_size=sample_size)
        )
    series: dict[str, list[MetricPoint]] = defaultdict(list)
    for (key, _step, _source), points in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2])):
        series[key].append(aggregate(points))
        series[key].extend(points)
    return dict(series)


def aggregate(points: list[MetricPoint]) -> MetricPoint:
    """The round's aggregate of one metric and source: weighted by sample size when every point
    has a positive total of them, else the plain mean."""
    first = points[0]
    sizes = [p.sample_size for p in points]
    total = sum(s for s in sizes if s is not None)
    weighted = all(s is not None for s in sizes) and total > 0
    if weighted:
        value = math.fsum(p.value * (p.sample_size or 0) for p in points) / total
    else:
        value = math.fsum(p.value for p in points) / len(points)
    return MetricPoint(
        round=first.round,
        value=value,
        reporter=None,
        source=first.source,
        sample_size=total if weighted else None,
        count=len(points),
        weighted=weighted,
    )
