"""Async HTTP wrapper around the flplatform REST API (the DLR platform's wire contract).

One ``httpx.AsyncClient`` with timeouts; connection failures are retried with exponential
back-off (every method when the request never reached the server, read-side failures only
for idempotent methods, so an upload is never applied twice by a retry). Non-2xx answers
raise :class:`APIError` carrying the server's ``detail``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import httpx

from flplatform.client.events import TrainingEvent, parse_sse

log = logging.getLogger("flplatform.client")

JSONDict = dict[str, Any]

# Errors raised before any byte of the request reached the server: safe to retry for every method.
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Errors after the request may have been processed: retried only for idempotent methods.
_READ_ERRORS = (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.WriteError)
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class APIError(Exception):
    """The server answered with a non-2xx status."""

    def __init__(self, method: str, url: str, status_code: int, detail: str, code: str | None = None):
        super().__init__(f"{method} {url} -> {status_code}: {detail}")
        self.method = method
        self.url = url
        self.status_code = status_code
        self.detail = detail
        self.code = code


def _detail(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:500] or response.reason_phrase, None
    if isinstance(body, dict):
        return str(body.get("detail", body)), body.get("code")
    return str(body), None


def _metric_fields(metrics: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Repeated ``metric_names``/``metric_values`` form fields, matched by position."""
    if not metrics:
        return {}
    return {
        "metric_names": [str(name) for name in metrics],
        "metric_values": [
            str(float(value)) if isinstance(value, (int, float)) else str(value) for value in metrics.values()
        ],
    }


