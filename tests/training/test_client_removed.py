"""CLIENT_REMOVED against clients that handle notifications the way the reference client does
(issue 22, item 2).

The reference platform defines CLIENT_REMOVED but never sends it. Its client
(DLR-KI/fl-demonstrator-client, ``client_server.py``) answers the types it knows (200 for
TRAINING_START / TRAINING_FINISHED, 202 for UPDATE_ROUND_START / MODEL_TEST_ROUND); any other
type goes to its fallback, which reads ``body["notification_type"]`` and ``body["data"]``
(KeyError → 500 when they are missing) and hands them to ``Communication.unknown_message``,
which answers 400 unless a deployment replaces it. flplatform therefore sends CLIENT_REMOVED
only to users who opted in (``notify_client_removed``), with the other notifications' body
keys plus ``notification_type`` and ``data``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import select

from flplatform.orm import Notification, NotificationStatus
from tests.conftest import free_port
from tests.training.conftest import create_training, upload_global
from tests.training.test_lifecycle_api import wait_training

UnknownMessage = Callable[[str, uuid.UUID, Any], int]


def reference_unknown_message(_message_type: str, _training_id: uuid.UUID, _data: Any) -> int:
    return 400  # what the reference Communication.unknown_message answers


def accepting_unknown_message(message_type: str, _training_id: uuid.UUID, data: Any) -> int:
    """A deployment's replacement that understands the removal notice."""
    assert message_type == "CLIENT_REMOVED" and data["reason"] and data["global_model_uuid"]
    return 200


class ReferenceStyleClient:
    """An HTTP endpoint that reacts as the reference client's notification handler does."""

    def __init__(self, unknown_message: UnknownMessage = reference_unknown_message) -> None:
        self.answers: list[tuple[str, int]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                content: Any = {}
                try:
                    content = json.loads(self.rfile.read(int(self.headers.get("Content-Length"))))
                    status = outer.handle(
                        str(content["notification_type"]),
                        uuid.UUID(content["training_uuid"]),
                        content["body"],
                        unknown_message,
                    )
                except Exception:  # noqa: BLE001 - the reference handler answers 500 for any error
                    status = 500
                outer.answers.append(
                    (content.get("notification_type", "?") if isinstance(content, dict) else "?", status)
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def handle(kind: str, training_id: uuid.UUID, data: Any, unknown_message: UnknownMessage) -> int:
        if kind in ("TRAINING_START", "TRAINING_FINISHED"):
            uuid.UUID(data["global_model_uuid"])
            return 200
        if kind in ("UPDATE_ROUND_START", "MODEL_TEST_ROUND"):
            int(data["round"]), uuid.UUID(data["global_model_uuid"])
            return 202
        return unknown_message(data["notification_type"], training_id, data["data"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def _statuses(app: Any, user_id: str) -> dict[str, list[NotificationStatus]]:
    """The user's notifications by kind, once none is still waiting or in flight: the endpoint
    answers before the dispatcher records the answer, so a check right after the answer could
    still read ``sending``."""
    unsettled = {NotificationStatus.PENDING, NotificationStatus.SENDING}
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with app.state.sessionmaker() as session:
            rows = (
                await session.execute(
                    select(Notification.notification_type, Notification.status)
                    .where(Notification.recipient_id == uuid.UUID(user_id))
                    .order_by(Notification.id)
                )
            ).all()
        if not any(status in unsettled for _, status in rows):
            break
        if asyncio.get_running_loop().time() > deadline:
            break  # the assertion that follows shows which one never settled
        await asyncio.sleep(0.05)
    out: dict[str, list[NotificationStatus]] = {}
    for kind, status in rows:
        out.setdefault(kind, []).append(status)
    return out


async def test_client_removed_is_answered_2xx_by_reference_style_clients(client, alice, make_user, app):
    plain, opted_in, unmodified = (
        ReferenceStyleClient(),
        ReferenceStyleClient(accepting_unknown_message),
        ReferenceStyleClient(),
    )
    try:
        plain_user = await make_user("plain", client=True, message_endpoint=plain.url)
        opted_user = await make_user(
            "opted", client=True, message_endpoint=opted_in.url, notify_client_removed=True
        )
        unmodified_user = await make_user(
            "unmodified", client=True, message_endpoint=unmodified.url, notify_client_removed=True
        )
        stays = await make_user("stays", client=True)
        users = [plain_user, opted_user, unmodified_user, stays]
        training_id = await create_training(
            client, alice.headers, await upload_global(client, alice.headers), [u.id for u in users]
        )
        assert (
            await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
        ).status_code == 202
        await wait_training(client, alice.headers, training_id, lambda _b: len(plain.answers) >= 2)
        r = await client.request(
            "DELETE",
            f"/api/trainings/{training_id}/clients/",
            headers=alice.headers,
            json={"clients": [plain_user.id, opted_user.id, unmodified_user.id]},
        )
        assert r.status_code == 200, r.text
        await wait_training(
            client,
            alice.headers,
            training_id,
            lambda _b: (
                ("CLIENT_REMOVED", 200) in opted_in.answers
                and any(kind == "CLIENT_REMOVED" for kind, _ in unmodified.answers)
            ),
        )
        body = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
        assert body["participants"] == [stays.id] and body["state"] == "O", body

        # A reference client that did not opt in is never sent it: every answer it gave was 2xx.
        assert [kind for kind, _ in plain.answers] == ["TRAINING_START", "UPDATE_ROUND_START"], plain.answers
        assert all(200 <= status < 300 for _, status in plain.answers), plain.answers
        assert await _statuses(app, plain_user.id) == {
            "TRAINING_START": [NotificationStatus.SENT],
            "UPDATE_ROUND_START": [NotificationStatus.SENT],
        }
        # A reference-derived client that handles it answers 2xx; it found data["data"].
        assert all(200 <= status < 300 for _, status in opted_in.answers), opted_in.answers
        assert (await _statuses(app, opted_user.id))["CLIENT_REMOVED"] == [NotificationStatus.SENT]
        # The unmodified reference handler reaches its unknown_message (400), not a crash (500).
        assert ("CLIENT_REMOVED", 400) in unmodified.answers, unmodified.answers
    finally:
        for endpoint in (plain, opted_in, unmodified):
            endpoint.close()


async def test_client_removed_body_carries_the_usual_keys_and_the_fallback_keys(
    client, alice, make_user, app
):
    received: list[dict[str, Any]] = []
    endpoint = ReferenceStyleClient(
        lambda kind, _t, data: received.append({"kind": kind, "data": data}) or 200
    )
    try:
        user = await make_user(
            "removed", client=True, message_endpoint=endpoint.url, notify_client_removed=True
        )
        model_id = await upload_global(client, alice.headers)
        training_id = await create_training(client, alice.headers, model_id, [user.id])
        assert (
            await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
        ).status_code == 202
        r = await client.request(
            "DELETE",
            f"/api/trainings/{training_id}/clients/",
            headers=alice.headers,
            json={"clients": [user.id]},
        )
        assert r.status_code == 200
        await wait_training(client, alice.headers, training_id, lambda _b: bool(received))
        assert received[0]["kind"] == "CLIENT_REMOVED"
        assert received[0]["data"] == {
            "global_model_uuid": model_id,
            "round": 0,
            "reason": "Removed from the training by its actor or an administrator.",
        }
    finally:
        endpoint.close()
    r = await client.patch(
        f"/api/users/{user.id}/", headers=user.headers, json={"notify_client_removed": False}
    )
    assert r.status_code == 200 and r.json()["notify_client_removed"] is False, r.text
