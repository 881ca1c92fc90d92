"""FedAvg throughput and memory: flplatform vs Flower 1.41, from wire bytes, against the memory ceiling.

One command (prints a table, asserts nothing about time)::

    .venv/bin/python bench/aggregation_bench.py            # ~5 minutes on a 2-core machine
    .venv/bin/python bench/aggregation_bench.py --quick    # small sizes, a smoke run (~1 minute)
    .venv/bin/python bench/aggregation_bench.py --cases resnet50 --no-decode   # re-run one case
    .venv/bin/python bench/aggregation_bench.py --inputs   # only the input-kinds section (first;
    # every input kind against a plain torch add_ loop and Flower: see bench/aggregation_inputs.py)

Flower is optional. ``flwr==1.41.0`` would change fastapi/starlette/uvicorn/rich/packaging of the main
virtual environment (``pip install --dry-run`` says so), so it lives in a separate, git-ignored one::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 flwr==1.41.0 safetensors psutil numpy
    .venv-bench/bin/pip install --no-deps -e .

The Flower contenders run with ``.venv-bench/bin/python`` when the current interpreter cannot import
``flwr``; without either, their rows say "not installed" and the rest still runs.

What is measured (every contender in a fresh subprocess, ``MALLOC_MMAP_THRESHOLD_`` set so freed
buffers leave the process and resident memory means something):

* ``ceiling``: memory read bandwidth, ``torch.sum`` over a 1 GiB float32 tensor (best of 5), once at the
  start; and inside every worker over the same 1 GiB right before each of its runs and after the last
  (best of 3 each; the highest of them is that row's "ceiling GB/s", which its "% ceiling" divides by).
  The machine is a shared VM: its read bandwidth moves between ≈ 15 and 28 GB/s within minutes, so
  each row is compared with the best the memory system gave during that row, interleaved with its
  runs. The "load" column is the 1-minute load average then (this bench itself adds ≈ 2). Re-run a
  case measured under high load with ``--cases``. (Before 2026-11-23 15:10 UTC the in-worker ceiling
  was the better of two best-of-5 sums over 256 MiB before and after the runs: shorter windows, and
  further in time from the runs.)
* ``flplatform stream``: ``get("fedavg")``, then for every client in order ``add(blob, n_samples)``,
  ``finish()``: uploads folded as they arrive. ``add`` takes the safetensors bytes themselves and views
  them zero-copy, one flat range per dtype (the header is checked once per round; the runs before
  2026-11-23 15:30 UTC passed ``decode_safetensors(blob)``, a state dict of per-tensor views, which
  costs ≈ 1.5 ms of Python per ResNet-50 update between decoding, checking and freeing 267 tensors).
  The wire bytes stay in memory (as received uploads do), so holding their views costs nothing and up to
  32 arriving updates fold per pass over the accumulator (2 when the caller lets go of the bytes).
* ``flplatform batch``: ``fedavg([(blob, n) ...])`` — all blobs at hand, 32 folded per pass over the
  accumulator.
* ``flwr arrayrecords``: Flower 1.41's message-API FedAvg core,
  ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` on ``RecordDict``s whose
  ``ArrayRecord`` holds the clients' ``Array``s (``.npy`` bytes, decoded inside, as on the server).
* ``flwr legacy``: ``flwr.server.strategy.aggregate.aggregate`` on ``parameters_to_ndarrays`` of
  each client's ``Parameters`` (what legacy ``FedAvg.aggregate_fit`` does).

GB/s counts update bytes (N × model bytes) per second of the whole call, decoding included (best of
5 runs; of 3, and 2 for Flower, on ResNet-50). "Peak extra RSS" is the process's peak resident set during a call
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the resident set before it,
where the wire bytes already live; the largest over the runs after the first (the first also pays
one-time costs: thread stacks, lazily initialised library state). Every
client's blob is distinct (ResNet-50: 50 × 102 MB = 5.1 GB resident): our kernel folds up to 32
updates per pass chunk by chunk, so a blob repeated within a pass would be read from cache the second
time and flatter the figure (the runs before 2026-11-23 15:00 UTC cycled 10 blobs, harmless at ≤ 8
per pass). The legacy Flower path (which materialises every decoded model and a weighted copy of
each) runs with N=20 there (~6 GB). The decode rows time one ≈100 MB update (ResNet-50 shapes) four ways.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aggregation_inputs import inputs_section, inputs_worker  # noqa: E402 (bench/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
MMAP_THRESHOLD = str(128 * 1024)

# ----------------------------------------------------------------------------------------------------
# model shapes


def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """torchvision ResNet-50 float32 tensors (parameters + BN running stats; no num_batches_tracked)."""
    shapes: list[tuple[str, tuple[int, ...]]] = []

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes.append((f"{prefix}.{name}", (c,)))

    shapes.append(("conv1.weight", (64, 3, 7, 7)))
    bn("bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=False), start=1):
        for block in range(blocks):
            p = f"layer{layer}.{block}"
            shapes.append((f"{p}.conv1.weight", (planes, inplanes, 1, 1)))
            bn(f"{p}.bn1", planes)
            shapes.append((f"{p}.conv2.weight", (planes, planes, 3, 3)))
            bn(f"{p}.bn2", planes)
            shapes.append((f"{p}.conv3.weight", (planes * 4, planes, 1, 1)))
            bn(f"{p}.bn3", planes * 4)
            if block == 0:
                shapes.append((f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1)))
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes.append(("fc.weight", (1000, 2048)))
    shapes.append(("fc.bias", (1000,)))
    return shapes


CASES: dict[str, dict[str, Any]] = {
    "10x1M": {"n": 20, "shapes": [(f"layer{i}.weight", (1000, 1000)) for i in range(10)], "distinct": 20},
    "100x10k": {"n": 100, "shapes": [(f"layer{i}.weight", (100, 100)) for i in range(100)], "distinct": 100},
    "resnet50": {"n": 50, "shapes": "resnet50", "distinct": 50, "legacy_n": 20},
}
QUICK_CASES: dict[str, dict[str, Any]] = {
    "10x1M": {"n": 4, "shapes": [(f"layer{i}.weight", (100, 1000)) for i in range(10)], "distinct": 4},
    "100x10k": {"n": 5, "shapes": [(f"layer{i}.weight", (10, 100)) for i in range(100)], "distinct": 5},
    "resnet50": {"n": 3, "shapes": "resnet50", "distinct": 2, "legacy_n": 2},
}


def case_shapes(spec: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return resnet50_shapes() if spec["shapes"] == "resnet50" else spec["shapes"]


# ----------------------------------------------------------------------------------------------------
# memory accounting (Linux)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------------------------------
# workers (run in a fresh process each)


def client_models(spec: dict[str, Any], count: int):
    """``count`` distinct float32 models (dicts of numpy arrays), cheap to generate."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in case_shapes(spec)}
    for i in range(count):
        yield {name: array + np.float32(0.01 * i) for name, array in base.items()}


