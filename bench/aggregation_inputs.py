"""The input-kinds section of ``bench/aggregation_bench.py``: ``fedavg`` on every input a caller would
naturally pass, against a plain torch ``add_`` loop over the same tensors, in the same process.

Contenders (one worker process per case, every contender timed once per round, rounds interleaved so
each round compares them under the same load):

* ``plain add_ (state dicts)``: ``acc = {k: v * w}`` from the first client, then ``acc[k].add_(v,
  alpha=w)`` for every other client's tensor, then ``div_`` by the total weight: what a user writes
  without a library. No validation, no finiteness check.
* ``plain add_ (bytes views)``: the same loop over ``decode_safetensors(blob)`` of each client's
  safetensors bytes (zero-copy views: the same bytes our bytes rows read, nothing copied).
* ``fedavg(list of state dicts)``: ``fedavg([(state_dict, w), ...])``, separate tensors per client.
* ``fedavg(list of bytes)``: ``fedavg([(blob, w), ...])``.
* ``fedavg(generator of bytes)``: ``fedavg((blob, w) for ...)``; the blobs stay in a list, so (as for
  the server's resident uploads) their views may wait to fold many per pass.
* ``fedavg(generator of state dicts)``: each pair is folded before the next is drawn (the generator
  may refill its tensors in place), with whole-tensor kernels in the caller's thread as the plain
  loop does (a model of small tensors, like 100 × 10k: one ``torch._foreach_add_`` per update).

"wins" counts the rounds in which the row was faster than the plain loop over the same input (state
dicts for the state-dict rows, bytes views for the bytes rows). Each round runs the contenders in a
fresh (seeded) random order: whoever runs right after a contender over the same tensors finds some
of them in cache. ``FLP_BENCH_EVICT=1`` writes :data:`EVICT_BYTES` before every contender instead, so
each starts with cold caches.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from typing import Any

INPUT_CASES: dict[str, dict[str, int]] = {
    "10x1M": {"n": 20, "tensors": 10, "numel": 1_000_000},
    "100x10k": {"n": 100, "tensors": 100, "numel": 10_000},
}
QUICK_INPUT_CASES: dict[str, dict[str, int]] = {
    "10x1M": {"n": 4, "tensors": 10, "numel": 100_000},
    "100x10k": {"n": 5, "tensors": 100, "numel": 1_000},
}
#: Bytes written between contenders with FLP_BENCH_EVICT=1: more than this VM's L3 (480 MiB).
EVICT_BYTES = 768 << 20
LABELS = {
    "plain_sd": "plain add_ (state dicts)",
    "plain_bytes": "plain add_ (bytes views)",
    "ours_sd_list": "fedavg(list of state dicts)",
    "ours_bytes_list": "fedavg(list of bytes)",
    "ours_bytes_gen": "fedavg(generator of bytes)",
    "ours_sd_gen": "fedavg(generator of state dicts)",
}
BASELINE = {
    "ours_sd_list": "plain_sd",
    "ours_sd_gen": "plain_sd",
    "ours_bytes_list": "plain_bytes",
    "ours_bytes_gen": "plain_bytes",
}


def plain_fedavg(pairs: Any) -> dict[str, Any]:
    """FedAvg as a plain torch loop: first client scaled, the others ``add_``-ed, then divided."""
    acc: dict[str, Any] | None = None
    total = 0.0
    for state, weight in pairs:
        if acc is None:
            acc = {name: tensor * weight for name, tensor in state.items()}
        else:
            for name, tensor in state.items():
                acc[name].add_(tensor, alpha=weight)
        total += weight
    assert acc is not None
    for tensor in acc.values():
        tensor.div_(total)
    return acc


def inputs_worker(case: str, quick: bool, rounds: int) -> dict[str, Any]:
    import torch

    from flplatform.aggregation import decode_safetensors, encode_safetensors, fedavg

    spec = (QUICK_INPUT_CASES if quick else INPUT_CASES)[case]
    n, count, numel = spec["n"], spec["tensors"], spec["numel"]
    side = int(numel**0.5)
    shape = (side, numel // side)
    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(shape, generator=generator) for i in range(count)}
    # every client's tensors are distinct and separately allocated (as a training loop leaves them)
    states = [{name: tensor + 0.01 * c for name, tensor in base.items()} for c in range(n)]
    blobs = [encode_safetensors(state) for state in states]
    weights = [100 + 7 * i for i in range(n)]
    runs = {
        "plain_sd": lambda: plain_fedavg(zip(states, weights, strict=True)),
        "plain_bytes": lambda: plain_fedavg(
            (decode_safetensors(blob), w) for blob, w in zip(blobs, weights, strict=True)
        ),
        "ours_sd_list": lambda: fedavg(list(zip(states, weights, strict=True))),
        "ours_bytes_list": lambda: fedavg(list(zip(blobs, weights, strict=True))),
        "ours_bytes_gen": lambda: fedavg((blob, w) for blob, w in zip(blobs, weights, strict=True)),
        "ours_sd_gen": lambda: fedavg((state, w) for state, w in zip(states, weights, strict=True)),
    }
    reference = plain_fedavg(zip(states, weights, strict=True))
    for name, run in runs.items():  # warm-up, and every contender computes the same mean
        result = run()
        for key, tensor in reference.items():
            assert torch.allclose(result[key], tensor, rtol=1e-5, atol=1e-6), (name, key)
        del result
    times: dict[str, list[float]] = {name: [] for name in runs}
    loads = [os.getloadavg()[0]]
    names = list(runs)
    order = random.Random(len(names) * rounds)
    evict = torch.empty(EVICT_BYTES // 4) if os.environ.get("FLP_BENCH_EVICT") else None
    for _ in range(rounds):
        # A fresh random order each round (seeded: the same every run). In a fixed order (or one
        # turned by a step, which keeps who follows whom) the plain loop always ran right after
        # ``fedavg`` over the same state dicts, which left much of their 400 MB in this VM's large
        # L3 (measured: plain 68.6 ms per call there, 71-72 ms behind the bytes contenders).
        order.shuffle(names)
        for name in names:
            run = runs[name]
            if evict is not None:
                evict.fill_(1.0)  # every contender starts with cold caches (FLP_BENCH_EVICT=1)
            gc.collect()
            start = time.perf_counter()
            result = run()
            times[name].append(time.perf_counter() - start)
            del result
        loads.append(os.getloadavg()[0])
    return {
        "n": n,
        "model_bytes": count * numel * 4,
        "times": times,
        "load": [min(loads), max(loads)],
        "threads": torch.get_num_threads(),
    }


def print_inputs_table(case: str, result: dict[str, Any], flwr: dict[str, Any] | None) -> None:
    """One Markdown row per contender: best and median GB/s, wins against plain, × Flower."""
    if "error" in result:
        print(f"| {case} | error: {result['error']} | | | | | | |")
        return
    update_bytes = result["n"] * result["model_bytes"]
    flwr_gbs = update_bytes / flwr["seconds"] / 1e9 if flwr and "seconds" in flwr else None
    times = result["times"]
    rounds = len(times["plain_sd"])
    for name, label in LABELS.items():
        series = times[name]
        best = update_bytes / min(series) / 1e9
        median = update_bytes / statistics.median(series) / 1e9
        baseline = BASELINE.get(name)
        wins = ""
        if baseline:
            won = sum(ours < plain for ours, plain in zip(series, times[baseline], strict=True))
            wins = f"{won}/{rounds}"
        ratio = f"{best / flwr_gbs:.1f}" if flwr_gbs and name.startswith("ours") else ""
        low, high = result["load"]
        print(
            f"| {case} | {label} | {result['n']} | {best:.2f} | {median:.2f} | {wins} | {ratio} | "
            f"{low:.1f}–{high:.1f} |"
        )
    if flwr_gbs:
        print(
            f"| {case} | flwr `aggregate_arrayrecords` (best of its runs) | {result['n']} | {flwr_gbs:.2f} | | | | |"
        )


INPUTS_HEADER = (
    "| case | contender | N | best GB/s | median GB/s | wins vs plain (rounds) | × flwr AR (best) | load |\n"
    "|---|---|---:|---:|---:|---:|---:|---|"
)


def inputs_section(spawn: Any, ours_python: str, theirs_python: str | None, quick: bool) -> None:
    """Run and print the section: one worker per case (ours and plain), Flower's message API aside."""
    print("Every input kind against a plain torch `add_` loop over the same tensors (same process,")
    print("rounds interleaved; GB/s = N × model bytes per second of the whole call):")
    print()
    print(INPUTS_HEADER)
    for case in QUICK_INPUT_CASES if quick else INPUT_CASES:
        result = spawn(ours_python, "inputs", case, quick)
        flwr = spawn(theirs_python, "flwr_arrayrecords", case, quick) if theirs_python else None
        print_inputs_table(case, result, flwr)
    print()
