"""A federated-learning participant built on ``flplatform.client`` (the SDK): it logs in, takes part
in one training and, every round, downloads the global model, trains it on its own digits,
uploads the update and reports the new global model's accuracy on its own test digits.

    .venv/bin/python examples/participant.py --server http://127.0.0.1:8000 \\
        --username alice --password alice-secret-1 --training $TRAINING --part 1 --of 2

It polls ``GET /api/trainings/{id}/`` for the work the training waits for, so it needs no open
port; start it before or after the training starts. Its data: scikit-learn's bundled 8×8 digits
without the 20 % held out for inference, split label-skewed (non-IID) into ``--of`` parts, of
which it takes part ``--part``. Replace ``train``/``test`` with your own data and recipe.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from flplatform.client import FLPlatformAPI, Participant, RoundRecord, TrainingRun, digits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server", default="http://127.0.0.1:8000", help="flplatform URL (default %(default)s)"
    )
    parser.add_argument("--username", required=True, help="a user the training lists as a client")
    parser.add_argument("--password", required=True)
    parser.add_argument("--training", required=True, help="training id")
    parser.add_argument(
        "--part", type=int, required=True, help="which part of the data this participant holds (1…N)"
    )
    parser.add_argument("--of", type=int, required=True, help="into how many parts the data is split (N)")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="data split and training seed (default %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    args = parser.parse_args()
    if not 1 <= args.part <= args.of:
        parser.error("--part must be between 1 and --of")
    return args


async def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    # Every participant computes the same split (same seed) and keeps only its own part.
    train_pool, _held_out = digits.train_test_split(digits.load_digits_tensors(), 0.2, args.seed)
    mine = digits.dirichlet_partition(train_pool, args.of, alpha=0.5, seed=args.seed)[args.part - 1]
    local_train, local_test = digits.train_test_split(mine, 0.2, args.seed + args.part)
    trainer = digits.LocalTrainer(
        local_train, local_test, epochs=args.epochs, seed=args.seed * 1000 + args.part
    )
    name = args.username

    def report(run: TrainingRun, record: RoundRecord) -> None:
        if record.kind == "train":
            print(
                f"{name}: round {record.round}: trained on {record.sample_size} digits "
                f"(loss {record.metrics['train_loss']:.3f}) and uploaded the update",
                flush=True,
            )
        elif record.kind == "test":
            print(
                f"{name}: round {record.round}: global model's accuracy on my {len(local_test)} test digits "
                f"{record.metrics['accuracy']:.3f}",
                flush=True,
            )

    print(
        f"{name}: {len(local_train)} training and {len(local_test)} test digits, "
        f"classes {sorted(set(local_train.y.tolist()))}",
        flush=True,
    )
    async with FLPlatformAPI(args.server, username=args.username, password=args.password) as api:
        participant = Participant(api, train=trainer.train, test=trainer.test, name=name, on_record=report)
        try:
            run = await participant.poll(args.training, interval=0.5, timeout=args.timeout)
        finally:
            await participant.aclose()
    for error in run.errors:
        print(f"{name}: error: {error}", file=sys.stderr)
    print(f"{name}: training {run.outcome}", flush=True)
    return 0 if run.outcome == "finished" and not run.errors else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
