"""``flplatform participant``: take part in a training from any machine, with your own Python
training function, against a remote server (the SDK's :class:`FLPlatformAPI` over httpx).

::

    flplatform participant --server https://fl.example.org --token $TOKEN \\
        --training 0e87a03a-... --train my_training:train [--test my_training:test]

The command needs no notification endpoint: it reads the training (``GET /api/trainings/{id}/``)
and wakes up on its live events (``GET /api/trainings/{id}/events/``, Server-Sent Events; plain
polling when they are unavailable or with ``--no-events``). Whenever the training waits for this
client's work it downloads the global model of that round, calls the training function, and
uploads the result (safetensors) naming the round; in a test round it calls the test function and
reports its metrics. Asynchronous (FedBuff) trainings work the same way: the client always trains
on the newest global version and names it. It exits 0 when the training completes, 1 when it ends
in error or refuses this client, 2 on bad arguments, 3 when the server stays unreachable for
``--retry-for`` seconds.

User functions, ``module:function`` (a module on ``sys.path``, the working directory included, or
a ``path/to/file.py``), plain Python, run in a worker thread::

    def train(model, ctx):          # model: the TorchScript module (--model-format module, the
        ...                         #   default) or a state dict of tensors (--model-format state_dict)
        return weights, sample_size           # or (weights, sample_size, {"loss": 0.3})

    def test(model, ctx):
        return {"accuracy": 0.93}

``weights`` is a state dict (or a module, whose ``state_dict()`` is taken). ``ctx`` is a dict:
``training_id``, ``round`` (the version trained from), ``model_id``, ``aggregation_method``,
``mu`` (FedProx), ``options`` (the training's options, e.g. ``epochs``), ``target_num_updates``.

Resuming: after every upload the state file (``--state-file``; default
``.flplatform-participant-<training>.json`` in the working directory) records the rounds done,
written atomically. A command killed at any point and started again with the same state file
continues where it stopped: it does not train a round it already uploaded, and redoes one it was
killed in (a re-upload for the same round replaces the earlier one). Network errors are retried
with exponential back-off (0.5 s doubling to 30 s) for ``--retry-for`` seconds.

Liveness: while it runs (and while the training function runs) the command sends the training a
heartbeat every ``--heartbeat-interval`` seconds (``POST /api/trainings/{id}/heartbeat/``), so the
client shows ``online`` and sampling that prefers online clients picks it; a client killed stops
beating and, once offline past the server's drop setting, is dropped from a round it was asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("flplatform.participant")

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# The server's "not in this phase/round (yet)" answers: read the training again.
NOT_NOW = frozenset({"wrong_state", "wrong_round", "round_locked"})
# An update the server will never take (already folded, or too old): train on the newest version.
MOVE_ON = frozenset({"already_folded", "too_stale"})


class UsageError(Exception):
    """Bad arguments or a training this command cannot take part in."""


def load_function(spec: str) -> Callable[..., Any]:
    """``module:function`` or ``path/to/file.py:function``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UsageError(f"{spec!r}: expected module:function")
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"{spec!r}: no file {target}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"{spec!r}: cannot load {target}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UsageError(f"{spec!r}: cannot import {target}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"{spec!r}: {target} has no function {name}")
    return function


@dataclass
class ParticipantState:
    """What survives a restart: the rounds whose work was delivered."""

    path: Path
    training_id: str
    trained: set[int] = field(default_factory=set)
    tested: set[int] = field(default_factory=set)

    @classmethod
    def load(cls, path: Path, training_id: str) -> ParticipantState:
        state = cls(path, training_id)
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("training_id") != training_id:
                raise UsageError(f"{path} belongs to training {data.get('training_id')}, not {training_id}")
            state.trained = {int(r) for r in data.get("trained", [])}
            state.tested = {int(r) for r in data.get("tested", [])}
        return state

    def save(self) -> None:
        body = {
            "training_id": self.training_id,
            "trained": sorted(self.trained),
            "tested": sorted(self.tested),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, dir=self.path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)


class Display:
    """Progress on the terminal (rich), plain log lines otherwise."""

    def __init__(self, enabled: bool, name: str) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.name = name
        self._progress: Any = None
        self._task: Any = None
        self._last = ""

    @contextlib.contextmanager
    def running(self) -> Iterator[Display]:
        if not self.enabled:
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        ) as progress:
            self._progress = progress
            self._task = progress.add_task(self.name, total=None, status="connecting")
            yield self
            self._progress = None

    def update(self, status: str, *, completed: int | None = None, total: int | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, status=status, completed=completed, total=total)
        else:
            where = f" [{completed}/{total}]" if completed is not None and total else ""
            line = f"{self.name}{where}: {status}"
            if line != self._last:  # a log line per change, not per look at the training
                log.info("%s", line)
                self._last = line


def _as_state_dict(weights: Any) -> dict[str, Any]:
    import torch

    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise TypeError("the training function must return (weights, sample_size[, metrics]) with weights a "
                        "state dict of tensors or a module")  # fmt: skip
    return weights


