"""``flplatform topic <slug> …``: the reference's ``manage.py dasf_topic`` for flplatform.

Examples::

    flplatform topic hello --new --anonymous           # public topic anonymous backends may consume
    flplatform topic hello -c backend-user -p alice    # grant consume / produce
    flplatform topic hello --store-messages store      # per-topic store policy (default: server default)
    flplatform topic hello -c bob -rm                  # remove bob's permissions
    flplatform topic hello --show-info                 # settings, grants, availability, counts

Running servers see the change at once on PostgreSQL (NOTIFY), and within
``FLP_BROKER_PERMISSION_CACHE_SECONDS`` (5 s) on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from typing import Any

from flplatform.settings import get_settings

STORE_CHOICES = ["default", "disabled", "cache", "cacheall", "store"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "topic",
        help="create and configure DASF broker topics (like dasf-broker-django's dasf_topic)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("slug", help="topic slug ([-_\\w]+)")
    parser.add_argument("-n", "--new", action="store_true", help="create the topic (error if it exists)")
    parser.add_argument(
        "--public", dest="public", action="store_true", default=None, help="anyone may publish"
    )
    parser.add_argument(
        "--no-public", dest="public", action="store_false", help="only granted producers may publish"
    )
    parser.add_argument(
        "--dasf", dest="dasf", action="store_true", default=None, help="topic speaks DASF (pinged)"
    )
    parser.add_argument("--no-dasf", dest="dasf", action="store_false", help="plain topic (not pinged)")
    parser.add_argument(
        "--anonymous", action="store_true", help="public, and anyone (anonymous included) may consume"
    )
    parser.add_argument(
        "--store-messages", choices=STORE_CHOICES, help="store policy; default = server default"
    )
    parser.add_argument(
        "--dispatch", choices=["broadcast", "shared"], help="shared: one backend socket per message"
    )
    parser.add_argument(
        "-c", "--consumer", action="append", default=[], metavar="USER", help="grant can_consume"
    )
    parser.add_argument(
        "-p", "--producer", action="append", default=[], metavar="USER", help="grant can_produce"
    )
    parser.add_argument(
        "-vs", "--view-status", action="append", default=[], metavar="USER", help="grant can_view_status"
    )
    parser.add_argument(
        "--create-users",
        action="store_true",
        help="create the named users that do not exist (prints their tokens)",
    )
    parser.add_argument(
        "-rm",
        "--remove-permissions",
        action="store_true",
        help="revoke (instead of grant) for the named users",
    )
    parser.add_argument("--delete", action="store_true", help="delete the topic and its response topics")
    parser.add_argument("-i", "--show-info", action="store_true", help="print the topic as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flplatform.errors import AppError

    try:
        output = asyncio.run(_run(args))
    except AppError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    if output:
        print(output)
    return 0


async def _run(args: argparse.Namespace) -> str:
    from flplatform.broker import service
    from flplatform.broker.availability import availability
    from flplatform.broker.bus import CHANNEL
    from flplatform.db import create_engine, create_sessionmaker
    from flplatform.errors import NotFound
    from flplatform.migrate import upgrade
    from flplatform.orm.base import utcnow
    from flplatform.orm.broker import DispatchMode, ResponseTopic, StorePolicy

    settings = get_settings()
    upgrade(settings.database_url)
    engine = create_engine(settings)
    lines: list[str] = []
    try:
        async with create_sessionmaker(engine)() as session:
            if args.new:
                topic = await service.create_topic(session, args.slug, None)
                lines.append(f"created topic {args.slug}")
            else:
                topic = await service.get_topic(session, args.slug)
            if args.delete:
                await service.delete_topic(session, topic)
                await _notify(session, settings.database_url, CHANNEL)
                await session.commit()
                return f"deleted topic {args.slug}"
            if args.anonymous:
                topic.is_public = True
                topic.anonymous_can_consume = True
            if args.public is not None:
                topic.is_public = args.public
            if args.dasf is not None:
                topic.supports_dasf = args.dasf
            if args.store_messages:
                topic.store_messages = (
                    None if args.store_messages == "default" else StorePolicy(args.store_messages)
                )
            if args.dispatch:
                topic.dispatch = DispatchMode(args.dispatch)
            flags = {"consumer": "can_consume", "producer": "can_produce", "view_status": "can_view_status"}
            for option, flag in flags.items():
                for name in getattr(args, option):
                    try:
                        user = await service.find_user(session, name)
                    except NotFound:
                        if not args.create_users or args.remove_permissions:
                            raise
                        user, token = await _create_user(session, name)
                        lines.append(f"created user {name}; token: {token}")
                    await service.set_grant(session, topic, user, **{flag: not args.remove_permissions})
                    lines.append(f"{'revoked' if args.remove_permissions else 'granted'} {flag} for {name}")
            await session.flush()
            await _notify(session, settings.database_url, CHANNEL)
            await session.commit()
            if args.show_info:
                await session.refresh(topic)
                grants = await service.list_grants(session, topic)
                pending, stored = (await service.message_counts(session, [topic.id]))[topic.id]
                info: dict[str, Any] = {
                    "slug": topic.slug,
                    "is_response_topic": isinstance(topic, ResponseTopic),
                    "public": topic.is_public,
                    "anonymous_can_consume": topic.anonymous_can_consume,
                    "supports_dasf": topic.supports_dasf,
                    "store_messages": topic.store_messages.value if topic.store_messages else "default",
                    "dispatch": topic.dispatch.value if topic.dispatch else "broadcast",
                    "consumers": [name for g, name in grants if g.can_consume],
                    "producers": [name for g, name in grants if g.can_produce],
                    "status_viewers": [name for g, name in grants if g.can_view_status],
                    "availability": availability(
                        topic.supports_dasf, topic.last_ping, topic.last_pong, utcnow()
                    ),
                    "pending": pending,
                    "stored": stored,
                    "api_info_functions": [
                        f.get("name") for f in (topic.api_info or {}).get("functions", [])
                    ],
                }
                lines.append(json.dumps(info, indent=2))
    finally:
        await engine.dispose()
    return "\n".join(lines)


async def _create_user(session: Any, username: str) -> tuple[Any, str]:
    from flplatform.orm import User
    from flplatform.users.schemas import UserCreate
    from flplatform.users.service import create_user

    data = UserCreate(username=username, password=secrets.token_urlsafe(18))
    return await create_user(session, data, created_by=User(username="<cli>", is_superuser=True))


async def _notify(session: Any, url: str, channel: str) -> None:
    """Tell running PostgreSQL brokers to drop their topic and grant caches (sent at commit)."""
    if url.startswith("postgresql"):
        from sqlalchemy import text

        await session.execute(
            text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": json.dumps({"o": "cli", "k": "i"})}
        )
