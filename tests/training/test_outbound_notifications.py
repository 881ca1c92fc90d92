"""Bounded outbound notifications and the SSRF guard (issue 14, item 2).

One participant's endpoint must not stall anyone else's training: each recipient has its own
delivery lane, one attempt has one total deadline (a trickle of bytes does not extend it), and
an answer's body is read only up to a small cap. ``message_endpoint`` is refused at
registration and at every delivery when it points at loopback, link-local, unspecified or
multicast addresses (however spelled) or carries user info, unless allowlisted; and what a user
sees of a failed delivery is the same words whether the port was closed or the peer stalled.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm import Notification, NotificationStatus
from flplatform.settings import Settings
from flplatform.trainings import notifications as notify
from tests.conftest import free_port
from tests.training.conftest import create_training, upload_global
from tests.training.endpoints import answer, huge_body, serving, silent, trickle
from tests.training.test_lifecycle_api import wait_training

LOOPBACK = "127.0.0.0/8,::1/128"

# Every spelling of "this machine" that the guard must refuse without an allowlist.
SSRF_SPELLINGS = [
    "http://127.0.0.1:{port}/hook/",
    "http://localhost:{port}/hook/",
    "http://LOCALHOST.:{port}/hook/",
    "http://app.localhost:{port}/hook/",
    "http://[::1]:{port}/hook/",
    "http://0.0.0.0:{port}/hook/",
    "http://[::]:{port}/hook/",
    "http://2130706433:{port}/hook/",
    "http://0x7f.1:{port}/hook/",
    "http://0177.0.0.1:{port}/hook/",
    "http://127.1:{port}/hook/",
    "http://[::ffff:127.0.0.1]:{port}/hook/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]:{port}/hook/",
    "http://224.0.0.1:{port}/hook/",
    "http://[ff02::1]:{port}/hook/",
    "http://user:pw@example.org/hook/",
]


@pytest.fixture
def settings(db_url: str, request: pytest.FixtureRequest) -> Settings:
    """No allowlist (what a default installation does) unless a test passes overrides with
    ``@pytest.mark.parametrize("settings", [{...}], indirect=True)``."""
    fields: dict[str, Any] = {
        "notification_allowed_networks": [],
        "notification_backoff_seconds": 0.01,
        "notification_max_attempts": 1,
        "notification_timeout_seconds": 1.0,
        "training_sweep_interval_seconds": 0.05,
    }
    fields.update(getattr(request, "param", {}))
    return Settings(database_url=db_url, **fields)


def _on_premise(**fields: Any) -> Any:
    """Settings of an install that allowlists loopback (these tests' endpoints listen there)."""
    return pytest.mark.parametrize(
        "settings",
        [{"notification_allowed_networks": LOOPBACK, **fields}],
        indirect=True,
        ids=["loopback-allowed"],
    )


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("spelling", SSRF_SPELLINGS)
async def test_registration_and_update_refuse_internal_endpoints(client, admin, alice, spelling):
    url = spelling.format(port=8080)
    r = await client.post(
        "/api/users/",
        headers=admin.headers,
        json={"username": "victim", "password": "password-123", "client": True, "message_endpoint": url},
    )
    assert r.status_code == 422, (url, r.text)
    assert r.json()["code"] in ("message_endpoint_refused", "validation_error"), r.text
    r = await client.patch(f"/api/users/{alice.id}/", headers=alice.headers, json={"message_endpoint": url})
    assert r.status_code == 422, (url, r.text)
    r = await client.put(f"/api/users/{alice.id}/", headers=alice.headers, json={"message_endpoint": url})
    assert r.status_code == 422, (url, r.text)


async def test_registration_accepts_public_and_private_endpoints(client, admin, alice):
    for i, url in enumerate(
        (
            "http://client1.example.org:8101/",
            "https://203.0.114.7/hook/",
            "http://10.1.2.3:8101/",
            "http://192.168.10.20/",
        )
    ):
        r = await client.post(
            "/api/users/",
            headers=admin.headers,
            json={"username": f"ok{i}", "password": "password-123", "client": True, "message_endpoint": url},
        )
        assert r.status_code == 201, (url, r.text)
    r = await client.patch(f"/api/users/{alice.id}/", headers=alice.headers, json={"message_endpoint": None})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- delivery


async def _outbox(db_url: str, endpoints: list[str]) -> tuple[Any, list[int]]:
    """Rows as an older registration (or a name that now resolves elsewhere) left them."""
    engine = create_engine(db_url)
    maker = create_sessionmaker(engine)
    async with maker() as session:
        from flplatform.orm import User

        user = User(username=f"r-{uuid.uuid4().hex[:8]}", client=True)
        session.add(user)
        await session.flush()
        rows = []
        for url in endpoints:
            row = Notification(
                recipient_id=user.id,
                endpoint=url,
                notification_type="TRAINING_START",
                payload="{}",
                critical=False,
                status=NotificationStatus.PENDING,
                attempts=0,
                next_attempt_at=notify.utcnow(),
            )
            session.add(row)
            rows.append(row)
        await session.commit()
        ids = [r.id for r in rows]
    return engine, ids


async def _drain(
    db_url: str, settings: Settings, ids: list[int]
) -> dict[int, tuple[NotificationStatus, str | None]]:
    engine = create_engine(db_url)
    maker = create_sessionmaker(engine)

    async def ignore(*_args: Any) -> None:
        return None

    dispatcher = notify.Dispatcher(
        maker, settings, on_rejected=ignore, on_failed=ignore, after_change=lambda _t: None
    )
    runner = asyncio.create_task(dispatcher.run())
    try:
        for _ in range(400):
            async with maker() as session:
                rows = (
                    await session.execute(
                        select(Notification.id, Notification.status, Notification.last_error).where(
                            Notification.id.in_(ids)
                        )
                    )
                ).all()
            if all(
                status in (NotificationStatus.SENT, NotificationStatus.FAILED, NotificationStatus.REJECTED)
                for _, status, _ in rows
            ):
                return {i: (s, e) for i, s, e in rows}
            dispatcher.kick()
            await asyncio.sleep(0.05)
        raise AssertionError(f"outbox not drained: {rows}")
    finally:
        dispatcher.stop()
        await asyncio.wait_for(runner, timeout=10)
        await engine.dispose()


async def test_delivery_refuses_every_spelling_of_this_machine(db_url, settings):
    async with serving(answer(200), hosts=("127.0.0.1", "::1")) as endpoint:
        urls = [s.format(port=endpoint.port) for s in SSRF_SPELLINGS]
        engine, ids = await _outbox(db_url, urls)
        await engine.dispose()
        outcome = await _drain(db_url, settings, ids)
        assert endpoint.connections == 0
        assert {status for status, _ in outcome.values()} == {NotificationStatus.FAILED}, outcome


async def test_allowlisted_loopback_is_delivered(db_url, settings):
    allowing = settings.model_copy(
        update={
            "notification_allowed_networks": [
                ipaddress.ip_network("127.0.0.0/8"),
                ipaddress.ip_network("::1/128"),
            ]
        }
    )
    async with serving(answer(200)) as endpoint:
        engine, ids = await _outbox(db_url, [endpoint.url(), endpoint.url(host="localhost")])
        await engine.dispose()
        outcome = await _drain(db_url, allowing, ids)
        assert {status for status, _ in outcome.values()} == {NotificationStatus.SENT}, outcome
        assert endpoint.connections == 2
        # Metadata addresses stay refused even under a broad allowlist.
        everything = settings.model_copy(
            update={"notification_allowed_networks": [ipaddress.ip_network("0.0.0.0/0")]}
        )
        engine, ids = await _outbox(db_url, ["http://169.254.169.254/latest/meta-data/"])
        await engine.dispose()
        assert [s for s, _ in (await _drain(db_url, everything, ids)).values()] == [NotificationStatus.FAILED]


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def test_huge_answer_is_not_read(db_url, settings):
    allowing = settings.model_copy(
        update={
            "notification_allowed_networks": [ipaddress.ip_network("127.0.0.0/8")],
            "notification_timeout_seconds": 10.0,
        }
    )
    async with serving(huge_body()) as endpoint:
        engine, ids = await _outbox(db_url, [endpoint.url(), endpoint.url()])
        await engine.dispose()
        rss_before = _rss_mib()
        outcome = await _drain(db_url, allowing, ids)
        print(f"RSS {rss_before:.0f} -> {_rss_mib():.0f} MiB while answering two 1 GiB responses")
        for _ in range(100):  # the server notices the hang-up on its next write
            if len(endpoint.closed_after) == 2:
                break
            await asyncio.sleep(0.05)
    assert {status for status, _ in outcome.values()} == {NotificationStatus.SENT}, outcome
    # Two answers announcing 1 GiB each; what left the server before the client hung up is
    # bounded by the read cap plus the kernel's socket buffers, not by the announced size.
    print(f"two 1 GiB answers: {endpoint.bytes_sent / 1024**2:.1f} MiB left the server before the hang-ups")
    assert endpoint.bytes_sent < 2 * 16 * 1024**2, endpoint.bytes_sent


@_on_premise(notification_timeout_seconds=3.0)
async def test_trickling_endpoint_delays_nobody_else(client, alice, make_user):
    """Three participants of training A trickle their answers (one byte a second, which a
    per-read timeout never catches); training B's participant must get its first notification
    at once, and A's attempts must end at the total deadline."""
    async with serving(trickle) as slow, serving(answer(200)) as fast:
        slow_clients = [
            await make_user(f"slow{i}", client=True, message_endpoint=slow.url(f"/s{i}/")) for i in range(3)
        ]
        fast_client = await make_user("fast", client=True, message_endpoint=fast.url())
        a = await create_training(
            client, alice.headers, await upload_global(client, alice.headers), [c.id for c in slow_clients]
        )
        b = await create_training(
            client, alice.headers, await upload_global(client, alice.headers), [fast_client.id]
        )
        assert (await client.post(f"/api/trainings/{a}/start/", headers=alice.headers)).status_code == 202
        await asyncio.sleep(0.3)  # A's deliveries are under way (and trickling)
        assert slow.connections == 3
        started = time.monotonic()
        assert (await client.post(f"/api/trainings/{b}/start/", headers=alice.headers)).status_code == 202
        while not fast.requests:
            await asyncio.sleep(0.01)
            assert time.monotonic() - started < 10, "B's first notification never arrived"
        first = fast.requests[0][0] - started
        assert fast.kinds()[0] == "TRAINING_START"
        print(f"training B: first notification after {first:.3f} s")
        assert first < 1.0, f"B's first notification took {first:.2f} s"
        # A's attempts end at the 3 s deadline, not after the ~40 s the trickle takes.
        await wait_training(client, alice.headers, a, lambda body: body["state"] == "E", timeout=15)
        assert slow.closed_after and max(slow.closed_after) < 3.0 + 1.5, slow.closed_after


@_on_premise()
async def test_error_reason_is_the_same_for_a_closed_port_and_a_stalled_peer(client, alice, make_user):
    async with serving(silent) as stalled:
        closed = await make_user("closed", client=True, message_endpoint=f"http://127.0.0.1:{free_port()}/x/")
        stalling = await make_user("stalling", client=True, message_endpoint=stalled.url())
        refused = await make_user("refused", client=True, message_endpoint="http://169.254.169.254/x/")
        reasons = {}
        for who in (closed, stalling, refused):
            training = await create_training(
                client, alice.headers, await upload_global(client, alice.headers), [who.id]
            )
            assert (
                await client.post(f"/api/trainings/{training}/start/", headers=alice.headers)
            ).status_code == 202
            body = await wait_training(
                client, alice.headers, training, lambda b: b["state"] == "E", timeout=15
            )
            reasons[who.user.username] = body["error_reason"].replace(who.id, "<client>")
        assert stalled.connections >= 1  # the peer was reached and stalled: a timeout, not a refusal
    assert len(set(reasons.values())) == 1, reasons
    reason = reasons["closed"].lower()
    for detail in ("refused", "timed out", "timeout", "connect", "errno", "127.0.0.1", "169.254"):
        assert detail not in reason, reason


@pytest.mark.postgres_only
@_on_premise()
async def test_two_processes_keep_each_recipients_order(db_url, settings):
    """Two dispatchers (as two server processes: separate engines) share one outbox: every
    notification is delivered once, each recipient's in id order, a slow recipient's lane
    alongside a fast one's."""

    async def slowly(endpoint: Any, reader: Any, writer: Any) -> None:
        await asyncio.sleep(0.05)
        await answer(200)(endpoint, reader, writer)

    engine = create_engine(db_url)
    maker = create_sessionmaker(engine)
    async with serving(slowly) as slow, serving(answer(200)) as fast:
        from flplatform.orm import User

        async with maker() as session:
            users = [User(username=f"order-{i}", client=True) for i in range(2)]
            session.add_all(users)
            await session.flush()
            for seq in range(12):
                for user, endpoint in zip(users, (slow, fast), strict=True):
                    session.add(
                        Notification(
                            recipient_id=user.id,
                            endpoint=endpoint.url(),
                            payload=f'{{"seq":{seq}}}',
                            notification_type="TRAINING_START",
                            critical=False,
                            attempts=0,
                            status=NotificationStatus.PENDING,
                            next_attempt_at=notify.utcnow(),
                        )
                    )
            await session.commit()

        async def ignore(*_args: Any) -> None:
            return None

        engines = [create_engine(db_url) for _ in range(2)]
        dispatchers = [
            notify.Dispatcher(
                create_sessionmaker(e),
                settings,
                on_rejected=ignore,
                on_failed=ignore,
                after_change=lambda _t: None,
            )
            for e in engines
        ]
        runners = [asyncio.create_task(d.run()) for d in dispatchers]
        try:
            for _ in range(400):
                if len(slow.requests) >= 12 and len(fast.requests) >= 12:
                    break
                for d in dispatchers:
                    d.kick()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a duplicate would show up now
        finally:
            for d in dispatchers:
                d.stop()
            await asyncio.wait_for(asyncio.gather(*runners), timeout=10)
            for e in engines:
                await e.dispose()
    await engine.dispose()
    assert [body["seq"] for _, body in slow.requests] == list(range(12))
    assert [body["seq"] for _, body in fast.requests] == list(range(12))
    # The fast recipient did not wait for the slow one.
    assert fast.requests[-1][0] < slow.requests[-1][0]
