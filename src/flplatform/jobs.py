"""The one place background work is wired together: :func:`install` registers every work-queue
job kind and installs every cross-domain hook.

Every entry point calls it — ``flplatform serve`` (:func:`flplatform.app.create_app`),
``flplatform worker`` (:mod:`flplatform.cli` hands it to :mod:`flplatform.workqueue.cli`) and the
tests (``tests/conftest.py``) — so a process aggregates and bills rounds the same way whichever
started it. Nothing registers as a side effect of an import: a domain offers a ``register()``
(its ``jobs.py``) or a hook function, and only this module connects them. It sits above the
domains (it imports them); no domain, ``workqueue/`` included, imports it.
"""

from __future__ import annotations

from flplatform.billing import hooks as billing_hooks
from flplatform.billing import jobs as billing_jobs
from flplatform.inference import jobs as inference_jobs
from flplatform.trainings import events as training_events
from flplatform.trainings import hooks as training_hooks
from flplatform.trainings import jobs as training_jobs


def install() -> None:
    """Register the job kinds (``training.aggregate``, ``inference.run``,
    ``billing.monthly_bills``) and add billing's round
    hooks (reserve at each round start, settle at each aggregation), and wake the training event
    streams after each commit that recorded events. Idempotent."""
    training_jobs.register()
    inference_jobs.register()
    billing_jobs.register()
    training_hooks.ROUND_STARTED.add(billing_hooks.round_started)
    training_hooks.ROUND_AGGREGATED.add(billing_hooks.round_aggregated)
    training_events.install()
