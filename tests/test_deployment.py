"""The Dockerfile and compose.yaml, tested without a Docker daemon: the image's environment and
start command run as an unprivileged user in a read-only working directory and answer its
HEALTHCHECK; compose.yaml's services, commands and FLP_* variables are checked against the CLI and
the settings classes; the worker healthcheck sees a real worker's heartbeat."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(REPO / "Dockerfile"))


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [item["value"] for item in parser.structure if item["instruction"] == name]


def test_dockerfile_pins_installs_and_keeps_state_in_the_data_volume(dockerfile: DockerfileParser) -> None:
    assert dockerfile.baseimage == "python:3.11-slim"  # the Python the constraints are compiled for
    runs = instructions(dockerfile, "RUN")
    assert any("torch==2.13.0" in run and "whl/cpu" in run for run in runs), runs
    assert any(re.search(r"pip install -c constraints\.txt \.", run) for run in runs), runs
    assert any("constraints.txt" in copy for copy in instructions(dockerfile, "COPY"))
    assert instructions(dockerfile, "VOLUME") == ['["/data"]']
    envs = dockerfile.envs
    assert envs["FLP_DATABASE_URL"].startswith("sqlite+aiosqlite:////data/")
    assert envs["FLP_SECRET_FILE"].startswith("/data/")
    assert envs["FLP_BLOB_DIR"].startswith("/data/")  # model bytes, on PostgreSQL too
    [user] = instructions(dockerfile, "USER")
    assert user not in ("root", "0") and any("useradd" in run and user in run for run in runs)
    [healthcheck] = instructions(dockerfile, "HEALTHCHECK")
    assert "/health" in healthcheck and "flplatform.healthcheck" in healthcheck
    # Secrets and local state never travel into the build context.
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert {".env", ".flplatform-secret", "*.db", ".venv"} <= set(ignored)


def _as_unprivileged(command: list[str]) -> list[str]:
    """``command`` as nobody when the tests run as root (CI does); already unprivileged otherwise."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *command]


def _healthcheck_command(dockerfile: DockerfileParser) -> list[str]:
    [healthcheck] = instructions(dockerfile, "HEALTHCHECK")
    return json.loads(healthcheck.split("CMD", 1)[1].strip())


