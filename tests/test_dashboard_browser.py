"""The dashboard at ``/ui/`` as a person sees it: real headless Chromium (``tests/browser.py``) with
no network but the server's loopback port. Log in with a password, read a training that ran three
rounds (three points on the accuracy plot), watch an upload arrive on a running training's
timeline (from the event stream, or from polling where the server has none), and visit every page.
Screenshots of the main pages are written under the test's temporary directory (``--basetemp``),
or to ``$FLP_SCREENSHOT_DIR`` when set."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import Page, chromium
from tests.training.conftest import as_safetensors, scripted_bytes, shifted, state_of, tiny_net
from tests.training.live import live_server, make_users

pytestmark = pytest.mark.slow


def _upload_model(http: httpx.Client, token: str, name: str) -> tuple[str, bytes]:
    data = scripted_bytes(tiny_net())
    r = http.post(
        "/api/models/",
        headers={"Authorization": f"Token {token}"},
        data={"name": name, "description": "dashboard test", "type": "GLOBAL"},
        files={"model_file": ("m.pt", data)},
    )
    assert r.status_code == 201, r.text
    return r.json()["model_id"], data


def _training(http: httpx.Client, token: str, model_id: str, clients: list[str], rounds: int) -> str:
    r = http.post(
        "/api/trainings/",
        headers={"Authorization": f"Token {token}"},
        json={
            "model_id": model_id,
            "target_num_updates": rounds,
            "metric_names": ["accuracy"],
            "aggregation_method": "FedAvg",
            "clients": clients,
        },
    )
    assert r.status_code == 201, r.text
    training_id = r.json()["training_id"]
    r = http.post(f"/api/trainings/{training_id}/start/", headers={"Authorization": f"Token {token}"})
    assert r.status_code == 202, r.text
    return training_id


def _wait(http: httpx.Client, token: str, training_id: str, cond: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/api/trainings/{training_id}/", headers={"Authorization": f"Token {token}"}).json()
        if cond(body):
            return body
        assert time.monotonic() < deadline, f"training never reached the condition: {body}"
        time.sleep(0.05)


def _update(http: httpx.Client, token: str, model_id: str, template: bytes, round_: int, size: int) -> None:
    state = shifted(state_of(template), 0.01 * (round_ + 1))
    r = http.post(
        f"/api/models/{model_id}/",
        headers={"Authorization": f"Token {token}"},
        data={
            "round": str(round_),
            "sample_size": str(size),
            "metric_names": ["loss"],
            "metric_values": [str(round(1.2 / (round_ + 1) + 0.01 * size, 3))],
        },
        files={"model_file": ("u.pt", as_safetensors(state))},
    )
    assert r.status_code == 201, r.text


def _run_rounds(
    http: httpx.Client, actor: str, clients: list[str], model_id: str, template: bytes, n: int
) -> str:
    training_id = _training(http, actor, model_id, [c[0] for c in clients], n)
    for round_ in range(n):
        for i, (_, token) in enumerate(clients):
            _update(http, token, model_id, template, round_, 10 * (i + 1))
        _wait(http, actor, training_id, lambda b: b["phase"] == "test" or b["state"] == "C")
        for i, (_, token) in enumerate(clients):
            r = http.post(
                f"/api/models/{model_id}/metrics/",
                headers={"Authorization": f"Token {token}"},
                data={"metric_names": ["accuracy"], "metric_values": [str(0.5 + 0.1 * round_ + 0.05 * i)]},
            )
            assert r.status_code == 201, r.text
        _wait(
            http,
            actor,
            training_id,
            lambda b, r=round_: b["state"] == "C" or (b["phase"] == "update" and b["round"] == r + 1),
        )
    _wait(http, actor, training_id, lambda b: b["state"] == "C")
    return training_id


def _shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("FLP_SCREENSHOT_DIR") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


def _full_page(page: Page, path: Path) -> None:
    """A screenshot of the whole page, not just the window."""
    size = page.send("Page.getLayoutMetrics")["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 2400), "scale": 1}
    data = page.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(data["data"]))


def _key(page: Page, key: str, code: int, text: str = "") -> None:
    for kind in ("keyDown", "keyUp"):
        event: dict[str, Any] = {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code}
        if text and kind == "keyDown":
            event["text"] = text
        page.send("Input.dispatchKeyEvent", event)


def _go(page: Page, hash_: str, heading: str) -> None:
    page.evaluate(f"location.hash = {hash_!r}")
    page.wait_for(
        f"document.querySelector('main h1')?.textContent.includes({heading!r}) && "
        "!document.querySelector('main[aria-busy]')",
        what=f"the page {hash_}",
    )


def test_dashboard_login_plot_live_update_and_pages(settings, tmp_path) -> None:
    users = make_users(
        settings.database_url,
        [
            {"username": "ada", "actor": True},
            {"username": "clinic-a", "client": True},
            {"username": "clinic-b", "client": True},
            {"username": "eve", "actor": True},
        ],
    )
    (_, actor), c1, c2, (_, eve) = users
    shots = _shots(tmp_path)
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
        model_id, template = _upload_model(http, actor, "digits-cnn")
        done = _run_rounds(http, actor, [c1, c2], model_id, template, 3)
        live_model, live_template = _upload_model(http, actor, "live-net")
        running = _training(http, actor, live_model, [c1[0], c2[0]], 2)
        hidden_model, _ = _upload_model(http, eve, "eves-secret-model")
        hidden = _training(http, eve, hidden_model, [c1[0]], 1)

        with chromium(width=1366, height=900) as page:
            page.navigate(f"{base}/ui/")
            page.wait_for("!!document.querySelector('#username')", what="the log-in form")
            page.type_into("#username", "ada")
            page.type_into("#password", "password-123")
            page.click("#login-form button[type=submit]")
            page.wait_for(
                "document.querySelectorAll('main table tbody tr').length === 2",
                what="the two trainings ada runs",
            )
            listing = page.evaluate("document.querySelector('main').innerText")
            assert "digits-cnn" in listing and "live-net" in listing
            assert "eves-secret-model" not in listing and hidden[:8] not in listing  # not ada's to read
            assert "round 3 of 3" in listing and "round 1 of 2" in listing
            assert "FedAvg" in listing
            page.screenshot(str(shots / "dashboard-trainings.png"))

            # the training that ran three rounds: three aggregate points on the accuracy plot
            _go(page, f"#/trainings/{done}", "digits-cnn")
            figure = 'document.querySelector(\'figure[data-metric="accuracy"][data-source="test"]\')'
            page.wait_for(f"{figure}?.dataset.drawn === 'true'", what="the accuracy plot")
            assert page.evaluate(f"{figure}.dataset.aggregatePoints") == "3"
            assert page.evaluate(f"{figure}.dataset.participantPoints") == "6"
            assert page.evaluate(f"!!{figure}.querySelector('canvas')")
            table_text = page.evaluate(f"{figure}.querySelector('details table').textContent")
            assert "0.525" in table_text and "0.625" in table_text  # (0.5 + 0.55) / 2, (0.6 + 0.65) / 2
            history = page.evaluate("[...document.querySelectorAll('main button')].map(b => b.textContent)")
            assert {"Download round 0", "Download round 3"} <= set(history)
            streams = "/api/trainings/{training_id}/events/" in http.get("/openapi.json").json()["paths"]
            if streams:  # the timeline replays the training's history from the event stream
                page.wait_for(
                    "document.querySelectorAll('#timeline li[data-kind=\"aggregation_finished\"]').length === 3",
                    what="three aggregations on the replayed timeline",
                )
            _full_page(page, shots / "dashboard-training.png")

            # a running training: an upload shows up on the timeline and as ✓
            _go(page, f"#/trainings/{running}", "live-net")
            page.wait_for(
                "['stream', 'poll'].includes(document.querySelector('#live-mode')?.dataset.mode)",
                what="live updates to start",
            )
            mode = page.evaluate("document.querySelector('#live-mode').dataset.mode")
            assert mode == ("stream" if streams else "poll")  # polling only where the server has no stream
            before = page.evaluate(
                "document.querySelectorAll('#timeline li[data-kind=\"update_received\"]').length"
            )
            _update(http, c1[1], live_model, live_template, 0, 25)
            page.wait_for(
                f"document.querySelectorAll('#timeline li[data-kind=\"update_received\"]').length > {before}",
                timeout=30,
                what=f"the upload on the timeline ({mode})",
            )
            page.wait_for(
                f"document.querySelector('[data-participant=\"{c1[0]}\"] .ok') !== null",
                what="clinic-a's ✓ for this round",
            )
            assert page.evaluate(f"document.querySelector('[data-participant=\"{c2[0]}\"] .no') !== null")
            page.wait_for("document.querySelector('#fact-arrived')?.textContent === '1 of 2'", what="1 of 2")
            page.screenshot(str(shots / "dashboard-live.png"))

            _go(page, "#/models", "Models")
            models_text = page.evaluate("document.querySelector('main').innerText")
            assert "digits-cnn" in models_text and "eves-secret-model" not in models_text
            page.screenshot(str(shots / "dashboard-models.png"))
            _go(page, "#/topics", "Broker topics")
            _go(page, "#/jobs", "Inference jobs")

            # a participant sees the trainings it takes part in, eve's included, and no longer ada's token
            page.click("#logout")
            page.wait_for("!!document.querySelector('#username')", what="the log-in form again")
            assert page.evaluate("[...document.querySelectorAll('input')].every(i => i.labels.length === 1)")
            page.type_into("#username", "clinic-a")
            page.type_into("#password", "password-123")
            page.click("#login-form button[type=submit]")
            page.wait_for("!document.querySelector('#who').hidden", what="clinic-a signed in")
            _go(page, "#/trainings", "Trainings")
            page.wait_for(
                "document.querySelectorAll('main table tbody tr').length === 3",
                what="the three trainings clinic-a takes part in",
            )
            assert "eves-secret-model" in page.evaluate("document.querySelector('main').innerText")

            # keyboard: the first Tab stop is the skip link, Enter leads into the content (the
            # route stays), the next Tab reaches the first training's link
            page.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
            # start from the top of the document, as after loading the page
            page.evaluate(
                "document.body.tabIndex = -1; document.body.focus(); document.body.removeAttribute('tabindex')"
            )
            _key(page, "Tab", 9)
            assert page.evaluate("document.activeElement.className") == "skip"
            _key(page, "Enter", 13, "\r")
            assert page.evaluate("document.activeElement.id") == "main"
            assert page.evaluate("location.hash") == "#/trainings"
            _key(page, "Tab", 9)
            assert page.evaluate("document.activeElement.closest('table') !== null")
            # labelled fields, captioned tables, a language
            assert page.evaluate("document.documentElement.lang") == "en"
            assert page.evaluate("[...document.querySelectorAll('main table')].every(t => t.caption)")
            page.pump(0.3)
            assert page.outside(base) == [], "the dashboard fetched from outside the server"
            assert page.blocked_by_page == [], "the Content-Security-Policy refused something the page needs"
            assert page.console_errors == [], "JavaScript errors"
            assert [f for f in page.failed if "/events/" not in f[0]] == [], "requests failed"
