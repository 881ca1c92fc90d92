"""``flplatform worker``: a work-queue worker without the HTTP server (scale jobs out to more
processes or hosts; every one of them needs the same ``FLP_DATABASE_URL`` and ``FLP_SECRET_KEY``)."""

# The work queue knows no domain: the caller (``flplatform.cli``) passes ``install_jobs``, the
# function that registers every job kind and hook (``flplatform.jobs.install``).

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Callable

from flplatform.settings import Settings, get_settings

log = logging.getLogger(__name__)


class _KindsHelpFormatter(argparse.HelpFormatter):
    """Fills ``%(kinds)s`` in a help text with the registered job kinds, only when help is shown
    (finding them imports every domain, torch included)."""

    def __init__(self, prog: str, *, install_jobs: Callable[[], None]) -> None:
        super().__init__(prog)
        self._install_jobs = install_jobs

    def _expand_help(self, action: argparse.Action) -> str:
        if action.help and "%(kinds)s" in action.help:
            from flplatform.workqueue.registry import registered_kinds

            self._install_jobs()
            action.help = action.help.replace("%(kinds)s", ", ".join(sorted(registered_kinds())))
        return super()._expand_help(action)


def _env_var(field: str) -> str:
    assert field in Settings.model_fields, field
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], *, install_jobs: Callable[[], None]
) -> None:
    """Add ``flplatform worker``; ``install_jobs`` registers the job kinds it runs."""
    worker = sub.add_parser(
        "worker",
        help="run a work-queue worker (no HTTP server) until SIGINT/SIGTERM",
        description=(__doc__ or "").replace("``", "`"),
        formatter_class=functools.partial(_KindsHelpFormatter, install_jobs=install_jobs),
    )
    worker.add_argument("--name", help="worker name shown in the jobs table (default: host:pid:random)")
    worker.add_argument(
        "--concurrency",
        type=int,
        help=f"jobs at a time (default: {_env_var('worker_concurrency')}, which defaults to "
        f"{Settings.model_fields['worker_concurrency'].default})",
    )
    worker.add_argument(
        "--kinds", help="comma-separated job kinds to take, of: %(kinds)s (default: all of them)"
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        help="serve this process's Prometheus metrics on this port (/metrics, no token; default: none)",
    )
    worker.add_argument(
        "--metrics-host", default="127.0.0.1", help="interface of --metrics-port (default: %(default)s)"
    )
    worker.add_argument(
        "--no-migrate", action="store_true", help="do not apply migrations first (default: apply them)"
    )
    worker.set_defaults(func=_worker, install_jobs=install_jobs)


def _worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    if not args.no_migrate:
        from flplatform.migrate import upgrade

        upgrade(settings.database_url)
    if settings.is_sqlite:
        print(
            "note: SQLite has one writer; for several workers use PostgreSQL (FLP_DATABASE_URL)",
            file=sys.stderr,
        )
    # Every job kind and hook, as a server installs them: an aggregation run by this worker
    # settles the round's billing hold and reserves the next round exactly as a server would.
    args.install_jobs()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    from flplatform.workqueue.registry import registered_kinds

    unknown = sorted(set(kinds or ()) - set(registered_kinds()))
    if unknown:
        print(
            f"error: unknown job kind(s) {', '.join(unknown)}; known: {', '.join(sorted(registered_kinds()))}",
            file=sys.stderr,
        )
        return 2
    if args.metrics_port is not None:
        from flplatform.kit.prometheus import start_metrics_server

        start_metrics_server(args.metrics_host, args.metrics_port)
        log.info("metrics at http://%s:%d/metrics", args.metrics_host, args.metrics_port)
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
        worker = await run_worker(
            create_sessionmaker(engine), settings, name=name, concurrency=concurrency, kinds=kinds, stop=stop
        )
        log.info("worker %s stopped after %d jobs", worker.name, worker.jobs_done)
    finally:
        await engine.dispose()
