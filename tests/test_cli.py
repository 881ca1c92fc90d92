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
    env = {**os.environ, "FLP_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db", "FLP_ADMIN_USERNAME": "root",
           "FLP_ADMIN_PASSWORD": "root-password", "FLP_ADMIN_EMAIL": "root@example.org"}
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    made = run_cli("createuser", "--username", "u1", "--email", "u1@example.org", "--password", "secret-pass", env=env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().rsplit(" ", 1)[-1]
    again = run_cli("createuser", "--username", "u1", "--password", "secret-pass", env=env)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = run_cli("createuser", "--username", "u2", "--password", "x", env=env)
    assert bad.returncode == 2

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flplatform.cli", "serve", "--port", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
