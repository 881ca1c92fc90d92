"""``flplatform demo`` as a user runs it: a subprocess that must finish and show learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_and_accuracy_rises(tmp_path):
    results = tmp_path / "demo.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLP_")}
    done = subprocess.run(
        [sys.executable, "-m", "flplatform.cli", "demo", "--rounds", "3", "--clients", "3", "--json", str(results)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Global model on the held-out test set" in done.stdout
    assert "completed" in done.stdout
    report = json.loads(results.read_text())
    assert report["state"] == "C" and report["client_errors"] == []
    accuracy = [row["accuracy"] for row in report["rows"]]
    assert [row["round"] for row in report["rows"]] == [0, 1, 2, 3]
    # Rising: the last round is clearly better than the untrained model and than round 1.
    assert accuracy[-1] > accuracy[0] + 0.3
    assert accuracy[-1] > accuracy[1]
    assert report["rows"][-1]["loss"] < report["rows"][0]["loss"]
