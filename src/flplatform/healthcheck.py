"""Container health checks (the Dockerfile's ``HEALTHCHECK``, ``compose.yaml``'s healthchecks).

    python -m flplatform.healthcheck serve [URL]   # GET URL (default http://127.0.0.1:8000/health) answers 200
    python -m flplatform.healthcheck worker        # a worker of this host kept its heartbeat

Exit status 0: healthy, 1: not (the reason on stderr). ``serve`` uses only the standard library;
``worker`` reads ``FLP_DATABASE_URL`` like the worker and looks for a ``servers`` row named after
this host (``flplatform worker`` names itself ``host:pid:random``) that is ready and was seen
within three heartbeat intervals plus a few seconds, the rule ``serve`` uses to tell whether any
worker is alive.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import socket
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/health"


def check_serve(url: str, timeout: float = 5.0) -> str | None:
    """None when ``url`` answers 200; otherwise why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


async def check_worker(host: str | None = None) -> str | None:
    """None when a worker named after ``host`` (default: this host) has a recent heartbeat."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from flplatform.db import create_engine
    from flplatform.orm.base import utcnow
    from flplatform.orm.workqueue import Server
    from flplatform.settings import get_settings

    settings = get_settings()
    host = host or socket.gethostname()
    # The worker refreshes last_seen_at every min(10 s, lease / 3) (workqueue.worker.heartbeat_interval).
    interval = max(min(10.0, settings.work_lease_seconds / 3), 0.05)
    since = utcnow() - dt.timedelta(seconds=3 * interval + 5)
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            alive = (
                await conn.execute(
                    select(func.count())
                    .select_from(Server)
                    .where(
                        Server.name.startswith(f"{host}:", autoescape=True),
                        Server.ready.is_(True),
                        Server.last_seen_at >= since,
                    )
                )
            ).scalar_one()
    except (SQLAlchemyError, OSError) as exc:  # an unreachable database: unhealthy, not a crash
        return f"database: {type(exc).__name__}: {exc}"
    finally:
        await engine.dispose()
    return None if alive else f"no worker of host {host!r} has a heartbeat since {since:%H:%M:%S} UTC"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flplatform.healthcheck", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="what", required=True)
    serve = sub.add_parser("serve", help="the server's /health answers 200")
    serve.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    worker = sub.add_parser("worker", help="a worker of this host has a recent heartbeat")
    worker.add_argument("--host", help="host name the worker's name starts with (default: this host)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_serve(args.url) if args.what == "serve" else asyncio.run(check_worker(args.host))
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