@pytest.mark.slow
def test_image_command_serves_as_an_unprivileged_user_from_a_read_only_directory(
    dockerfile: DockerfileParser,
) -> None:
    # Directories nobody can reach (pytest's tmp_path is private to root): /app read-only, /data its own.
    root = Path(tempfile.mkdtemp(prefix="flp-image-"))
    root.chmod(0o755)
    app, data = root / "app", root / "data"
    try:
        app.mkdir()
        shutil.copy(REPO / "alembic.ini", app)
        shutil.copytree(REPO / "migrations", app / "migrations")
        for path in [app, *app.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        data.mkdir()
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(data, nobody.pw_uid, nobody.pw_gid)
        port = free_port()
        # The image's environment, with its /data volume here, and flplatform from this environment.
        env = {k: v.replace("/data/", f"{data}/") for k, v in dockerfile.envs.items()}
        env.update(PATH=f"{VENV_BIN}:/usr/bin:/bin", HOME="/nonexistent", LANG="C.UTF-8")
        # What the image's comment promises is enough for a first administrator (no FLP_SECRET_KEY).
        env.update(
            FLP_ADMIN_USERNAME="admin",
            FLP_ADMIN_EMAIL="admin@example.org",
            FLP_ADMIN_PASSWORD="admin-secret-1",
            FLP_ARGON2_TIME_COST="1",
            FLP_ARGON2_MEMORY_COST_KIB="64",
        )
        reachable = subprocess.run(
            _as_unprivileged([sys.executable, "-c", "import flplatform.cli"]),
            cwd=app,
            env=env,
            capture_output=True,
            check=False,
        )
        if reachable.returncode != 0:
            pytest.skip(
                f"this checkout is not readable by an unprivileged user: {reachable.stderr.decode()[-300:]}"
            )

        command = json.loads(dockerfile.cmd)
        assert command[:2] == ["flplatform", "serve"] and command[command.index("--port") + 1] == "8000"
        command[command.index("--host") + 1] = "127.0.0.1"  # loopback here, 0.0.0.0 in the container
        command[command.index("--port") + 1] = str(port)
        health = [part.replace(":8000/", f":{port}/") for part in _healthcheck_command(dockerfile)]
        health[0] = sys.executable if health[0] == "python" else health[0]
        server = subprocess.Popen(
            _as_unprivileged(command),
            cwd=app,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while (
                subprocess.run(
                    _as_unprivileged(health), cwd=app, env=env, capture_output=True, check=False
                ).returncode
                != 0
            ):
                if server.poll() is not None:
                    pytest.fail(
                        f"the image's command exited {server.returncode}:\n"
                        f"{server.stdout.read().decode()[-3000:]}"
                    )  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "HEALTHCHECK never passed"
                time.sleep(0.5)
            login = httpx.post(
                f"http://127.0.0.1:{port}/api/auth/token/",
                data={"username": "admin", "password": "admin-secret-1"},
                timeout=30,
            )
            assert login.status_code == 200, login.text
            me = httpx.get(
                f"http://127.0.0.1:{port}/api/users/myself/",
                headers={"Authorization": f"Bearer {login.json()['access_token']}"},
                timeout=30,
            )
            assert me.json()["username"] == "admin"
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        # State went to the volume: the database and a secret only its owner may read.
        secret = data / Path(dockerfile.envs["FLP_SECRET_FILE"]).name
        assert (data / "flplatform.db").exists() and secret.exists()
        assert secret.stat().st_mode & 0o777 == 0o600
        if os.geteuid() == 0:
            assert secret.stat().st_uid == pwd.getpwnam("nobody").pw_uid
        assert sorted(p.name for p in app.iterdir()) == ["alembic.ini", "migrations"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_generated_secret_goes_to_flp_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flplatform.settings import Settings

    monkeypatch.delenv("FLP_SECRET_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    volume = tmp_path / "volume"
    volume.mkdir()
    monkeypatch.setenv("FLP_SECRET_FILE", str(volume / "secret"))
    settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{volume / 'db.sqlite'}")
    secret = settings.secret()
    assert (volume / "secret").read_text().strip() == secret and len(secret) >= 32
    assert (volume / "secret").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / ".flplatform-secret").exists()  # nothing in the working directory
    assert (
        Settings(_env_file=None, database_url=settings.database_url).secret() == secret
    )  # kept across restarts


# --------------------------------------------------------------------------- compose.yaml


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def _interpolated(value: str) -> str:
    """Compose's ``${VAR:?message}`` / ``${VAR}`` with a stand-in value, as `.env` would give."""
    return re.sub(r"\$\{(\w+)(:?[?-][^}]*)?\}", lambda m: f"stand-in-{m.group(1).lower()}", value)


def test_compose_runs_postgres_serve_and_worker_with_healthchecks_and_a_named_volume(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"db", "serve", "worker"}
    assert services["db"]["image"].startswith("postgres:")
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    volume_names = set(compose["volumes"])
    mounted = {mount.split(":", 1)[0] for mount in services["db"]["volumes"]}
    assert mounted & volume_names, "the database does not keep its data in a named volume"
    # serve and worker share one blob store: the same named volume on /data.
    data = [{m for m in services[name]["volumes"] if m.endswith(":/data")} for name in ("serve", "worker")]
    assert data[0] == data[1] and {m.split(":", 1)[0] for m in data[0]} <= volume_names
    for name in ("serve", "worker"):
        assert (
            services[name]["build"] == "."
            and services[name]["depends_on"]["db"]["condition"] == "service_healthy"
        )


def test_compose_commands_and_healthchecks_parse_with_the_real_parsers(compose: dict) -> None:
    from flplatform.cli import build_parser
    from flplatform.healthcheck import build_parser as healthcheck_parser

    services = compose["services"]
    serve = build_parser().parse_args(services["serve"]["command"][1:])
    worker = build_parser().parse_args(services["worker"]["command"][1:])
    assert services["serve"]["command"][0] == services["worker"]["command"][0] == "flplatform"
    assert (serve.command, worker.command) == ("serve", "worker")
    published = services["serve"]["ports"][0].rsplit(":", 1)[1]
    assert str(serve.port) == published
    for name in ("serve", "worker"):
        test = services[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "flplatform.healthcheck"], test
        check = healthcheck_parser().parse_args(test[4:])
        assert check.what == name
    assert f":{serve.port}/health" in services["serve"]["healthcheck"]["test"][-1]


def test_readme_deployment_line_writes_the_secrets_compose_requires(compose: dict, tmp_path: Path) -> None:
    """README's one-line deployment, up to `docker compose up` (no daemon here): the .env it writes
    holds exactly the variables compose.yaml refuses to start without, each a fresh random value."""
    from tests.test_readme import bash_blocks, section

    [line] = bash_blocks(section("Deployment in one line"))
    write_env, _, rest = line.strip().rpartition(" && ")
    assert rest == "docker compose up -d"
    envs = []
    for _ in range(2):
        subprocess.run(["bash", "-c", write_env], cwd=tmp_path, check=True)
        envs.append(dict(item.split("=", 1) for item in (tmp_path / ".env").read_text().split()))
    required = set(re.findall(r"\$\{(\w+):\?", (REPO / "compose.yaml").read_text()))
    assert set(envs[0]) == required == {"FLP_SECRET_KEY", "POSTGRES_PASSWORD"}
    assert all(len(value) >= 32 for value in envs[0].values())
    assert envs[0]["FLP_SECRET_KEY"] != envs[1]["FLP_SECRET_KEY"]
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()


def test_compose_flp_variables_are_settings_and_valid(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from flplatform.broker.config import BrokerConfig
    from flplatform.inference.config import InferenceSettings
    from flplatform.settings import Settings

    known = {f"FLP_{n.upper()}" for n in Settings.model_fields}
    known |= {f"FLP_INFERENCE_{n.upper()}" for n in InferenceSettings.model_fields}
    known |= {f"FLP_BROKER_{n.upper()}" for n in BrokerConfig.model_fields}
    for name in ("serve", "worker"):
        environment = {k: _interpolated(str(v)) for k, v in compose["services"][name]["environment"].items()}
        unknown = sorted(k for k in environment if k.startswith("FLP_") and k not in known)
        assert unknown == [], f"{name}: {unknown} are not settings (typo?)"
        for key in [k for k in os.environ if k.startswith("FLP_")]:
            monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)  # raises on a value of the wrong type
        assert settings.database_url.startswith("postgresql+asyncpg://") and "@db/" in settings.database_url
        assert settings.secret() == "stand-in-flp_secret_key"  # shared by serve and worker, never generated
    assert compose["services"]["serve"]["environment"]["FLP_INPROCESS_WORKER"] == "false"


# --------------------------------------------------------------------------- the worker healthcheck


@pytest.mark.slow
def test_worker_healthcheck_follows_a_real_workers_heartbeat(db_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLP_")}
    env.update(FLP_DATABASE_URL=db_url, FLP_SECRET_KEY="deployment-test-secret", FLP_WORK_LEASE_SECONDS="3")
    check_worker = [sys.executable, "-m", "flplatform.healthcheck", "worker"]

    def healthy() -> subprocess.CompletedProcess[str]:
        return subprocess.run(check_worker, env=env, capture_output=True, text=True, timeout=60, check=False)

    before = healthy()
    assert before.returncode == 1 and f"no worker of host {socket.gethostname()!r}" in before.stderr

    worker = subprocess.Popen(
        [str(VENV_BIN / "flplatform"), "worker", "--no-migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while (result := healthy()).returncode != 0:
            assert worker.poll() is None, worker.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.5)
        # Another host's worker does not make this one healthy.
        other = subprocess.run(
            [*check_worker, "--host", "some-other-host"], env=env, capture_output=True, text=True, check=False
        )
        assert other.returncode == 1
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    # Stopped: its row is marked not ready, so the check fails at once.
    assert healthy().returncode == 1


def test_serve_healthcheck_reports_an_unreachable_server() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flplatform.healthcheck", "serve", f"http://127.0.0.1:{free_port()}/health"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and "unhealthy" in result.stderr
