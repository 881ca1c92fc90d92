"""Command line: ``flplatform serve | migrate | createuser`` (and the domains' commands).

These names and flags are a contract: scripts and deployments rely on them.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Callable

from flplatform.settings import get_settings

Command = Callable[[argparse.Namespace], int]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()
    if not args.no_migrate:
        from flplatform.migrate import upgrade

        upgrade(settings.database_url)
    uvicorn.run(
        "flplatform.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        # Broker frames above FLP_BROKER_MAX_MESSAGE_BYTES get an error ack instead of a close.
        ws_max_size=64 * 1024**2,
    )
    return 0


def _migrate(_: argparse.Namespace) -> int:
    from flplatform.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    print(f"database at {settings.database_url.split('@')[-1]} is at the latest schema")
    return 0


def _createuser(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flplatform.errors import AppError
    from flplatform.schemas.user import UserCreate

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
        from flplatform.services.outbound import validate_message_endpoint
        from flplatform.services.users import create_user

        settings = get_settings()
        validate_message_endpoint(data.message_endpoint, settings)
        upgrade(settings.database_url)
        engine = create_engine(settings)
        try:
            async with create_sessionmaker(engine)() as session:
                user, token = await create_user(session, data, created_by=User(username="<cli>", is_superuser=True))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flplatform", description="Federated-learning platform server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="apply migrations and serve the API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (PostgreSQL only)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply migrations first")
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    migrate.set_defaults(func=_migrate)

    create = sub.add_parser("createuser", help="create a user")
    create.add_argument("--username", required=True)
    create.add_argument("--email")
    create.add_argument("--password", help="prompted for when omitted")
    create.add_argument("--superuser", action="store_true")
    create.add_argument("--actor", action="store_true", help="may coordinate trainings")
    create.add_argument("--client", action="store_true", help="takes part in trainings")
    create.add_argument("--message-endpoint", help="URL that receives training notifications")
    create.set_defaults(func=_createuser)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Domains add their sub-commands here: each entry receives the sub-parsers object.
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []  # type: ignore[type-arg]


def _register_topic(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from flplatform.broker.cli import register  # the DASF broker's `flplatform topic`

    register(sub)


EXTRA_COMMANDS.append(_register_topic)


def _register_demo(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from flplatform.demo import register  # light module: torch loads only when the demo runs

    register(sub)


EXTRA_COMMANDS.append(_register_demo)


def _register_worker(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from flplatform.workqueue.cli import register  # light: the domains load only when the worker runs

    register(sub)


EXTRA_COMMANDS.append(_register_worker)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
