"""The participant runtime: reacts to the server's notifications like the DLR reference client
(answers at once, works in the background), trains with a user-supplied function, uploads
the update and reports test metrics.

User functions (plain or ``async``; plain ones run in a worker thread so the event loop and
the notification endpoint stay responsive):

* ``train(module, round, ctx) -> (sample_size, metrics)``: train ``module`` in place; add
  ``ctx.proximal_term(module)`` to the loss for FedProx (zero unless ``mu`` is set).
* ``test(module, round, ctx) -> metrics``: evaluate the new global model (``MODEL_TEST_ROUND``).
* ``moments(module, round, ctx) -> (sample_size, first_moment, second_moment)``: SWAG statistics
  as flat 1-D tensors in ``module.parameters()`` order (``SWAG_ROUND_START``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Literal

import torch

from flplatform.client.api import APIError, FLPlatformAPI
from flplatform.client.fedprox import proximal_term
from flplatform.client.serialization import dump_module, dump_state_dict, dump_tensor, load_module, snapshot

log = logging.getLogger("flplatform.client")

# Server error codes meaning "not in this phase/round (yet)": a poller retries instead of failing.
NOT_NOW_CODES = frozenset({"wrong_state", "wrong_round", "round_locked"})

Metrics = Mapping[str, float | int | str]
TrainFn = Callable[
    [torch.nn.Module, int, "RoundContext"], "tuple[int, Metrics] | Awaitable[tuple[int, Metrics]]"
]
TestFn = Callable[[torch.nn.Module, int, "RoundContext"], "Metrics | Awaitable[Metrics]"]
MomentsFn = Callable[
    [torch.nn.Module, int, "RoundContext"],
    "tuple[int, torch.Tensor, torch.Tensor] | Awaitable[tuple[int, torch.Tensor, torch.Tensor]]",
]

# What the DLR reference client answers: 200 for lifecycle messages, 202 for work it starts.
STATUS_FOR = {
    "TRAINING_START": 200,
    "UPDATE_ROUND_START": 202,
    "MODEL_TEST_ROUND": 202,
    "SWAG_ROUND_START": 202,
    "TRAINING_FINISHED": 200,
    "CLIENT_REMOVED": 200,
}


@dataclasses.dataclass
class RoundContext:
    """What a user function knows about the round it works on."""

    training_id: str
    round: int
    # The model this round starts from: the global model, or in FedDC daisy-chain rounds
    # another participant's local model.
    model_id: str
    # Where updates and metrics go (the training's global model).
    global_model_id: str
    aggregation_method: str | None
    mu: float | None
    options: dict[str, Any]
    # Parameters as downloaded, the reference point of the FedProx term.
    reference: dict[str, torch.Tensor]
    participant: str

    def proximal_term(self, module: torch.nn.Module) -> torch.Tensor:
        """``mu/2·||w − w_global||²``; a constant 0 when the training sets no ``mu``."""
        return proximal_term(module, self.reference, self.mu)


@dataclasses.dataclass
class RoundRecord:
    kind: Literal["train", "test", "swag"]
    round: int
    model_id: str
    sample_size: int | None
    metrics: dict[str, Any]
    seconds: float
    # For "train": the id the server gave the uploaded local model (when it says).
    uploaded_model_id: str | None = None


@dataclasses.dataclass
class TrainingRun:
    """A participant's view of one training."""

    training_id: str
    global_model_id: str | None = None
    aggregation_method: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    mu: float | None = None
    target_num_updates: int | None = None
    outcome: Literal["running", "finished", "removed", "error"] = "running"
    records: list[RoundRecord] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    finished: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    info_loaded: bool = False
    # (kind, round, model id) of work already accepted: a re-sent notification is not done twice.
    seen: set[tuple[str, int, str]] = dataclasses.field(default_factory=set)

    def rounds(self, kind: str) -> list[int]:
        return [r.round for r in self.records if r.kind == kind]


def _mu_from(*sources: Mapping[str, Any] | None) -> float | None:
    for source in sources:
        if not source:
            continue
        for candidate in (source.get("mu"), (source.get("options") or {}).get("mu")):
            if candidate is not None:
                return float(candidate)
    return None


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        return await result
    return result