def read_ceiling_gbs(nbytes: int = 1 << 30, reps: int = 3, tensor: Any = None) -> float:
    """Memory read bandwidth now (torch.sum over a tensor far larger than the caches, best of reps)."""
    import torch

    x = torch.ones(nbytes // 4) if tensor is None else tensor
    x.sum()
    best = min(_time(lambda: x.sum()) for _ in range(reps))
    return x.numel() * x.element_size() / best / 1e9


def timed(run, reps: int) -> dict[str, Any]:
    """Best time of ``reps`` runs; peak extra RSS of the runs after the first (the steady state: the
    first run also pays one-time costs such as thread stacks and lazily initialised library state).
    The read ceiling is measured right before every run and after the last, in the same process, so
    each row's "% ceiling" compares with what the memory system gave meanwhile (the machine is shared)."""
    import torch

    probe = torch.ones((1 << 30) // 4)  # allocated before the runs: not part of their extra RSS
    ceilings = []
    best, peaks = float("inf"), []
    exact = True
    for _ in range(reps):
        ceilings.append(read_ceiling_gbs(tensor=probe))
        gc.collect()
        before = rss_bytes()
        exact = reset_peak() and exact
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        peaks.append(peak_rss_bytes() - before)
        best = min(best, elapsed)
        del result
    steady = peaks[1:] or peaks
    return {
        "seconds": best,
        "peak_extra": max(steady),
        "first_peak_extra": peaks[0],
        "exact_peak": exact,
        "ceiling_gbs": max(*ceilings, read_ceiling_gbs(tensor=probe)),
        "load": os.getloadavg()[0],
    }


def worker(contender: str, case: str, quick: bool) -> dict[str, Any]:
    spec = (QUICK_CASES if quick else CASES)[case] if case else {}
    # More runs where a run is short (the best of few short runs is at the mercy of other load).
    reps = 1 if quick else ((2 if contender.startswith("flwr") else 3) if case == "resnet50" else 5)
    if contender == "ceiling":
        import torch

        x = torch.ones(1 << (20 if quick else 28))
        x.sum()
        best = min(_time(lambda: x.sum()) for _ in range(5))
        return {"seconds": best, "bytes": x.numel() * 4, "threads": torch.get_num_threads()}
    if contender == "decode":
        return decode_worker(spec)
    if contender == "inputs":
        return inputs_worker(case, quick, rounds=3 if quick else 7)
    n = spec.get("legacy_n", spec["n"]) if contender == "flwr_legacy" else spec["n"]
    distinct = min(n, spec["distinct"])
    weights = [100 + 7 * i for i in range(n)]
    model_bytes = sum(4 * _numel(shape) for _, shape in case_shapes(spec))
    out: dict[str, Any] = {"n": n, "model_bytes": model_bytes, "update_bytes": n * model_bytes}
    if contender.startswith("ours"):
        import torch

        from flplatform.aggregation import encode_safetensors, fedavg, get

        blobs = [
            encode_safetensors({k: torch.from_numpy(v) for k, v in m.items()})
            for m in client_models(spec, distinct)
        ]
        wire = [blobs[i % distinct] for i in range(n)]

        def stream():
            agg = get("fedavg")
            agg.begin(None)
            for blob, weight in zip(wire, weights, strict=False):
                agg.add(blob, weight)  # safetensors bytes, viewed zero-copy inside
            return agg.finish()

        def batch():
            return fedavg([(blob, weight) for blob, weight in zip(wire, weights, strict=False)])

        out.update(timed(stream if contender == "ours_stream" else batch, reps))
        out["threads"] = torch.get_num_threads()
        return out
    try:
        import numpy as np  # noqa: F401
        from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.server.strategy.aggregate import aggregate
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
    except ImportError as exc:
        return {"error": f"flwr not importable: {exc}"}
    import flwr

    out["flwr"] = flwr.__version__
    if contender == "flwr_arrayrecords":
        distinct_records = [
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in m.items()}),
                    "metrics": MetricRecord({"num-examples": 0}),
                }
            )
            for m in client_models(spec, distinct)
        ]
        records = []
        for i, weight in enumerate(weights):  # share the Array bytes, own the MetricRecord
            source = distinct_records[i % distinct]
            records.append(
                RecordDict({"arrays": source["arrays"], "metrics": MetricRecord({"num-examples": weight})})
            )
        out.update(timed(lambda: aggregate_arrayrecords(records, "num-examples"), reps))
    else:
        params = [ndarrays_to_parameters(list(m.values())) for m in client_models(spec, distinct)]
        wire = [params[i % distinct] for i in range(n)]
        out.update(
            timed(
                lambda: aggregate(
                    [(parameters_to_ndarrays(p), w) for p, w in zip(wire, weights, strict=False)]
                ),
                reps,
            )
        )
    return out


