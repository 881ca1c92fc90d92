"""The command-line contract: migrate, createuser, and the admin bootstrap from FLP_ADMIN_*."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from tests.conftest import free_port, wait_for_port


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flplatform.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_migrate_createuser_and_serve(tmp_path):
    env = {
        **os.environ,
        "FLP_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "FLP_ADMIN_USERNAME": "root",
        "FLP_ADMIN_PASSWORD": "root-password",
        "FLP_ADMIN_EMAIL": "root@example.org",
    }
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    made = run_cli(
        "createuser", "--username", "u1", "--email", "u1@example.org", "--password", "secret-pass", env=env
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().rsplit(" ", 1)[-1]
    again = run_cli("createuser", "--username", "u1", "--password", "secret-pass", env=env)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = run_cli("createuser", "--username", "u2", "--password", "x", env=env)
    assert bad.returncode == 2

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flplatform.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        base = f"http://127.0.0.1:{port}"
        me = httpx.get(f"{base}/api/users/myself/", headers={"Authorization": f"Token {token}"})
        assert me.status_code == 200 and me.json()["username"] == "u1"
        root = httpx.get(f"{base}/api/users/myself/", auth=("root", "root-password"))
        assert root.status_code == 200 and root.json()["is_superuser"] is True
        assert httpx.get(f"{base}/docs").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


# --------------------------------------------------------------------------- help, version, start-up log


def _help(capsys, *argv: str) -> str:
    import pytest

    from flplatform.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*argv, "--help"] if argv != ("--version",) else list(argv))
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    from flplatform import __version__

    assert _help(capsys, "--version").strip() == f"flplatform {__version__}"


def test_every_option_has_help_and_serve_shows_defaults_and_variables(capsys):
    import argparse

    from flplatform.cli import build_parser
    from flplatform.settings import Settings

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, (
                f"flplatform {name} {'/'.join(action.option_strings) or action.dest} has no help"
            )

    serve = _help(capsys, "serve")
    assert "--host HOST" in serve and "(default: 127.0.0.1)" in serve
    assert "--port PORT" in serve and "(default: 8000)" in serve
    for field in Settings.model_fields:  # every server variable, with its default
        assert f"FLP_{field.upper()} (default: " in serve
    assert "FLP_BROKER_STORE_MESSAGES" in serve and "FLP_INFERENCE_MAX_BATCH" in serve
    assert "FLP_DATABASE_URL" in _help(capsys, "migrate")
    create = _help(capsys, "createuser")
    assert "createuser --superuser" in create and "FLP_ADMIN_USERNAME" in create


def test_worker_help_lists_the_job_kinds_and_refuses_unknown_ones(capsys, tmp_path):
    from flplatform.jobs import install
    from flplatform.workqueue.registry import registered_kinds

    text = " ".join(_help(capsys, "worker").split())
    install()
    assert registered_kinds()
    for kind in registered_kinds():
        assert kind in text
    assert "FLP_WORKER_CONCURRENCY" in text
    env = {**os.environ, "FLP_DATABASE_URL": f"sqlite:///{tmp_path}/w.db"}
    refused = run_cli("worker", "--kinds", "training.aggregate,no-such-kind", env=env)
    assert (
        refused.returncode == 2
        and "no-such-kind" in refused.stderr
        and "training.aggregate" in refused.stderr
    )


def test_serve_logs_docs_url_masked_database_head_and_first_user_command(db_url, tmp_path):
    from sqlalchemy.engine import make_url

    from flplatform.migrate import head_revision
    from flplatform.onboarding import CREATE_SUPERUSER_COMMAND

    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":  # the test cluster trusts loopback: any password works
        url = url.set(password="s3cret-pw")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLP_ADMIN")}
    env["FLP_DATABASE_URL"] = url.render_as_string(hide_password=False)
    port = free_port()
    log_file = tmp_path / "serve.log"
    with log_file.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "flplatform.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port)
            assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        finally:
            server.terminate()
            server.wait(timeout=30)
    out = log_file.read_text()
    assert f"API docs at http://127.0.0.1:{port}/docs" in out
    assert f"database {url.render_as_string(hide_password=True)} migrated to head {head_revision()}" in out
    assert "s3cret-pw" not in out
    assert CREATE_SUPERUSER_COMMAND in out
