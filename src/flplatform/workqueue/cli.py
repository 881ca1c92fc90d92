"""``flplatform worker``: a work-queue worker without the HTTP server (scale jobs out to more
processes or hosts; every one of them needs the same ``FLP_DATABASE_URL`` and ``FLP_SECRET_KEY``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from flplatform.settings import get_settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    worker = sub.add_parser("worker", help="run a work-queue worker (no HTTP server) until SIGINT/SIGTERM")
    worker.add_argument("--name", help="Server name (default: host:pid:random)")
    worker.add_argument("--concurrency", type=int, help="jobs at a time (default FLP_WORKER_CONCURRENCY)")
    worker.add_argument("--kinds", help="comma-separated job kinds to take (default: every registered kind)")
    worker.add_argument("--no-migrate", action="store_true", help="do not apply migrations first")
    worker.set_defaults(func=_worker)


def load_handlers() -> None:
    """Import every domain (the app imports them all), so their job kinds are registered, and
    install the hooks the server's lifespan would install: an aggregation run by this worker
    settles the round's billing hold and reserves the next round exactly as a server would."""
    import flplatform.app  # noqa: F401
    from flplatform.billing.hooks import install as install_billing_hooks

    install_billing_hooks()


def _worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    if not args.no_migrate:
        from flplatform.migrate import upgrade

        upgrade(settings.database_url)
    if settings.is_sqlite:
        print("note: SQLite has one writer; for several workers use PostgreSQL (FLP_DATABASE_URL)", file=sys.stderr)
    load_handlers()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    asyncio.run(_run(args.name, args.concurrency, kinds))
    return 0


async def _run(name: str | None, concurrency: int | None, kinds: list[str] | None) -> None:
    from flplatform.db import create_engine, create_sessionmaker
    from flplatform.workqueue.registry import registered_kinds
    from flplatform.workqueue.worker import run_worker

    settings = get_settings()
    engine = create_engine(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker starting; job kinds: %s", ", ".join(kinds or registered_kinds()) or "(none registered)")
    try:
        worker = await run_worker(create_sessionmaker(engine), settings, name=name, concurrency=concurrency,
                                  kinds=kinds, stop=stop)
        log.info("worker %s stopped after %d jobs", worker.name, worker.jobs_done)
    finally:
        await engine.dispose()