def _unpack(result: Any) -> tuple[dict[str, Any], int, dict[str, Any]]:
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise TypeError(
            "the training function must return (weights, sample_size) or (weights, sample_size, metrics)"
        )
    weights, sample_size = result[0], result[1]
    metrics = dict(result[2] or {}) if len(result) == 3 else {}
    return _as_state_dict(weights), int(sample_size), metrics


class Runner:
    """The command's loop: read the training, do the work it waits for, wait for news."""

    def __init__(self, args: argparse.Namespace, api: Any, state: ParticipantState, display: Display) -> None:
        self.args = args
        self.api = api
        self.state = state
        self.display = display
        self.train_fn = load_function(args.train)
        self.test_fn = load_function(args.test) if args.test else None
        self.news = asyncio.Event()
        self.warned_no_test = False

    # -- the server, with back-off ----------------------------------------------------------------

    async def call(self, what: str, make: Callable[[], Any]) -> Any:
        """``await make()``, retrying network errors and 5xx answers with back-off."""
        import httpx

        from flplatform.client.api import APIError

        delay, started = 0.5, time.monotonic()
        while True:
            try:
                return await make()
            except (httpx.TransportError, APIError) as exc:
                if isinstance(exc, APIError) and exc.status_code < 500:
                    raise
                if time.monotonic() - started > self.args.retry_for:
                    raise ServerUnreachable(f"{what}: {exc}") from exc
                self.display.update(f"{what}: {type(exc).__name__}; retrying in {delay:.1f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def listen(self) -> None:
        """Wake the loop on every training event (SSE); on refusal or failure, polling only."""
        from flplatform.client.api import APIError

        while True:
            try:
                async for _event in self.api.watch(self.args.training, idle_timeout=60.0):
                    self.news.set()
            except APIError as exc:
                if exc.status_code < 500:
                    log.info(
                        "training events unavailable (%s); polling every %ss",
                        exc.detail,
                        self.args.poll_interval,
                    )
                    return
            except Exception as exc:  # network trouble: the poll keeps going, listen again later
                log.debug("training events: %s", exc)
            await asyncio.sleep(self.args.poll_interval)

    async def beat(self) -> None:
        """Heartbeats every ``--heartbeat-interval`` seconds; failures only logged (the work loop
        handles an unreachable server), a refusal (4xx) stops them."""
        from flplatform.client.api import APIError

        while True:
            try:
                await self.api.heartbeat(self.args.training)
            except APIError as exc:
                if exc.status_code < 500:
                    log.warning("heartbeats refused (%s); not sending more", exc.detail)
                    return
                log.debug("heartbeat: %s", exc)
            except Exception as exc:  # network trouble: try again at the next beat
                log.debug("heartbeat: %s", exc)
            await asyncio.sleep(self.args.heartbeat_interval)

    async def wait_for_news(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.news.wait(), self.args.poll_interval)
        self.news.clear()

    # -- work ------------------------------------------------------------------------------------

    def context(self, training: dict[str, Any], round_: int) -> dict[str, Any]:
        options = dict(training.get("options") or {})
        return {
            "training_id": self.args.training,
            "round": round_,
            "model_id": str(training["model"]),
            "aggregation_method": training.get("aggregation_method"),
            "mu": training.get("mu", options.get("mu")),
            "options": options,
            "target_num_updates": training.get("target_num_updates"),
        }

    async def model_for(self, training: dict[str, Any], round_: int) -> Any:
        from flplatform.client.serialization import load_module

        data = await self.call("download", lambda: self.api.download_model(training["model"], round=round_))
        module = await asyncio.to_thread(load_module, data)
        if self.args.model_format == "state_dict":
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
        return module

    async def train(self, training: dict[str, Any], round_: int, progress: tuple[int, int]) -> None:
        from flplatform.client.api import APIError
        from flplatform.client.serialization import dump_state_dict

        self.display.update(f"round {round_}: downloading", completed=progress[0], total=progress[1])
        model = await self.model_for(training, round_)
        self.display.update(f"round {round_}: training", completed=progress[0], total=progress[1])
        result = await asyncio.to_thread(self.train_fn, model, self.context(training, round_))
        weights, sample_size, metrics = _unpack(result)
        payload = await asyncio.to_thread(dump_state_dict, weights)
        self.display.update(f"round {round_}: uploading", completed=progress[0], total=progress[1])
        try:
            await self.call(
                "upload",
                lambda: self.api.upload_update(
                    training["model"],
                    payload,
                    round=round_,
                    sample_size=sample_size,
                    metrics=metrics,
                    filename="update.safetensors",
                ),
            )
        except APIError as exc:
            if exc.code in NOT_NOW:
                self.display.update(f"round {round_}: not taken ({exc.detail})")
                return  # the training moved on meanwhile: read it again
            if exc.code not in MOVE_ON:
                raise
            self.display.update(f"round {round_}: {exc.detail}")
        self.state.trained.add(round_)
        self.state.save()
        self.display.update(f"round {round_}: uploaded", completed=progress[0], total=progress[1])

    async def test(self, training: dict[str, Any], round_: int) -> None:
        from flplatform.client.api import APIError

        assert self.test_fn is not None
        self.display.update(f"round {round_}: testing")  # (the test of the global model of round_)
        model = await self.model_for(training, round_)
        metrics = dict(await asyncio.to_thread(self.test_fn, model, self.context(training, round_)))
        try:
            await self.call("report", lambda: self.api.upload_metrics(training["model"], metrics))
        except APIError as exc:
            if exc.code not in NOT_NOW:
                raise
            return
        self.state.tested.add(round_)
        self.state.save()
        self.display.update(f"round {round_}: tested")

    async def step(self) -> int | None:
        """One look at the training; an exit code once it has ended."""
        training = await self.call("reading the training", lambda: self.api.get_training(self.args.training))
        state, phase, round_ = training.get("state"), training.get("phase"), int(training.get("round") or 0)
        start, target = int(training.get("start_round") or 0), int(training.get("target_num_updates") or 0)
        progress = (round_ - start, target)
        if state == "C":
            self.display.update("training completed", completed=target, total=target)
            return EXIT_DONE
        if state == "E":
            self.display.update(f"training ended in error: {training.get('error_reason')}")
            return EXIT_FAILED
        if training.get("aggregation_method") == "FedDC" or state == "S":
            raise UsageError("FedDC daisy chains and SWAG rounds need the SDK's notification endpoint")
        if state == "O" and phase == "update" and round_ not in self.state.trained:
            await self.train(training, round_, progress)
            return None
        if state == "O" and phase == "test" and round_ not in self.state.tested:
            if self.test_fn is not None:
                await self.test(training, round_)
                return None
            if not self.warned_no_test:
                log.warning("training runs model test rounds but no --test function was given")
                self.warned_no_test = True
        status = "waiting for the first round" if state == "I" else f"round {round_}: waiting for the others"
        self.display.update(status, completed=progress[0], total=progress[1] or None)
        await self.wait_for_news()
        return None

    async def run(self) -> int:
        helpers = [] if self.args.no_events else [asyncio.create_task(self.listen())]
        if self.args.heartbeat_interval > 0:
            helpers.append(asyncio.create_task(self.beat()))
        try:
            while True:
                code = await self.step()
                if code is not None:
                    return code
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)


