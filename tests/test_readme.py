"""README.md as a newcomer follows it: the quick-start and the broker quick-start run block by
block, in one shell, against a fresh ``flplatform serve`` started the way command 1 starts it;
and the README's promises that need no server (its size, its commands, its links, the pinned
installs, the configuration reference) hold."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from tests.conftest import BACKENDS, PostgresCluster, free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
VENV = Path(sys.prefix)  # the environment running the tests plays the README's .venv


def section(title: str, text: str | None = None) -> str:
    """The body of README's ``## title`` section, up to the next ``## ``."""
    text = README.read_text() if text is None else text
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def bash_blocks(body: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", body, re.DOTALL | re.MULTILINE)


# --------------------------------------------------------------------------- the quick-starts, run


def _checked_pip_install(line: str) -> str:
    """A README ``pip install -c constraints.txt -e '.[extra]'`` line, checked instead of run (the
    test environment was installed by command 2 and must not be changed while tests run): the
    extra exists and every one of its requirements is installed at a version the pin allows."""
    words = shlex.split(line)
    assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", line
    target = words[words.index("-e") + 1]
    extras = re.fullmatch(r"\.\[([\w,-]+)\]", target)
    assert extras, f"unexpected install target in {line!r}"
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = constraint_pins()
    for extra in extras.group(1).split(","):
        assert extra in optional, f"README installs the extra {extra!r}, which pyproject.toml lacks"
        for requirement in map(Requirement, optional[extra]):
            installed = metadata.version(requirement.name)
            assert requirement.specifier.contains(installed, prereleases=True), (requirement, installed)
            assert pins[normalise(requirement.name)] == installed, (requirement.name, installed)
    return ": checked by tests/test_readme.py: " + shlex.quote(line)


def quickstart_script(port: int) -> str:
    """The quick-start's and the broker quick-start's bash blocks as one script, on ``port``."""
    blocks = bash_blocks(section("Quick start: a federated training in five minutes"))
    blocks += bash_blocks(section("Broker quick-start"))
    assert len(blocks) >= 7, "the quick-starts lost their commands"
    lines = []
    for block in blocks:
        for line in block.splitlines():
            if line.startswith(".venv/bin/pip install"):
                line = _checked_pip_install(line)
            lines.append(line)
    script = "\n".join(lines).replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    assert "8000" not in script
    return "set -euo pipefail\n" + script + "\n"


@pytest.fixture(params=BACKENDS)
def newcomer_env(request: pytest.FixtureRequest, postgres_cluster: PostgresCluster | None) -> dict[str, str]:
    """The environment of a newcomer's terminal: no FLP_* set (the embedded SQLite default, its
    secret generated on first start), or a fresh PostgreSQL database with its secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLP_")}
    env["PYTHONUNBUFFERED"] = "1"
    if request.param == "postgresql":
        if postgres_cluster is None:
            pytest.skip("PostgreSQL not available")
        env["FLP_DATABASE_URL"] = postgres_cluster.create_database(f"flp_readme_{uuid.uuid4().hex[:8]}")
        env["FLP_SECRET_KEY"] = "readme-quickstart-secret"
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the process and everything it left in its session (background participants, backends)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.timeout(600)  # two trainings' worth of work on a busy 2-core machine stays well below
def test_quickstarts_reach_a_finished_training_an_uncertain_prediction_and_a_dasf_call(
    tmp_path: Path, newcomer_env: dict[str, str]
) -> None:
    assert (VENV / "pyvenv.cfg").exists() and (VENV / "bin" / "flplatform").exists(), (
        f"run the tests in the virtual environment of command 2 (not {VENV})"
    )
    # A checkout as the README assumes it: .venv and examples/ in the working directory.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(VENV)
    (checkout / "examples").symlink_to(REPO / "examples")
    (checkout / "constraints.txt").symlink_to(REPO / "constraints.txt")
    port = free_port()

    server_log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(  # command 1's last step, on a free port
        [".venv/bin/flplatform", "serve", "--port", str(port)],
        cwd=checkout,
        env=newcomer_env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    shell = None
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.3)

        (tmp_path / "quickstart.sh").write_text(quickstart_script(port))
        started = time.monotonic()
        shell = subprocess.Popen(
            ["bash", str(tmp_path / "quickstart.sh")],
            cwd=checkout,
            env=newcomer_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output = shell.communicate(timeout=420)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            _stop(shell)
            output = shell.communicate()[0].decode(errors="replace")
            pytest.fail(f"the quick-starts did not finish in 420 s:\n{output[-5000:]}")
        seconds = time.monotonic() - started
        print(f"quick-starts ran in {seconds:.0f} s")
        assert shell.returncode == 0, output[-5000:]
    finally:
        if shell is not None:
            _stop(shell)
        _stop(server)
        server_log.close()

    # The training finished its three rounds, both participants took part in each.
    assert re.search(r"^training [0-9a-f-]+ completed 3 rounds", output, re.MULTILINE), output[-3000:]
    for round_ in (1, 2, 3):
        assert re.search(
            rf"^round {round_}: accuracy 0\.\d+, loss \d+\.\d+ \(mean over 2 ", output, re.MULTILINE
        ), output
    for name in ("alice", "bob"):
        assert f"{name}: training finished" in output
        assert f"{name}: round 2: trained on" in output
    final = float(re.search(r"^round 3: accuracy (0\.\d+)", output, re.MULTILINE).group(1))
    assert final > 0.5, output

    # The prediction came with its uncertainty, from 20 MC-dropout passes over the 5 digits.
    answer = json.loads((checkout / "quickstart" / "inference.json").read_text())
    assert answer["uncertainty_method"] == "MC_DROPOUT" and answer["samples"] == 20 and answer["round"] == 3
    assert len(answer["prediction"]) == 5 and answer["dropout_layers"] == 1
    entropy = answer["uncertainty"]["predictive_entropy"]
    assert len(entropy) == 5 and all(value >= 0 for value in entropy)
    assert str(answer["prediction"]) in output and str(entropy) in output

    # The broker: the public topic's backend added, the private topic's backend said hello.
    assert re.search(r"^42$", output, re.MULTILINE), output[-3000:]
    assert re.search(r'^"Hello World!"$', output, re.MULTILINE), output[-3000:]


# --------------------------------------------------------------------------- promises without a server


def test_readme_is_an_onboarding_page() -> None:
    text = README.read_text()
    assert len(text.encode()) <= 15 * 1024, f"README.md has {len(text.encode())} bytes (at most 15 KiB)"
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings[:3] == [
        "Two commands on a fresh machine",
        "Quick start: a federated training in five minutes",
        "Broker quick-start",
    ], headings
    assert "```mermaid" in text and "](docs/img/demo-accuracy.png)" in text
    assert "flplatform.client" in text and "uncertainty_method=MC_DROPOUT" in text
    # The reference moved to docs/: the README links every page of it.
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name}" in text, (
            f"README does not link docs/{page.name}: add it to the feature map"
        )


def test_command_2_is_what_ci_runs_and_both_commands_use_the_constraints() -> None:
    command_1, command_2 = bash_blocks(section("Two commands on a fresh machine"))
    ci_lines = [
        line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")
    ]
    assert ci_lines == [command_2.strip()], ".ci/run must run exactly README's command 2"
    for command in (command_1, command_2):
        steps = [step.strip() for step in command.strip().split("&&")]
        assert steps[0] == "python3 -m venv .venv"
        # torch's CPU wheel first, then everything else pinned by constraints.txt.
        assert re.fullmatch(r"\.venv/bin/pip install (-q )?torch==2\.13\.0", steps[1]), steps[1]
        assert re.fullmatch(
            r"\.venv/bin/pip install (-q )?-c constraints\.txt -e (\.|'\.\[test\]')", steps[2]
        ), steps[2]
    assert command_1.strip().endswith("&& .venv/bin/flplatform serve")
    assert command_2.strip().endswith("&& bash scripts/test")  # the suite, part of it shuffled (scripts/test)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[normalise(name)] = version.strip()
    return pins


def test_constraints_pin_every_requirement_within_its_range_and_no_cuda() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = constraint_pins()
    requirements = list(project["dependencies"])
    for extra, listed in project["optional-dependencies"].items():
        if extra != "bench":  # Flower's benchmark environment is separate (docs/performance.md)
            requirements += listed
    for requirement in map(Requirement, requirements):
        name = normalise(requirement.name)
        assert name in pins, f"{requirement} has no pin in constraints.txt: run scripts/refresh-constraints"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside {requirement}: run scripts/refresh-constraints"
        )
    assert pins["torch"] == "2.13.0"
    cuda = sorted(name for name in pins if name.startswith(("nvidia-", "cuda-")) or name == "triton")
    assert cuda == [], f"constraints.txt lists CUDA packages {cuda}: the CPU wheel needs none"
    # The refresh command the header names exists.
    assert "#    scripts/refresh-constraints" in (REPO / "constraints.txt").read_text()
    assert os.access(REPO / "scripts" / "refresh-constraints", os.X_OK)


def test_installed_environment_matches_the_constraints() -> None:
    """What command 2 installed is what constraints.txt says (torch: its CPU build of 2.13.0)."""
    mismatched = {}
    for name, version in constraint_pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a package of a platform or extra this environment does not use
        if installed.split("+")[0] != version:
            mismatched[name] = (version, installed)
    assert mismatched == {}, (
        f"installed versions differ from constraints.txt (pinned, installed): {mismatched}"
    )


def test_every_local_link_in_readme_and_docs_resolves() -> None:
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)} → {target}")
    assert broken == [], broken


def test_configuration_reference_names_every_setting() -> None:
    from flplatform.broker.config import BrokerConfig
    from flplatform.inference.config import InferenceSettings
    from flplatform.settings import Settings

    reference = (DOCS / "configuration.md").read_text()
    missing = [
        f"{prefix}{name.upper()}"
        for cls, prefix in (
            (Settings, "FLP_"),
            (InferenceSettings, "FLP_INFERENCE_"),
            (BrokerConfig, "FLP_BROKER_"),
        )
        for name in cls.model_fields
        if f"`{prefix}{name.upper()}`" not in reference
    ]
    assert missing == [], f"docs/configuration.md does not document {missing}"
