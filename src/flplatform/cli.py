"""Command line: ``flplatform serve | migrate | createuser`` (and the domains' commands, e.g.
``flplatform participant``, a training's client).

These names and flags are a contract: scripts and deployments rely on them.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from flplatform.settings import get_settings

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

Command = Callable[[argparse.Namespace], int]
log = logging.getLogger("flplatform.cli")


def masked_url(url: str) -> str:
    """A database URL fit for logs: SQLAlchemy's rendering with the password as ***."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from flplatform.serving import uvicorn_ws_options

    settings = get_settings()
    # Uvicorn's look, before uvicorn configures its own loggers.
    logging.basicConfig(level=settings.log_level, format="%(levelname)s:     %(message)s")
    if settings.log_level != "DEBUG":  # one summary line below instead of Alembic's step-by-step chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
    database = masked_url(settings.database_url)
    if args.no_migrate:
        log.info("database %s (migrations not applied: --no-migrate)", database)
    else:
        from flplatform.migrate import head_revision, upgrade

        upgrade(settings.database_url)
        log.info("database %s migrated to head %s", database, head_revision())
    if settings.metrics_enabled:
        _metrics_directory(args.workers)
    shown_host = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    log.info(
        "API docs at http://%s:%d/docs (ReDoc at /redoc, OpenAPI at /openapi.json)", shown_host, args.port
    )
    uvicorn.run(
        "flplatform.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        **uvicorn_ws_options(),  # websockets-sansio, 64 MiB frames, keepalive (see flplatform.serving)
    )
    return 0


def _metrics_directory(workers: int) -> None:
    """Several workers share one scrape target: prometheus-client's multiprocess mode, in
    ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary directory unless set), emptied before the
    workers start (flplatform.kit.prometheus)."""
    import atexit
    import os
    import shutil
    import tempfile

    from flplatform.kit.prometheus import MULTIPROC_ENV, prepare_multiprocess_dir

    given = os.environ.get(MULTIPROC_ENV)
    if not given and workers <= 1:
        return  # one process: its metrics stay in its memory
    directory = prepare_multiprocess_dir(given or tempfile.mkdtemp(prefix="flplatform-metrics-"))
    if not given:  # ours: removed when serve ends (after its workers)
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    log.info("metrics at /metrics; %d worker(s) share %s=%s", workers, MULTIPROC_ENV, directory)


def _migrate(_: argparse.Namespace) -> int:
    from flplatform.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    print(f"database {masked_url(settings.database_url)} is at the latest schema")
    return 0


def _createuser(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flplatform.errors import AppError
    from flplatform.users.schemas import UserCreate

    password = args.password or getpass.getpass("Password: ")
    try:
        data = UserCreate(
            username=args.username,
            email=args.email,
            password=password,
            is_superuser=args.superuser,
            is_staff=args.superuser,
            actor=args.actor,
            client=args.client,
            message_endpoint=args.message_endpoint,
        )
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def _run() -> tuple[str, str]:
        from flplatform.db import create_engine, create_sessionmaker
        from flplatform.migrate import upgrade
        from flplatform.orm import User
        from flplatform.trainings.outbound import validate_message_endpoint
        from flplatform.users.service import create_user

        settings = get_settings()
        validate_message_endpoint(data.message_endpoint, settings)
        upgrade(settings.database_url)
        engine = create_engine(settings)
        try:
            async with create_sessionmaker(engine)() as session:
                user, token = await create_user(
                    session, data, created_by=User(username="<cli>", is_superuser=True)
                )
                await session.commit()
                return str(user.id), token
        finally:
            await engine.dispose()

    try:
        user_id, token = asyncio.run(_run())
    except AppError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"created user {args.username} ({user_id}); token: {token}")
    return 0


def env_var(field: str) -> str:
    """The environment variable behind a settings field (``database_url`` → ``FLP_DATABASE_URL``)."""
    from flplatform.settings import Settings

    assert field in Settings.model_fields, field
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def _settings_classes() -> list[tuple[str, type[BaseSettings]]]:
    from flplatform.broker.config import BrokerConfig
    from flplatform.inference.config import InferenceSettings
    from flplatform.settings import Settings

    return [("server", Settings), ("DASF broker", BrokerConfig), ("inference", InferenceSettings)]