def decode_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from safetensors.torch import load as st_load

    from flplatform.aggregation import decode_safetensors, encode_safetensors

    model = next(client_models(spec, 1))
    state = {k: torch.from_numpy(v) for k, v in model.items()}
    nbytes = sum(t.numel() * 4 for t in state.values())
    blob = encode_safetensors(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    pickled = buffer.getvalue()
    rows = {
        "safetensors zero-copy (flplatform)": lambda: decode_safetensors(blob),
        "safetensors zero-copy + one read pass": lambda: [t.sum() for t in decode_safetensors(blob).values()],
        "safetensors.torch.load (copy)": lambda: st_load(blob),
        "torch.load(weights_only=True)": lambda: torch.load(io.BytesIO(pickled), weights_only=True),
    }
    try:
        from flwr.app import Array, ArrayRecord

        record = ArrayRecord({k: Array(v) for k, v in model.items()})
        rows["flwr Array.numpy() per tensor (.npy)"] = lambda: [a.numpy() for a in record.values()]
    except ImportError:
        pass
    results = {}
    for name, run in rows.items():
        run()
        results[name] = min(_time(run) for _ in range(5))
    return {"bytes": nbytes, "rows": results}


def _time(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


# ----------------------------------------------------------------------------------------------------
# orchestration


def flwr_python() -> str | None:
    candidates = [sys.executable, str(REPO / ".venv-bench" / "bin" / "python")]
    for python in candidates:
        if Path(python).exists():
            probe = subprocess.run([python, "-c", "import flwr, flplatform"], capture_output=True)
            if probe.returncode == 0:
                return python
    return None


def spawn(python: str, contender: str, case: str, quick: bool) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "PYTHONPATH": str(REPO / "src")}
    command = [python, __file__, "--worker", contender, "--case", case] + (["--quick"] if quick else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} logical CPUs, {memory:.0f} GiB RAM, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cases",
        default="",
        help=f"comma-separated subset of {','.join(CASES)} (re-run a case measured under load)",
    )
    parser.add_argument("--no-decode", action="store_true", help="skip the decode table")
    parser.add_argument("--inputs", action="store_true", help="only the input-kinds section")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.case, args.quick)))
        return
    chosen = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    import torch

    started = time.time()
    print(f"# aggregation bench, {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# load average at start: {load_average()}")
    ours_python = sys.executable
    theirs_python = flwr_python()
    print(f"# flwr: {'via ' + theirs_python if theirs_python else 'not installed (Flower rows skipped)'}")
    ceiling = spawn(ours_python, "ceiling", "", args.quick)
    ceiling_gbs = ceiling["bytes"] / ceiling["seconds"] / 1e9
    print(
        f"# memory read ceiling (torch.sum over {ceiling['bytes'] / 2**30:.2f} GiB): {ceiling_gbs:.1f} GB/s"
    )
    print("# '% ceiling' divides by the read ceiling (1 GiB torch.sum) measured inside the same worker")
    print("# before each of its runs and after the last (the highest); 'load': 1-minute load average.")
    print()
    inputs_section(spawn, ours_python, theirs_python, args.quick)
    if args.inputs:
        return
    header = (
        "case",
        "contender",
        "N",
        "model MB",
        "time s",
        "GB/s",
        "ceiling GB/s",
        "% ceiling",
        "× flwr AR",
        "× flwr legacy",
        "peak extra RSS MB",
        "× model",
        "load",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    cases = [c for c in (QUICK_CASES if args.quick else CASES) if not chosen or c in chosen]
    for case in cases:
        results = {}
        for contender in ("ours_stream", "ours_batch", "flwr_arrayrecords", "flwr_legacy"):
            python = ours_python if contender.startswith("ours") else theirs_python
            results[contender] = (
                spawn(python, contender, case, args.quick) if python else {"error": "flwr not installed"}
            )

        def rate(r: dict[str, Any]) -> float | None:
            return r["update_bytes"] / r["seconds"] / 1e9 if "seconds" in r else None

        for contender, r in results.items():
            label = {
                "ours_stream": "flplatform stream",
                "ours_batch": "flplatform batch",
                "flwr_arrayrecords": "flwr aggregate_arrayrecords",
                "flwr_legacy": "flwr legacy aggregate",
            }[contender]
            if "error" in r:
                print(f"| {case} | {label} | | | | {r['error']} |" + " |" * (len(header) - 6))
                continue
            gbs = rate(r)
            ratios = []
            for other in ("flwr_arrayrecords", "flwr_legacy"):
                theirs = rate(results[other])
                ratios.append(f"{gbs / theirs:.1f}" if theirs and contender.startswith("ours") else "")
            peak_mb = r["peak_extra"] / 1e6
            print(
                f"| {case} | {label} | {r['n']} | {r['model_bytes'] / 1e6:.1f} | {r['seconds']:.3f} | {gbs:.2f} | "
                f"{r['ceiling_gbs']:.1f} | {100 * gbs / r['ceiling_gbs']:.0f} % | {ratios[0]} | {ratios[1]} | "
                f"{peak_mb:.0f} | {r['peak_extra'] / r['model_bytes']:.2f} | {r['load']:.1f} |"
            )
    print()
    if args.no_decode:
        print(f"# load average at end: {load_average()}; wall time {time.time() - started:.0f} s")
        return
    decode = spawn(theirs_python or ours_python, "decode", "resnet50", args.quick)
    if "error" in decode:
        decode = spawn(ours_python, "decode", "resnet50", args.quick)
    if "rows" in decode:
        print(f"Decoding one {decode['bytes'] / 1e6:.0f} MB update (ResNet-50 shapes, best of 5):")
        print()
        print("| decoder | ms | GB/s |")
        print("|---|---|---|")
        for name, seconds in decode["rows"].items():
            print(f"| {name} | {1000 * seconds:.2f} | {decode['bytes'] / seconds / 1e9:.1f} |")
    else:
        print(f"decode: {decode.get('error')}")
    print()
    print(f"# load average at end: {load_average()}; wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