class Participant:
    """One client of the platform: give it an authenticated :class:`FLPlatformAPI` and a ``train``
    function, expose it on a :class:`~flplatform.client.endpoint.NotificationEndpoint` (or call
    :meth:`poll`), and it takes part in every training it is registered for.

    ``upload_format``: ``"torchscript"`` (the DLR clients' format) or ``"safetensors"`` (weights only).
    ``template``: a module of the model's architecture, needed only when the server sends safetensors.
    ``signing_key``: when set, notifications must carry a valid HMAC-SHA256 signature of their body.
    """

    def __init__(
        self,
        api: FLPlatformAPI,
        train: TrainFn,
        test: TestFn | None = None,
        moments: MomentsFn | None = None,
        *,
        name: str | None = None,
        upload_format: Literal["torchscript", "safetensors"] = "torchscript",
        template: torch.nn.Module | None = None,
        signing_key: str | bytes | None = None,
        progress: Any | None = None,
        on_record: Callable[[TrainingRun, RoundRecord], None] | None = None,
    ):
        if upload_format not in ("torchscript", "safetensors"):
            raise ValueError("upload_format must be 'torchscript' or 'safetensors'")
        self.api = api
        self.train_fn = train
        self.test_fn = test
        self.moments_fn = moments
        self.name = name or f"participant-{uuid.uuid4().hex[:6]}"
        self.upload_format = upload_format
        self.template = template
        self.signing_key = signing_key.encode() if isinstance(signing_key, str) else signing_key
        self.on_record = on_record
        self.runs: dict[str, TrainingRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._progress = progress
        self._progress_task = progress.add_task(self.name, total=None, status="waiting") if progress else None

    async def fetch_signing_key(self) -> None:
        """Check notification signatures from now on, with this user's key from the server."""
        self.signing_key = (await self.api.notification_key()).encode()

    # ------------------------------------------------------------------ notifications

    def run_for(self, training_id: str | uuid.UUID) -> TrainingRun:
        key = str(training_id)
        if key not in self.runs:
            self.runs[key] = TrainingRun(training_id=key)
        return self.runs[key]

    async def handle_notification(self, payload: Mapping[str, Any]) -> tuple[int, str]:
        """Dispatch one notification; returns the HTTP status to answer and a short reason.
        Work is started in the background so the server gets its answer at once."""
        try:
            kind = str(payload["notification_type"])
            training_id = str(uuid.UUID(str(payload["training_uuid"])))
            body = payload.get("body") or {}
            if not isinstance(body, Mapping):
                raise TypeError("body must be an object")
        except (KeyError, ValueError, TypeError) as exc:
            return 400, f"malformed notification: {exc}"
        log.info("%s: %s for training %s %s", self.name, kind, training_id, dict(body))
        run = self.run_for(training_id)
        model_id = str(body.get("global_model_uuid") or "")
        if kind == "TRAINING_START":
            if model_id:
                run.global_model_id = model_id
            run.mu = _mu_from(body) if _mu_from(body) is not None else run.mu
            self._status(run, "started")
            return STATUS_FOR[kind], "training start noted"
        if kind in ("UPDATE_ROUND_START", "MODEL_TEST_ROUND", "SWAG_ROUND_START"):
            if not model_id or "round" not in body:
                return 400, f"{kind} needs 'round' and 'global_model_uuid'"
            try:
                round_ = int(body["round"])
            except (TypeError, ValueError):
                return 400, "round must be an integer"
            if _mu_from(body) is not None:
                run.mu = _mu_from(body)
            if body.get("training_model_uuid"):
                # flplatform names the upload target explicitly (it differs from the download in FedDC).
                run.global_model_id = str(body["training_model_uuid"])
            # Saying "cannot" (non-2xx, the server then removes this client) beats a silent stall.
            if kind == "SWAG_ROUND_START" and self.moments_fn is None:
                return 501, "this participant computes no SWAG statistics"
            if kind == "MODEL_TEST_ROUND" and self.test_fn is None:
                return 501, "this participant has no test function"
            work = {"UPDATE_ROUND_START": "train", "MODEL_TEST_ROUND": "test", "SWAG_ROUND_START": "swag"}[
                kind
            ]
            key = (work, round_, model_id)
            if key not in run.seen:
                run.seen.add(key)
                self._spawn(self._work(run, work, round_, model_id), f"{self.name}-{work}-{round_}")
            return STATUS_FOR[kind], f"{work} round {round_} accepted"
        if kind == "TRAINING_FINISHED":
            if body.get("state") == "E":
                run.errors.append(f"training ended in error: {body.get('error_reason')}")
            outcome: Literal["finished", "error"] = "error" if body.get("state") == "E" else "finished"
            self._spawn(self._finish(run, outcome), f"{self.name}-finish")
            return STATUS_FOR[kind], "training finished noted"
        if kind == "CLIENT_REMOVED":
            self._spawn(self._finish(run, "removed"), f"{self.name}-removed")
            return STATUS_FOR[kind], "removal noted"
        return 400, f"unknown notification type {kind!r}"

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, run: TrainingRun, outcome: Literal["finished", "removed", "error"]) -> None:
        # Wait for work already queued for this training (a test round may still be uploading).
        async with run.lock:
            if run.outcome == "running":
                run.outcome = outcome
            self._status(run, outcome)
            run.finished.set()

    # ------------------------------------------------------------------ work

    async def _load_info(self, run: TrainingRun, fallback_model_id: str) -> None:
        """Training options, ``mu`` and the real global model id from ``GET /api/trainings/{id}/``
        (notifications may arrive in any order, and FedDC rounds name other clients' models)."""
        if run.info_loaded:
            return
        try:
            training = await self.api.get_training(run.training_id)
        except APIError as exc:
            log.warning(
                "%s: cannot read training %s (%s); using notification data", self.name, run.training_id, exc
            )
            training = {}
        run.info_loaded = True
        if training.get("model"):
            run.global_model_id = str(training["model"])
        run.options = dict(training.get("options") or {})
        run.aggregation_method = training.get("aggregation_method")
        run.target_num_updates = training.get("target_num_updates")
        mu = _mu_from(training)
        if mu is not None:
            run.mu = mu
        if run.global_model_id is None:
            run.global_model_id = fallback_model_id
        if self._progress is not None and run.target_num_updates:
            self._progress.update(self._progress_task, total=run.target_num_updates)

    async def _work(
        self, run: TrainingRun, work: str, round_: int, model_id: str, *, retry_refusals: bool = False
    ) -> bool:
        """Do one piece of work; False if it should be tried again (``retry_refusals``: the server
        said "not now" — a polling client can read a phase that moves on before its upload lands)."""
        async with run.lock:
            if run.outcome != "running":
                return True
            if work == "train" and any(k == "train" and r > round_ for k, r, _ in run.seen):
                # A newer round started while this one waited (an asynchronous training's next
                # version, or a synchronous round that went on without us): train on the newest.
                log.info(
                    "%s: skipping round %s, round %s has started",
                    self.name,
                    round_,
                    max(r for k, r, _ in run.seen if k == "train"),
                )
                return True
            started = time.perf_counter()
            try:
                await self._load_info(run, model_id)
                record = await {"train": self._train, "test": self._test, "swag": self._swag}[work](
                    run, round_, model_id
                )
            except APIError as exc:
                if retry_refusals and exc.code in NOT_NOW_CODES:
                    log.info(
                        "%s: %s round %s refused for now (%s); will retry",
                        self.name,
                        work,
                        round_,
                        exc.detail,
                    )
                    return False
                self._record_failure(run, work, round_, exc)
                return True
            except Exception as exc:  # recorded; the server decides what a missing upload means
                self._record_failure(run, work, round_, exc)
                return True
            record.seconds = time.perf_counter() - started
            run.records.append(record)
            if self.on_record is not None:
                self.on_record(run, record)
            return True

    def _record_failure(self, run: TrainingRun, work: str, round_: int, exc: Exception) -> None:
        message = f"{work} round {round_}: {type(exc).__name__}: {exc}"
        log.error("%s: %s", self.name, message, exc_info=not isinstance(exc, APIError))
        run.errors.append(message)
        self._status(run, f"error in {work} {round_}")

    async def _download(
        self, run: TrainingRun, round_: int, model_id: str
    ) -> tuple[torch.nn.Module, RoundContext]:
        # The global model of exactly this round: in asynchronous trainings the round (the version
        # trained from) may move on between reading it and downloading, and the update names it.
        own_global = model_id == run.global_model_id
        data = await self.api.download_model(model_id, round=round_ if own_global else None)
        module = await asyncio.to_thread(load_module, data, self.template)
        assert run.global_model_id is not None
        ctx = RoundContext(
            training_id=run.training_id,
            round=round_,
            model_id=model_id,
            global_model_id=run.global_model_id,
            aggregation_method=run.aggregation_method,
            mu=run.mu,
            options=run.options,
            reference=snapshot(module),
            participant=self.name,
        )
        return module, ctx

    async def _train(self, run: TrainingRun, round_: int, model_id: str) -> RoundRecord:
        self._status(run, f"round {round_}: download")
        module, ctx = await self._download(run, round_, model_id)
        self._status(run, f"round {round_}: train")
        module.train()
        result = await _call(self.train_fn, module, round_, ctx)
        sample_size, metrics = result
        if self.upload_format == "safetensors":
            payload, filename = await asyncio.to_thread(dump_state_dict, module), "update.safetensors"
        else:
            payload, filename = await asyncio.to_thread(dump_module, module), "update.pt"
        self._status(run, f"round {round_}: upload")
        # Always to the global model: in FedDC rounds ``model_id`` is another client's local model.
        answer = await self.api.upload_update(
            ctx.global_model_id,
            payload,
            round=round_,
            sample_size=int(sample_size),
            metrics=metrics,
            filename=filename,
        )
        self._status(run, f"round {round_}: uploaded", advance=1)
        uploaded = str(answer["model_id"]) if isinstance(answer, dict) and answer.get("model_id") else None
        return RoundRecord("train", round_, model_id, int(sample_size), dict(metrics or {}), 0.0, uploaded)

    async def _test(self, run: TrainingRun, round_: int, model_id: str) -> RoundRecord:
        assert self.test_fn is not None
        self._status(run, f"round {round_}: test")
        module, ctx = await self._download(run, round_, model_id)
        module.eval()
        metrics = dict(await _call(self.test_fn, module, round_, ctx))
        await self.api.upload_metrics(model_id, metrics)
        self._status(run, f"round {round_}: tested")
        return RoundRecord("test", round_, model_id, None, metrics, 0.0)

    async def _swag(self, run: TrainingRun, round_: int, model_id: str) -> RoundRecord:
        assert self.moments_fn is not None
        self._status(run, f"round {round_}: SWAG")
        module, ctx = await self._download(run, round_, model_id)
        sample_size, first, second = await _call(self.moments_fn, module, round_, ctx)
        await self.api.upload_swag(
            ctx.global_model_id,
            round=round_,
            sample_size=int(sample_size),
            first_moment=dump_tensor(first.flatten()),
            second_moment=dump_tensor(second.flatten()),
        )
        return RoundRecord("swag", round_, model_id, int(sample_size), {}, 0.0)

    def _status(self, run: TrainingRun, status: str, advance: int = 0) -> None:
        if self._progress is not None:
            self._progress.update(self._progress_task, status=status, advance=advance)
        else:
            log.info("%s [%s]: %s", self.name, run.training_id[:8], status)

    # ------------------------------------------------------------------ polling fallback

    async def poll(
        self, training_id: str | uuid.UUID, *, interval: float = 0.5, timeout: float | None = None
    ) -> TrainingRun:
        """Take part without a notification endpoint: poll ``GET /api/trainings/{id}/`` and do the
        work the training waits for. Needs the training to expose its ``phase``
        (``update``/``test``/``swag``) and current ``round``; FedDC daisy-chain rounds (which
        hand each client a different model) need notifications."""
        run = self.run_for(training_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while run.outcome == "running":
            training = await self.api.get_training(run.training_id)
            if training.get("model"):
                run.global_model_id = str(training["model"])
            state = training.get("state")
            if state == "C":
                await self._finish(run, "finished")
                break
            if state == "E":
                run.errors.append(f"training in error state: {training.get('error_reason')}")
                await self._finish(run, "error")
                break
            round_ = training.get("round", training.get("current_round"))
            phase = training.get("phase")
            if state in ("O", "S") and round_ is not None and run.global_model_id:
                work = {"update": "train", "test": "test", "swag": "swag"}.get(str(phase), "")
                if work == "test" and self.test_fn is None or work == "swag" and self.moments_fn is None:
                    work = ""
                key = (work, int(round_), run.global_model_id)
                if work and key not in run.seen:
                    run.seen.add(key)
                    if not await self._work(run, work, int(round_), run.global_model_id, retry_refusals=True):
                        run.seen.discard(key)
                        await asyncio.sleep(interval)
                    continue
            if deadline is not None and loop.time() > deadline:
                raise TimeoutError(f"training {run.training_id} did not finish within {timeout}s")
            await asyncio.sleep(interval)
        return run

    # ------------------------------------------------------------------ waiting and shutdown

    async def wait_finished(self, training_id: str | uuid.UUID, timeout: float | None = None) -> TrainingRun:
        run = self.run_for(training_id)
        await asyncio.wait_for(run.finished.wait(), timeout)
        return run

    async def aclose(self) -> None:
        """Cancel background work still running (call at shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
