"""``flplatform demo --plot PATH``: the global model's held-out accuracy and loss per round as a
PNG, drawn with matplotlib (the optional extra ``flplatform[plot]``) on its file-only Agg
backend, so it works on a server without a display."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def missing_matplotlib() -> str | None:
    """Why ``--plot`` cannot work here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "needs matplotlib: pip install 'flplatform[plot]'"
    return None


def plot_rounds(rows: Sequence[Any], path: Path, *, title: str, held_out: int) -> None:
    """``rows``: the demo's RoundRow objects with an accuracy (round 0 is the untrained model)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in rows]
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, layout="constrained")
    try:
        accuracy_axes.plot(rounds, [r.accuracy for r in rows], marker="o", color="tab:blue")
        accuracy_axes.set_ylim(0, 1)
        accuracy_axes.set_ylabel(f"accuracy (held-out set, {held_out} digits)")
        loss_axes.plot(
            rounds, [r.loss for r in rows], marker="o", color="tab:red", label="global model, held-out"
        )
        train = [
            (r.round, r.train_loss_mean) for r in rows if getattr(r, "train_loss_mean", None) is not None
        ]
        if train:
            loss_axes.plot(
                *zip(*train, strict=True),
                marker=".",
                linestyle="--",
                color="tab:orange",
                label="clients' local training",
            )
            loss_axes.legend(frameon=False)
        loss_axes.set_ylabel("cross-entropy loss")
        for axes in (accuracy_axes, loss_axes):
            axes.set_xlabel("round (0 = untrained)")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.grid(alpha=0.3)
        figure.suptitle(title)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(
            path, format="png", metadata={"Software": None}
        )  # no version stamp: same run, same file
    finally:
        plt.close(figure)