class ServerUnreachable(Exception):
    pass


async def _main(args: argparse.Namespace) -> int:
    from flplatform.client.api import APIError, FLPlatformAPI

    state_file = Path(args.state_file or f".flplatform-participant-{args.training}.json")
    state = ParticipantState.load(state_file, args.training)
    display = Display(not args.no_progress, args.name or "participant")
    api = FLPlatformAPI(
        args.server, token=args.token, username=args.username, password=args.password, timeout=args.timeout
    )
    try:
        runner = Runner(args, api, state, display)
        with display.running():
            return await runner.run()
    except APIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ServerUnreachable as exc:
        print(f"error: server unreachable for {args.retry_for:g}s: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        await api.aclose()


def run_participant(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not args.token and not (args.username and args.password):
        print("error: give --token, or --username and --password", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_main(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def register(sub: argparse._SubParsersAction) -> None:
    """``flplatform participant`` (the command line's entry adds it)."""
    parser = sub.add_parser(
        "participant",
        help="take part in a training as a client, with your own training function",
        description="Join a training on a remote flplatform server as one of its participants: download "
        "each round's global model, run your training function, upload the update, until the training "
        "ends. Resumable (state file) and retrying on network errors.",
    )
    parser.add_argument("--server", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--token", default=os.environ.get("FLPLATFORM_TOKEN"), help="API token (default: $FLPLATFORM_TOKEN)"
    )
    parser.add_argument("--username", help="log in with a user name and password instead of a token")
    parser.add_argument("--password", help="the password of --username")
    parser.add_argument("--training", required=True, help="the training's id")
    parser.add_argument(
        "--train", required=True, help="the training function, module:function or file.py:function"
    )
    parser.add_argument("--test", help="the test function for model test rounds (default: none)")
    parser.add_argument(
        "--model-format",
        choices=("module", "state_dict"),
        default="module",
        help="what the functions get: the TorchScript module or a state dict of tensors (default: %(default)s)",
    )
    parser.add_argument(
        "--state-file", help="resume state (default: .flplatform-participant-<training>.json)"
    )
    parser.add_argument("--name", help="name shown in the progress display (default: participant)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=2.0,
        help="seconds between reads when nothing happens (default: %(default)s)",
    )
    parser.add_argument(
        "--no-events", action="store_true", help="poll only; do not listen to the training's events"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=30.0,
        help="seconds between heartbeats that show this client online; 0: none (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-for",
        type=float,
        default=300.0,
        help="give up after the server was unreachable this many seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per HTTP request (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    parser.set_defaults(func=run_participant)
