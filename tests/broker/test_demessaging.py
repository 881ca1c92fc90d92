"""End to end with the real DASF client library (demessaging 0.6.4): a backend module run with
``listen`` in a subprocess, callers through the ``send-request`` CLI, the Python API and a raw
websocket client, all through our broker on a real uvicorn."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from flplatform.orm.broker import BrokerTopic
from tests.broker.conftest import recv_json

pytestmark = pytest.mark.slow

MODULE = Path(__file__).with_name("dasf_module.py")
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("DE_BACKEND_HEADER", None)
    env["DASF_REPORT_SHOW_METHOD"] = "PRINT"  # progress reports: no terminal (curses) here
    return env


def _command(live: Any, topic: str, *args: str, token: str | None = None) -> list[str]:
    cmd = [sys.executable, str(MODULE), "-t", topic, "--websocket-url", live.ws_url]
    if token:
        cmd += ["--header", json.dumps({"authorization": f"Token {token}"})]
    return cmd + list(args)


async def _run(cmd: list[str], timeout: float = 40) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env()
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"timed out after {timeout}s: {cmd}") from None
    return proc.returncode or 0, out.decode(), err.decode()


class Backend:
    def __init__(self, live: Any, topic: str, token: str | None = None):
        self.live, self.topic, self.token = live, topic, token
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Backend:
        self.proc = await asyncio.create_subprocess_exec(
            *_command(self.live, self.topic, "listen", token=self.token),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=_env(),
        )
        # Ready when the backend answered the broker's api_info request (sent on connect).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            async with self.live.app.state.sessionmaker() as session:
                info = (
                    await session.execute(select(BrokerTopic.api_info).where(BrokerTopic.slug == self.topic))
                ).scalar_one()
            if info:
                return self
            if self.proc.returncode is not None:
                raise AssertionError((await self.proc.stderr.read()).decode()[-2000:])  # type: ignore[union-attr]
            await asyncio.sleep(0.1)
        raise AssertionError("backend did not connect")

    async def __aexit__(self, *exc: Any) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def _python_api_call(live: Any, topic: str, request: dict[str, Any], token: str | None = None) -> Any:
    """demessaging's Python API (sync, threads): ``BackendModule.create_model(...).send_request``."""
    from demessaging.backend.module import BackendModule
    from demessaging.config import WebsocketURLConfig

    header = {"authorization": f"Token {token}"} if token else {}
    config = WebsocketURLConfig(topic=topic, websocket_url=live.ws_url, header=header)
    model = BackendModule.create_model(
        "tests.broker.dasf_module", members=["hello_world", "add"], messaging_config=config
    )
    try:
        return model.send_request(request).root  # type: ignore[attr-defined]
    finally:
        producer = config._producer
        if producer is not None:
            producer.out_app.close()
            producer.disconnect()


async def test_demessaging_backend_and_callers(live):
    topic = await live.create_topic(f"hello_{uuid.uuid4().hex[:8]}", anonymous=True)
    async with Backend(live, topic):
        # api_info came back through ws/status-ping and is stored.
        async with live.http() as http:
            detail = (await http.get(f"/api/broker/topics/{topic}/")).json()
        assert {f["name"] for f in detail["api_info"]["functions"]} == {
            "hello_world",
            "add",
            "count_to",
            "big",
        }
        # Three CLI callers at once (each is a fresh interpreter): hello world, arguments, and a
        # validation error, which travels back as an error response so the client raises.
        hello, added, invalid = await asyncio.gather(
            _run(_command(live, topic, "send-request", '{"func_name": "hello_world"}')),
            _run(_command(live, topic, "send-request", '{"func_name": "add", "a": 2, "b": 40}')),
            _run(_command(live, topic, "send-request", '{"func_name": "add", "a": "x"}')),
        )
        assert hello[0] == 0 and "Hello World!" in hello[1], hello[2][-2000:]
        assert added[0] == 0 and added[1].strip().endswith("42"), added[2][-2000:]
        assert invalid[0] != 0 and "validat" in invalid[2].lower()
        # The Python API.
        assert (
            await asyncio.to_thread(_python_api_call, live, topic, {"func_name": "hello_world"})
            == "Hello World!"
        )
        assert await asyncio.to_thread(_python_api_call, live, topic, {"func_name": "add", "a": 1}) == 2
        # Availability through the reference's HTTP views.
        async with live.http(follow_redirects=False) as http:
            ping = await http.get(f"/ws/{topic}/ping/")
            assert ping.status_code == 302 and ping.headers["location"].endswith(f"/ws/{topic}/status/")
            for _ in range(50):
                status = await http.get(f"/ws/{topic}/status/")
                if status.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (status.status_code, status.text) == (200, "Consumer connected")