class FLPlatformAPI:
    """Authenticated access to one flplatform server.

    Authenticate with ``token`` (sent as ``Authorization: Token <token>``) or with
    ``username``/``password`` (exchanged for a bearer token by :meth:`login`, so the server
    hashes the password once rather than on every request)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.username = username
        self.password = password
        self.retries = retries
        self.backoff = backoff
        self._authorization: str | None = f"Token {token}" if token else None
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
        )

    # ------------------------------------------------------------------ lifecycle and auth

    async def __aenter__(self) -> FLPlatformAPI:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` header value in use (None before :meth:`login` for password auth)."""
        return self._authorization

    async def login(self) -> None:
        """Exchange username/password for a bearer token (``POST /api/auth/token/``); no-op with a token."""
        if self._authorization is not None:
            return
        if not (self.username and self.password):
            raise ValueError("FLPlatformAPI needs a token or a username and password")
        response = await self._send(
            "POST",
            "/api/auth/token/",
            data={"username": self.username, "password": self.password},
            auth=False,
        )
        self._authorization = f"Bearer {response.json()['access_token']}"

    @staticmethod
    def basic_token_authorization(token: str) -> str:
        """The DLR clients' form: HTTP Basic with the token as user name and an empty password."""
        return "Basic " + base64.b64encode(f"{token}:".encode()).decode()

    # ------------------------------------------------------------------ transport

    async def _send(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if auth:
            if self._authorization is None:
                await self.login()
            assert self._authorization is not None
            headers["Authorization"] = self._authorization
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, headers=headers, **kwargs)
            except _CONNECT_ERRORS + _READ_ERRORS as exc:
                retriable = isinstance(exc, _CONNECT_ERRORS) or method in _IDEMPOTENT
                if not retriable or attempt >= self.retries:
                    raise
                delay = self.backoff * 2**attempt
                attempt += 1
                log.warning(
                    "%s %s failed (%s); retry %d/%d in %.2fs", method, path, exc, attempt, self.retries, delay
                )
                await asyncio.sleep(delay)
                continue
            if response.is_success:
                return response
            detail, code = _detail(response)
            raise APIError(method, path, response.status_code, detail, code)

    async def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        return response.json() if response.content else None

    # ------------------------------------------------------------------ users

    async def myself(self) -> JSONDict:
        return await self.request_json("GET", "/api/users/myself/")

    async def create_user(
        self,
        username: str,
        password: str,
        *,
        actor: bool = False,
        client: bool = False,
        message_endpoint: str | None = None,
        email: str | None = None,
        **fields: Any,
    ) -> JSONDict:
        """Create a user (needs a superuser, or self-registration enabled). The answer carries its ``token``."""
        body = {
            "username": username,
            "password": password,
            "actor": actor,
            "client": client,
            "message_endpoint": message_endpoint,
            "email": email,
            **fields,
        }
        return await self.request_json("POST", "/api/users/", json=body)

    async def notification_key(self) -> str:
        """This user's key for checking the server's notification signatures."""
        body = await self.request_json("GET", "/api/users/myself/notification-key/")
        return str(body["key"])

    async def update_myself(self, **fields: Any) -> JSONDict:
        me = await self.myself()
        return await self.request_json("PATCH", f"/api/users/{me['id']}/", json=fields)

    # ------------------------------------------------------------------ models

    async def upload_model(
        self,
        model_file: bytes,
        *,
        name: str,
        description: str = "",
        input_shape: Sequence[int | None] | None = None,
        model_type: str = "GLOBAL",
        round: int | None = None,
        preprocessing_file: bytes | None = None,
    ) -> str:
        """``POST /api/models/`` (multipart); returns the new model's id."""
        data: dict[str, Any] = {"name": name, "description": description, "type": model_type}
        if input_shape is not None:
            data["input_shape"] = ["None" if dim is None else str(dim) for dim in input_shape]
        if round is not None:
            data["round"] = str(round)
        files: dict[str, tuple[str, bytes, str]] = {
            "model_file": ("model.pt", model_file, "application/octet-stream")
        }
        if preprocessing_file is not None:
            files["model_preprocessing_file"] = (
                "preprocessing.pt",
                preprocessing_file,
                "application/octet-stream",
            )
        body = await self.request_json("POST", "/api/models/", data=data, files=files)
        return str(body["model_id"])

    async def download_model(self, model_id: str | uuid.UUID, *, round: int | None = None) -> bytes:
        """``GET /api/models/{id}/`` raw bytes (TorchScript archive); ``round`` asks for a past round."""
        params = {"round": round} if round is not None else None
        response = await self._send("GET", f"/api/models/{model_id}/", params=params)
        return response.content

    async def model_metadata(self, model_id: str | uuid.UUID) -> JSONDict:
        return await self.request_json("GET", f"/api/models/{model_id}/metadata/")

    async def upload_update(
        self,
        model_id: str | uuid.UUID,
        model_file: bytes,
        *,
        round: int,
        sample_size: int,
        metrics: Mapping[str, Any] | None = None,
        filename: str = "model.pt",
    ) -> JSONDict:
        """A participant's local update: ``POST /api/models/{global id}/`` multipart (201)."""
        data: dict[str, Any] = {
            "round": str(round),
            "sample_size": str(sample_size),
            **_metric_fields(metrics),
        }
        files = {"model_file": (filename, model_file, "application/octet-stream")}
        return await self.request_json("POST", f"/api/models/{model_id}/", data=data, files=files)

    async def upload_metrics(self, model_id: str | uuid.UUID, metrics: Mapping[str, Any]) -> JSONDict:
        """``POST /api/models/{id}/metrics/``: test metrics of (usually) the current global model."""
        return await self.request_json(
            "POST", f"/api/models/{model_id}/metrics/", data=_metric_fields(metrics)
        )

    async def get_metrics(self, model_id: str | uuid.UUID) -> list[JSONDict]:
        return await self.request_json("GET", f"/api/models/{model_id}/metrics/")

    async def upload_swag(
        self,
        model_id: str | uuid.UUID,
        *,
        round: int,
        sample_size: int,
        first_moment: bytes,
        second_moment: bytes,
    ) -> JSONDict:
        """SWAG statistics of a participant: ``POST /api/models/{id}/swag/``."""
        data = {"round": str(round), "sample_size": str(sample_size)}
        files = {
            "first_moment_file": ("first_moment.safetensors", first_moment, "application/octet-stream"),
            "second_moment_file": ("second_moment.safetensors", second_moment, "application/octet-stream"),
        }
        return await self.request_json("POST", f"/api/models/{model_id}/swag/", data=data, files=files)

    # ------------------------------------------------------------------ trainings

    async def create_training(
        self,
        model_id: str | uuid.UUID,
        *,
        target_num_updates: int,
        clients: Iterable[str | uuid.UUID] = (),
        aggregation_method: str = "FedAvg",
        uncertainty_method: str = "NONE",
        metric_names: Sequence[str] = ("accuracy", "loss"),
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """``POST /api/trainings/`` (JSON); returns the training id."""
        body = {
            "model_id": str(model_id),
            "target_num_updates": target_num_updates,
            "metric_names": list(metric_names),
            "aggregation_method": aggregation_method,
            "uncertainty_method": uncertainty_method,
            "options": dict(options or {}),
            "clients": [str(c) for c in clients],
        }
        answer = await self.request_json("POST", "/api/trainings/", json=body)
        return str(answer["training_id"])

    async def register_clients(
        self, training_id: str | uuid.UUID, clients: Iterable[str | uuid.UUID]
    ) -> JSONDict:
        return await self.request_json(
            "PUT", f"/api/trainings/{training_id}/clients/", json={"clients": [str(c) for c in clients]}
        )

    async def start_training(self, training_id: str | uuid.UUID) -> JSONDict:
        return await self.request_json("POST", f"/api/trainings/{training_id}/start/")

    async def get_training(self, training_id: str | uuid.UUID) -> JSONDict:
        return await self.request_json("GET", f"/api/trainings/{training_id}/")

    async def heartbeat(self, training_id: str | uuid.UUID) -> JSONDict:
        """Tell the server this participant is alive; the answer has the training's ``state``,
        ``phase``, ``round`` and whether the current round asked this client (``selected``)."""
        return await self.request_json("POST", f"/api/trainings/{training_id}/heartbeat/")

    async def training_rounds(self, training_id: str | uuid.UUID, *, limit: int = 100) -> list[JSONDict]:
        """Per round (newest first): the clients ``selected``, ``answered`` and ``dropped``."""
        rounds: list[JSONDict] = await self.request_json(
            "GET", f"/api/trainings/{training_id}/rounds/", params={"limit": limit}
        )
        return rounds

    async def wait_for_training(
        self,
        training_id: str | uuid.UUID,
        *,
        states: Iterable[str] = ("C", "E"),
        timeout: float = 600.0,
        interval: float = 0.25,
    ) -> JSONDict:
        """Poll ``GET /api/trainings/{id}/`` until its state is one of ``states``."""
        wanted = set(states)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            training = await self.get_training(training_id)
            if training.get("state") in wanted:
                return training
            if loop.time() > deadline:
                raise TimeoutError(
                    f"training {training_id} still in state {training.get('state')} after {timeout}s"
                )
            await asyncio.sleep(interval)

    async def watch(
        self,
        training_id: str | uuid.UUID,
        *,
        last_event_id: int | None = None,
        until_finished: bool = False,
        idle_timeout: float = 60.0,
    ) -> AsyncIterator[TrainingEvent]:
        """The training's live events (``GET /api/trainings/{id}/events/``), parsed, in order.

        Replays the recorded events after ``last_event_id`` first (all kept ones when None).
        When the connection drops (or nothing, not even a keep-alive ping, arrives for
        ``idle_timeout`` seconds) it reconnects with ``Last-Event-ID``, so no event is missed
        or repeated, with the client's back-off; a 4xx answer raises :class:`APIError`. With
        ``until_finished`` it stops after the event that ends the training (state C or E)."""
        path = f"/api/trainings/{training_id}/events/"
        last = last_event_id
        attempt = 0
        while True:
            if self._authorization is None:
                await self.login()
            headers = {"Accept": "text/event-stream", "Authorization": self._authorization or ""}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            timeout = httpx.Timeout(idle_timeout, connect=self._http.timeout.connect)
            try:
                async with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if not response.is_success:
                        await response.aread()
                        detail, code = _detail(response)
                        raise APIError("GET", path, response.status_code, detail, code)
                    attempt = 0
                    async for message in parse_sse(response.aiter_lines()):
                        if not message.data:
                            continue
                        event = TrainingEvent.from_message(message)
                        if event.seq is not None:
                            last = event.seq
                        yield event
                        if until_finished and event.finished:
                            return
            except (httpx.TransportError, httpx.StreamError) as exc:
                if attempt >= self.retries:
                    raise
                delay = self.backoff * 2**attempt
                attempt += 1
                log.warning("watching training %s: %s; reconnecting in %.2fs", training_id, exc, delay)
                await asyncio.sleep(delay)
                continue
            await asyncio.sleep(self.backoff)  # the server closed the stream: reconnect
