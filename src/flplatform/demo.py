"""``flplatform demo``: a complete federated training on one machine, to watch it work.

It starts the server in-process on a throwaway SQLite database (a free port), creates an
admin (``FLP_ADMIN_*``), an actor and N clients whose notification endpoints are served by one
local HTTP server, uploads a small TorchScript CNN, splits scikit-learn's bundled 8×8 digits
label-skewed (Dirichlet) among the clients, runs the training and prints the global model's
accuracy and loss on a held-out test set after every round, with the seconds each round took.

Reproducible: with the same ``--seed`` (and the same arguments, torch version and machine
architecture) two runs print the same accuracies and losses bit for bit. The data splits, the
initial model, each client's batch order and the server's aggregation order are all fixed by
the seed, whatever order the clients finish in. ``--plot PATH`` draws the curves (matplotlib,
``pip install 'flplatform[plot]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("FedAvg", "FedProx", "FedDC")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a small federated training end to end on a temporary server",
        description="Start a server on a temporary SQLite database, create users, upload a TorchScript CNN and "
        "train it federated on scikit-learn's bundled 8x8 digits (non-IID split among the clients); "
        "prints the global model's held-out accuracy and loss per round.",
    )
    demo.add_argument(
        "--method", choices=METHODS, default="FedAvg", help="aggregation method (default: %(default)s)"
    )
    demo.add_argument("--rounds", type=int, default=5, help="aggregation rounds (default: %(default)s)")
    demo.add_argument("--clients", type=int, default=5, help="participants (default: %(default)s)")
    demo.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight (default: %(default)s)")
    demo.add_argument(
        "--daisy-chain-period",
        type=int,
        default=1,
        help="FedDC: redistribute every d rounds (default: %(default)s)",
    )
    demo.add_argument(
        "--aggregation-period",
        type=int,
        default=2,
        help="FedDC: aggregate every b rounds (default: %(default)s)",
    )
    demo.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration of the label skew; smaller is more skewed (default: %(default)s)",
    )
    demo.add_argument("--epochs", type=int, default=3, help="local epochs per round (default: %(default)s)")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, the model and the training; the same seed gives the same "
        "results bit for bit (default: %(default)s)",
    )
    demo.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    demo.add_argument(
        "--upload-format",
        choices=("torchscript", "safetensors"),
        default="torchscript",
        help="how clients upload their updates (default: %(default)s)",
    )
    demo.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds (default: %(default)s)"
    )
    demo.add_argument("--json", type=Path, help="also write the per-round results to this file")
    demo.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="also draw accuracy and loss per round into this PNG (needs matplotlib: "
        "pip install 'flplatform[plot]')",
    )
    demo.add_argument("--keep-db", action="store_true", help="keep the temporary database and print its path")
    demo.add_argument("-v", "--verbose", action="store_true", help="log client and server activity")
    demo.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.clients < 1:
        print("error: --rounds and --clients must be at least 1", file=sys.stderr)
        return 2
    if args.plot is not None:
        from flplatform.demo_plot import missing_matplotlib

        if (problem := missing_matplotlib()) is not None:
            print(f"error: --plot {problem}", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="flplatform-demo-"))
    try:
        return asyncio.run(run_demo(args, workdir))
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep_db:
            print(f"database kept at {workdir / 'demo.db'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class RoundRow:
    round: int
    accuracy: float | None = None
    loss: float | None = None
    seconds: float | None = None  # wall time from the previous global model to this one
    client_accuracy: list[tuple[str, int, float]] = field(
        default_factory=list
    )  # (client, test size, accuracy)
    train_loss: list[tuple[str, int, float]] = field(default_factory=list)  # (client, sample size, loss)

    @property
    def train_loss_mean(self) -> float | None:
        return _weighted(self.train_loss)


def _weighted(values: list[tuple[str, int, float]]) -> float | None:
    """Weighted mean, summed in client order (not arrival order) so reruns print the same digits."""
    ordered = sorted(values)
    total = sum(n for _, n, _ in ordered)
    return sum(n * v for _, n, v in ordered) / total if total else None


def _configure_server_env(workdir: Path, port: int, verbose: bool) -> tuple[str, str, str]:
    """Settings of the throwaway server; returns (database url, admin name, admin password)."""
    url = f"sqlite+aiosqlite:///{workdir / 'demo.db'}"
    admin, password = "demo-admin", secrets.token_urlsafe(16)
    os.environ.update(
        {
            "FLP_DATABASE_URL": url,
            "FLP_SECRET_KEY": secrets.token_urlsafe(32),
            "FLP_ADMIN_USERNAME": admin,
            "FLP_ADMIN_PASSWORD": password,
            "FLP_ADMIN_EMAIL": "admin@example.org",
            "FLP_LOG_LEVEL": "INFO" if verbose else "WARNING",
            # Throwaway accounts: cheap password hashing keeps start-up quick.
            "FLP_ARGON2_TIME_COST": "1",
            "FLP_ARGON2_MEMORY_COST_KIB": "8192",
            # The demo's participants listen on this machine's loopback interface.
            "FLP_NOTIFICATION_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
        }
    )
    from flplatform.settings import get_settings

    get_settings.cache_clear()
    return url, admin, password


async def run_demo(args: argparse.Namespace, workdir: Path) -> int:
    started = time.perf_counter()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("uvicorn.error", "httpx", "flplatform"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.WARNING)

    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from flplatform.app import create_app
    from flplatform.client import FLPlatformAPI, NotificationEndpoint, Participant, digits, dump_module
    from flplatform.client.embedded import EmbeddedServer
    from flplatform.migrate import upgrade
    from flplatform.settings import get_settings

    console = Console()
    # Five clients train concurrently in threads on a small machine: one intra-op thread each.
    torch.set_num_threads(1)

    url, admin_name, admin_password = _configure_server_env(workdir, args.port, args.verbose)
    await asyncio.to_thread(upgrade, url)
    server = EmbeddedServer(
        create_app(get_settings()), "127.0.0.1", args.port, log_level="info" if args.verbose else "warning"
    )
    await server.start()
    endpoint = NotificationEndpoint("127.0.0.1", 0)
    await endpoint.start()
    apis: list[FLPlatformAPI] = []
    participants: list[Participant] = []
    try:
        console.print(
            f"[bold]flplatform demo[/]: server {server.url} (SQLite in {workdir}), {args.clients} clients, "
            f"{args.rounds} rounds of {args.method}, seed {args.seed}"
        )

        # ---- data: held-out test set for the global model, non-IID shards for the clients
        data = digits.load_digits_tensors()
        train_pool, held_out = digits.train_test_split(data, 0.2, args.seed)
        shards = digits.dirichlet_partition(train_pool, args.clients, args.alpha, args.seed)

        # ---- users: admin from FLP_ADMIN_*, one actor, N clients with message endpoints
        admin = FLPlatformAPI(server.url, username=admin_name, password=admin_password)
        apis.append(admin)
        await admin.login()
        actor_user = await admin.create_user(
            "demo-actor", secrets.token_urlsafe(12), actor=True, email="actor@example.org"
        )
        actor = FLPlatformAPI(server.url, token=actor_user["token"])
        apis.append(actor)

        rows: dict[int, RoundRow] = {}
        rows_lock = threading.Lock()
        # When each global model was first seen (round 0: the start of the training).
        round_marks: dict[int, float] = {}

        def row(r: int) -> RoundRow:
            with rows_lock:
                return rows.setdefault(r, RoundRow(r))

        def central_eval(round_: int, module: torch.nn.Module) -> None:
            """Every client evaluates the same global model: score it on the held-out set once per round."""
            current = row(round_)
            with rows_lock:
                if current.accuracy is not None:
                    return
                seconds = mark_round(round_)
                metrics = digits.evaluate(module, held_out)
                current.accuracy, current.loss = metrics["accuracy"], metrics["loss"]
            progress.console.print(
                f"  round {round_}: held-out accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.3f}"
                + ("" if seconds is None else f" ({seconds:.1f} s)")
            )

        def mark_round(round_: int) -> float | None:
            """Seconds since the previous round's global model (call with rows_lock held)."""
            now = time.perf_counter()
            round_marks.setdefault(round_, now)
            before = max((r for r in round_marks if r < round_), default=None)
            if before is None:
                return None
            rows.setdefault(round_, RoundRow(round_)).seconds = round_marks[round_] - round_marks[before]
            return rows[round_].seconds

        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )

        client_users = []
        for index, shard in enumerate(shards):
            name = f"client-{index + 1}"
            local_train, local_test = digits.train_test_split(shard, 0.2, args.seed + index)
            trainer = digits.LocalTrainer(
                local_train, local_test, epochs=args.epochs, seed=args.seed * 1000 + index
            )

            def test(
                module: torch.nn.Module, round_: int, ctx: Any, trainer: digits.LocalTrainer = trainer
            ) -> dict[str, float]:
                central_eval(round_, module)
                return dict(trainer.test(module, round_, ctx))

            def on_record(run: Any, record: Any, test_size: int = len(local_test), name: str = name) -> None:
                if record.kind == "test":
                    row(record.round).client_accuracy.append((name, test_size, record.metrics["accuracy"]))
                elif record.kind == "train":
                    # The update of round r goes into the global model of round r + 1.
                    row(record.round + 1).train_loss.append(
                        (name, record.sample_size, record.metrics["train_loss"])
                    )

            user = await admin.create_user(
                name,
                secrets.token_urlsafe(12),
                client=True,
                email=f"{name}@example.org",
                message_endpoint=f"{endpoint.public_url}/{name}/",
            )
            client_users.append(user)
            api = FLPlatformAPI(server.url, token=user["token"])
            apis.append(api)
            participant = Participant(
                api,
                trainer.train,
                test,
                name=name,
                upload_format=args.upload_format,
                template=digits.DigitsCNN() if args.upload_format == "safetensors" else None,
                progress=progress,
                on_record=on_record,
            )
            endpoint.add(participant)
            participants.append(participant)
        sizes = ", ".join(f"{len(s)} ({sum(1 for c in s.label_counts() if c)} classes)" for s in shards)
        console.print(
            f"non-IID split (Dirichlet alpha={args.alpha}): {sizes}; held-out test set {len(held_out)}"
        )

        # ---- model and training
        model = digits.make_model(args.seed)
        initial = digits.evaluate(model, held_out)
        row(0).accuracy, row(0).loss = initial["accuracy"], initial["loss"]
        model_id = await actor.upload_model(
            dump_module(model),
            name="digits-cnn",
            description="8x8 digits CNN (flplatform demo)",
            input_shape=digits.INPUT_SHAPE,
        )
        options: dict[str, Any] = {}
        if args.method == "FedProx":
            options["mu"] = args.mu
        if args.method == "FedDC":
            options["daisy_chain_period"] = args.daisy_chain_period
            options["aggregation_period"] = args.aggregation_period
            options["seed"] = args.seed  # which client continues from which local model
        training_id = await actor.create_training(
            model_id,
            target_num_updates=args.rounds,
            clients=[u["id"] for u in client_users],
            aggregation_method=args.method,
            metric_names=["accuracy", "loss"],
            options=options,
        )

        with progress:
            with rows_lock:
                mark_round(0)
            await actor.start_training(training_id)
            final = await actor.wait_for_training(training_id, timeout=args.timeout)
            await asyncio.gather(
                *(p.wait_finished(training_id, timeout=30) for p in participants), return_exceptions=True
            )

        # The final global model, scored here too (covers trainings whose last test round is skipped).
        final_round = int(final.get("round") or max(rows))
        if row(final_round).accuracy is None and final.get("state") == "C":
            from flplatform.client import load_module

            module = load_module(await actor.download_model(model_id), digits.DigitsCNN())
            metrics = digits.evaluate(module, held_out)
            with rows_lock:
                mark_round(final_round)
            row(final_round).accuracy, row(final_round).loss = metrics["accuracy"], metrics["loss"]

        table = Table(title=f"Global model on the held-out test set ({len(held_out)} digits) — {args.method}")
        table.add_column("round", justify="right")
        table.add_column("accuracy", justify="right")
        table.add_column("loss", justify="right")
        table.add_column("seconds", justify="right")
        table.add_column("clients' test accuracy", justify="right")
        table.add_column("clients' train loss", justify="right")
        for r in sorted(rows):
            current = rows[r]
            if current.accuracy is None:
                continue
            client_acc = _weighted(current.client_accuracy)
            train_loss = _weighted(current.train_loss)
            table.add_row(
                str(r),
                f"{current.accuracy:.4f}",
                f"{current.loss:.4f}",
                "–" if current.seconds is None else f"{current.seconds:.1f}",
                "–" if client_acc is None else f"{client_acc:.4f}",
                "–" if train_loss is None else f"{train_loss:.4f}",
            )
        console.print(table)

        errors = [f"{p.name}: {e}" for p in participants for e in p.run_for(training_id).errors]
        for message in errors:
            console.print(f"[red]client error[/] {message}")
        scored = [rows[r] for r in sorted(rows) if rows[r].accuracy is not None]
        elapsed = time.perf_counter() - started
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "method": args.method,
                        "clients": args.clients,
                        "rounds": args.rounds,
                        "seed": args.seed,
                        "state": final.get("state"),
                        "error_reason": final.get("error_reason"),
                        "seconds": elapsed,
                        "rows": [
                            {
                                "round": x.round,
                                "accuracy": x.accuracy,
                                "loss": x.loss,
                                "seconds": x.seconds,
                                "clients_test_accuracy": _weighted(x.client_accuracy),
                                "clients_train_loss": _weighted(x.train_loss),
                            }
                            for x in scored
                        ],
                        "client_errors": errors,
                    },
                    indent=2,
                )
            )
        if args.plot is not None and len(scored) > 1:
            from flplatform.demo_plot import plot_rounds

            plot_rounds(
                scored,
                args.plot,
                title=f"flplatform demo: {args.method}, {args.clients} clients, seed {args.seed}",
                held_out=len(held_out),
            )
            console.print(f"plot written to {args.plot}")
        if final.get("state") != "C":
            console.print(
                f"[red]training ended in state {final.get('state')}: {final.get('error_reason')}[/]"
            )
            return 1
        first, last = scored[0], scored[-1]
        console.print(
            f"training {training_id} completed in {elapsed:.1f}s: accuracy {first.accuracy:.3f} → {last.accuracy:.3f}, "
            f"loss {first.loss:.3f} → {last.loss:.3f}"
        )
        return 0
    finally:
        for participant in participants:
            await participant.aclose()
        for api in apis:
            await api.aclose()
        await endpoint.stop()
        await server.stop()