async def test_progress_and_fragmented_response_pass_through(live):
    """A raw caller sees the progress messages and a >1 MB answer in ordered fragments (the
    demessaging Python client cannot reassemble fragments itself: dasf-protocol.md §7.1)."""
    topic = await live.create_topic(f"big_{uuid.uuid4().hex[:8]}", anonymous=True)
    response_topic = f"{topic}_resp"
    async with Backend(live, topic):
        async with live.connect(f"{response_topic}/web-frontend-2025-01-01T12:00:00.000Z") as inbox:
            async with live.connect(topic) as outbox:
                for context, request in (
                    (1, {"func_name": "count_to", "n": 2, "reporter": {"step_message": "Counting"}}),
                    (2, {"func_name": "big", "size": 1_200_000}),
                ):
                    body = base64.b64encode(json.dumps(request).encode()).decode()
                    await outbox.send(
                        json.dumps(
                            {
                                "properties": {
                                    "response_topic": response_topic,
                                    "requestContext": str(context),
                                    "messageType": "request",
                                },
                                "payload": body,
                                "context": str(context),
                            }
                        )
                    )
                    assert (await recv_json(outbox))["result"] == "ok"
                kinds: list[str] = []  # request 1's message types, in arrival order
                fragments: dict[int, str] = {}
                fragments_expected = None
                # The backend may answer the two requests in either order (on a loaded machine the big
                # answer can finish first): read until request 1 is answered and request 2 is complete.
                while "response" not in kinds or len(fragments) != fragments_expected:
                    message = await recv_json(inbox, timeout=30)
                    await inbox.send(json.dumps({"messageId": message["messageId"]}))
                    props = message["properties"]
                    if props["requestContext"] == "2":
                        fragments[int(props["fragment"])] = message["payload"]
                        fragments_expected = int(props["num_fragments"])
                    else:
                        kinds.append(props["messageType"])
        assert "progress" in kinds and kinds.index("progress") < kinds.index("response"), kinds
        assert len(fragments) >= 3 and list(fragments) == sorted(fragments)  # several, in order
        answer = json.loads(base64.b64decode("".join(fragments[i] for i in range(len(fragments)))))
        assert answer == "x" * 1_200_000


async def test_private_topic_with_tokens_and_fast_refusal(live, make_user):
    backend_user = await make_user("dasf-backend")
    caller = await make_user("dasf-caller")
    topic = await live.create_topic(
        f"private_{uuid.uuid4().hex[:8]}",
        grants=[(backend_user, {"can_consume": True}), (caller, {"can_produce": True})],
    )
    async with Backend(live, topic, token=backend_user.token):
        rc, out, err = await _run(
            _command(live, topic, "send-request", '{"func_name": "add", "a": 40, "b": 2}', token=caller.token)
        )
        assert rc == 0 and out.strip().endswith("42"), err[-2000:]
        assert (
            await asyncio.to_thread(_python_api_call, live, topic, {"func_name": "hello_world"}, caller.token)
            == "Hello World!"
        )
        # Anonymous callers are refused with an "error" ack: the client fails fast instead of hanging.
        started = time.monotonic()
        rc, out, err = await _run(
            _command(live, topic, "send-request", '{"func_name": "hello_world"}'), timeout=30
        )
        assert rc != 0 and "error" in err.lower()
        assert time.monotonic() - started < 15
