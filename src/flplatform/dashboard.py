"""The web dashboard at ``/ui/`` (docs/dashboard.md): one HTML page and its scripts, served from
files inside the package (no CDN), which reads everything through the JSON API with the signed-in
user's token, so it shows exactly what that user may read.

The page is a static shell: it holds no data, so it is public like ``/docs``. Its
Content-Security-Policy allows scripts, styles and requests from this server only (no inline
script or style, no frames, no form posts elsewhere). The charts are uPlot 1.6.32 (MIT),
vendored under ``static/uplot/`` with its licence (``static/README.md``).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

UI_URL = "/ui/"
ASSETS_URL = "/ui/assets"

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


# The page shell: everything it shows, dashboard.js draws from the API (no inline script or style).
PAGE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>flplatform dashboard</title>
<link rel="stylesheet" href="assets/uPlot.min.css">
<link rel="stylesheet" href="assets/dashboard.css">
<script src="assets/uPlot.iife.min.js" defer></script>
<script src="assets/dashboard.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
  <p class="brand"><a href="#/trainings">flplatform</a> <span>dashboard</span></p>
  <nav aria-label="Sections" id="nav" hidden>
    <ul>
      <li><a href="#/trainings" data-section="trainings">Trainings</a></li>
      <li><a href="#/models" data-section="models">Models</a></li>
      <li><a href="#/topics" data-section="topics">Broker topics</a></li>
      <li><a href="#/jobs" data-section="jobs">Inference jobs</a></li>
    </ul>
  </nav>
  <div class="who" id="who" hidden>
    <span id="who-name"></span>
    <button type="button" id="logout">Log out</button>
  </div>
</header>
<p id="status" role="status" aria-live="polite" class="status"></p>
<main id="main" tabindex="-1">
  <noscript><p>The dashboard needs JavaScript. The API is documented at <a href="../docs">/docs</a>.</p></noscript>
</main>
<footer class="foot"><p>API reference: <a href="../docs">Swagger UI</a> · <a href="../redoc">ReDoc</a>. Charts: uPlot (MIT).</p></footer>
</body>
</html>
"""


@router.get(UI_URL, response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """The page shell (``/ui`` redirects here: the router adds the slash)."""
    return HTMLResponse(PAGE, headers=HEADERS)


def install_dashboard(app: FastAPI) -> None:
    """Serve ``/ui/`` and its assets (the dashboard's own files and the vendored uPlot)."""
    app.mount(
        ASSETS_URL,
        StaticFiles(packages=[("flplatform", "static/dashboard"), ("flplatform", "static/uplot")]),
        name="dashboard-assets",
    )
    app.include_router(router)
