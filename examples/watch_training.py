"""Watch a training from the coordinator's side: its state, and per round the accuracy and loss
that the participants measured on the new global model (``GET /api/models/{id}/metrics/``).

    .venv/bin/python examples/watch_training.py --server http://127.0.0.1:8000 --token $TOKEN --training $TRAINING

Exits 0 when the training completes (state C), 1 when it ends in error (state E).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict

from flplatform.client import FLPlatformAPI


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server", default="http://127.0.0.1:8000", help="flplatform URL (default %(default)s)"
    )
    parser.add_argument("--token", required=True, help="a token of the training's actor or an administrator")
    parser.add_argument("--training", required=True, help="training id")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    args = parser.parse_args()

    started = time.monotonic()
    printed: set[int] = set()
    state = phase = None
    # An access token from POST /api/auth/token/ or an API token: the server takes both as `Token <key>`.
    async with FLPlatformAPI(args.server, token=args.token) as api:
        while True:
            training = await api.get_training(args.training)
            if (training["state"], training["phase"]) != (state, phase):
                state, phase = training["state"], training["phase"]
                print(
                    f"[{time.monotonic() - started:5.1f}s] state {state}, round {training['round']}, "
                    f"waiting for: {phase}",
                    flush=True,
                )
            # Metrics are reported per round ("step") by every participant on that round's global model.
            per_round: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            for metric in await api.get_metrics(training["model"]):
                if metric["value_float"] is not None:
                    per_round[metric["step"]][metric["key"]].append(metric["value_float"])
            complete = training["state"] in ("C", "E")
            for round_ in sorted(per_round):
                values = per_round[round_]
                reporters = len(values.get("accuracy", []))
                if (
                    round_ in printed
                    or not reporters
                    or (reporters < len(training["participants"]) and not complete)
                ):
                    continue
                printed.add(round_)
                mean = {key: sum(v) / len(v) for key, v in values.items()}
                print(
                    f"round {round_}: accuracy {mean['accuracy']:.3f}, loss {mean.get('loss', float('nan')):.3f} "
                    f"(mean over {reporters} participants' test digits)",
                    flush=True,
                )
            if complete:
                break
            if time.monotonic() - started > args.timeout:
                print(f"training still in state {state} after {args.timeout:.0f}s", file=sys.stderr)
                return 1
            await asyncio.sleep(1)
    if training["state"] == "E":
        print(f"training ended in error: {training['error_reason']}", file=sys.stderr)
        return 1
    print(
        f"training {args.training} completed {training['target_num_updates']} rounds "
        f"in {time.monotonic() - started:.0f}s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
