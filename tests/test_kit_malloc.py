"""The server's glibc malloc tuning (flplatform.kit.malloc): applied once per process, glibc's own
environment variables win; off unless FLP_MALLOC_TUNE=1. Run in subprocesses (a fresh allocator each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = "import json; from flplatform.kit import malloc; print(json.dumps([malloc.tune(), malloc.tune()]))"


def _tune(**env: str) -> list[dict[str, int]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_caps_arenas_and_fixes_the_mmap_threshold_once() -> None:
    from flplatform.kit import malloc

    if malloc._libc() is None:
        pytest.skip("not glibc")
    assert _tune() == [{}, {}]  # opt-in
    first, second = _tune(FLP_MALLOC_TUNE="1")
    assert first == {"arena_max": malloc.ARENA_MAX, "mmap_threshold": malloc.MMAP_THRESHOLD}
    assert second == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_environment_variables_win() -> None:
    from flplatform.kit import malloc

    if malloc._libc() is None:
        pytest.skip("not glibc")
    first, _ = _tune(FLP_MALLOC_TUNE="1", MALLOC_ARENA_MAX="4")
    assert first == {"mmap_threshold": malloc.MMAP_THRESHOLD}
    first, _ = _tune(FLP_MALLOC_TUNE="1", MALLOC_MMAP_THRESHOLD_="131072")
    assert first == {"arena_max": malloc.ARENA_MAX}
    assert _tune(FLP_MALLOC_TUNE="0") == [{}, {}]
    assert malloc.trim() in (True, False)
