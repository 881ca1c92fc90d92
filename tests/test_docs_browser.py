"""``/docs`` and ``/redoc`` as a person sees them: real headless Chromium with no network but the
server's loopback port. The pages must render from the package's own assets (no CDN), Swagger
UI's Authorize must log in with the OAuth2 password flow, and "Try it out" must work."""

from __future__ import annotations

import pytest

from flplatform.app import TAGS
from tests.browser import Page, chromium
from tests.training.live import live_server, make_users

pytestmark = pytest.mark.slow

# Swagger UI shows the sections in the app's workflow order (flplatform.app.TAGS), every one of them.
TAG_ORDER = [tag["name"] for tag in TAGS]


def assert_stayed_local(page: Page, base_url: str) -> None:
    assert page.outside(base_url) == [], "the page fetched from outside the server"
    assert page.failed == [], "requests failed"
    assert page.console_errors == [], "JavaScript errors"


def test_swagger_ui_and_redoc_render_offline(settings):
    with live_server(settings) as base, chromium() as page:
        page.navigate(f"{base}/docs")
        operations = page.wait_for(
            "document.querySelectorAll('.opblock').length >= 100 && document.querySelectorAll('.opblock').length",
            timeout=60,
            what="Swagger UI's operation list",
        )
        assert operations >= 100
        assert page.evaluate("document.querySelector('button.authorize')?.textContent.trim()") == "Authorize"
        tags = page.evaluate(
            "[...document.querySelectorAll('.opblock-tag-section h3')].map(e => e.dataset.tag)"
        )
        assert tags == TAG_ORDER
        page.pump(0.5)
        assert any(u.endswith("/static/docs/swagger-ui/swagger-ui-bundle.js") for u in page.requests)
        assert_stayed_local(page, base)

        # No user exists yet: Authorize's "Auth Error" says how to create the first one.
        page.click("button.authorize")
        page.wait_for("!!document.querySelector('#oauth_username')", what="the Authorize dialog")
        page.type_into("#oauth_username", "admin")
        page.type_into("#oauth_password", "a-guess")
        page.click(".auth-container button.authorize")
        error = page.wait_for(
            "document.querySelector('.auth-container .errors')?.textContent",
            timeout=20,
            what="Swagger UI's Auth Error",
        )
        assert "createuser --superuser" in error
        page.console_errors.clear()  # Swagger UI logs the refused login itself
        page.failed = [f for f in page.failed if not f[0].endswith("/api/auth/token/")]

        page.navigate(f"{base}/redoc")
        redoc_operations = page.wait_for(
            "document.querySelectorAll('[data-section-id*=\"/operation/\"]').length >= 100 "
            "&& document.querySelectorAll('[data-section-id*=\"/operation/\"]').length",
            timeout=90,
            what="ReDoc's operations",
        )
        assert redoc_operations >= 100
        assert "flplatform" in page.evaluate("document.querySelector('h1')?.textContent || ''")
        page.pump(0.5)
        assert any(u.endswith("/static/docs/redoc/redoc.standalone.js") for u in page.requests)
        assert_stayed_local(page, base)


def test_authorize_with_password_then_try_it_out(settings):
    make_users(settings.database_url, [{"username": "swagger-user", "actor": True}])
    with live_server(settings) as base, chromium() as page:
        page.navigate(f"{base}/docs")
        page.wait_for("document.querySelectorAll('.opblock').length >= 100", timeout=60, what="operations")

        page.click("button.authorize")
        page.wait_for("!!document.querySelector('#oauth_username')", what="the Authorize dialog")
        # Only username and password are offered: the client fields this server ignores are hidden.
        for hidden in ("#client_id_password", "#client_secret_password", "#password_type"):
            assert page.evaluate(f"document.querySelector('{hidden}').offsetParent === null"), hidden
        page.type_into("#oauth_username", "swagger-user")
        page.type_into("#oauth_password", "password-123")
        page.click(".auth-container button.authorize")
        page.wait_for(
            "[...document.querySelectorAll('.auth-container')].some(c => c.textContent.includes('Logout'))",
            timeout=20,
            what="Authorized",
        )
        assert page.evaluate("document.querySelector('.auth-container .errors')") is None
        page.click(".btn-done")

        page.click(".opblock-summary-path", text="/api/users/myself/")
        page.wait_for("!!document.querySelector('.opblock.is-open .try-out__btn')", what="Try it out")
        page.click(".opblock.is-open .try-out__btn")
        page.click(".opblock.is-open .execute")
        status = page.wait_for(
            "document.querySelector('.opblock.is-open .live-responses-table tr.response .response-col_status')?.textContent",
            timeout=20,
            what="the response",
        )
        assert status.strip() == "200"
        body = page.evaluate(
            "document.querySelector('.opblock.is-open .live-responses-table .microlight')?.textContent || ''"
        )
        assert '"username": "swagger-user"' in body
        assert_stayed_local(page, base)