def settings_help() -> str:
    """Every FLP_* variable with its default and meaning, from the settings classes themselves."""
    lines = ["configuration (environment variables, or a .env file in the working directory):"]
    for title, cls in _settings_classes():
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        lines.append(f" {title}:")
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "unset" if default is None else ("[]" if default == [] else str(default))
            about = f" — {field.description}" if field.description else ""
            lines.append(f"  {prefix}{name.upper()} (default: {shown}){about}")
    return "\n".join(lines)


_SETTINGS_EPILOG = "<every FLP_* variable>"


class _SettingsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Expands the settings list only when help is shown (it imports the domains' settings)."""

    def add_text(self, text: str | None) -> None:
        super().add_text(settings_help() if text == _SETTINGS_EPILOG else text)


def build_parser() -> argparse.ArgumentParser:
    from flplatform import __version__

    parser = argparse.ArgumentParser(
        prog="flplatform",
        description="Federated-learning platform server",
        epilog="Settings come from FLP_* environment variables; `flplatform serve --help` lists them all. "
        "Once serving, the API documentation is at http://HOST:PORT/docs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    database = f"The database is {env_var('database_url')} (default: a SQLite file flplatform.db in the working directory)."
    serve = sub.add_parser(
        "serve",
        help="apply migrations and serve the API (docs at /docs)",
        description=f"Apply the database migrations, then serve the HTTP API, its websockets and the "
        f"documentation at /docs and /redoc. {database}",
        epilog=_SETTINGS_EPILOG,
        formatter_class=_SettingsHelpFormatter,
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on; 0.0.0.0 for every interface (default: %(default)s)",
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes; more than one needs PostgreSQL (default: %(default)s)",
    )
    serve.add_argument(
        "--no-migrate", action="store_true", help="do not apply migrations first (default: apply them)"
    )
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser(
        "migrate",
        help="apply database migrations and exit",
        description=f"Bring the database to the latest schema. {database}",
    )
    migrate.set_defaults(func=_migrate)

    create = sub.add_parser(
        "createuser",
        help="create a user (the first administrator: --superuser)",
        description=f"Create a user and print its API token. {database} The first administrator of a new "
        f"server: `flplatform createuser --superuser --username admin --email admin@example.org`; "
        f"unattended alternative: {env_var('admin_username')}, {env_var('admin_password')} and "
        f"{env_var('admin_email')}, read by `serve` at start-up.",
    )
    create.add_argument("--username", required=True, help="login name (required)")
    create.add_argument("--email", help="e-mail address, also accepted as login (default: none)")
    create.add_argument("--password", help="password (default: prompted for, not echoed)")
    create.add_argument("--superuser", action="store_true", help="administrator: may do everything")
    create.add_argument("--actor", action="store_true", help="may coordinate trainings")
    create.add_argument("--client", action="store_true", help="takes part in trainings")
    create.add_argument("--message-endpoint", help="URL that receives training notifications (default: none)")
    create.set_defaults(func=_createuser)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Domains add their sub-commands here: each entry receives the sub-parsers object.
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _register_topic(sub: argparse._SubParsersAction) -> None:
    from flplatform.broker.cli import register  # the DASF broker's `flplatform topic`

    register(sub)


EXTRA_COMMANDS.append(_register_topic)


def _register_demo(sub: argparse._SubParsersAction) -> None:
    from flplatform.demo import register  # light module: torch loads only when the demo runs

    register(sub)


EXTRA_COMMANDS.append(_register_demo)


def _register_participant(sub: argparse._SubParsersAction) -> None:
    from flplatform.client.command import (
        register,
    )  # the SDK's `flplatform participant` (light: torch loads later)

    register(sub)


EXTRA_COMMANDS.append(_register_participant)


def _install_jobs() -> None:
    from flplatform.jobs import install  # imports every domain: only when the worker runs

    install()


def _register_worker(sub: argparse._SubParsersAction) -> None:
    from flplatform.workqueue.cli import register  # light: the domains load only when the worker runs

    register(sub, install_jobs=_install_jobs)


EXTRA_COMMANDS.append(_register_worker)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
