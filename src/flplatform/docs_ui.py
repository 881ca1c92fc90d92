"""``/docs`` (Swagger UI) and ``/redoc`` served from files inside the package, never from a CDN,
so the interactive documentation works on an air-gapped cluster.

The assets are pinned npm releases vendored under ``flplatform/static/`` with their licences
(see ``static/README.md`` for versions, checksums and how to refresh them); the HTML pages
are FastAPI's own (``get_swagger_ui_html``/``get_redoc_html``, FastAPI's documented
self-hosting recipe) pointed at those files.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/static/docs"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

SWAGGER_UI_PARAMETERS: dict[str, Any] = {
    # A token obtained with "Authorize" survives a page reload.
    "persistAuthorization": True,
    # Swagger UI would otherwise load a badge image from validator.swagger.io for non-local hosts.
    "validatorUrl": None,
    "displayRequestDuration": True,
    "filter": True,
}


# ReDoc 2 always shows a "by Redocly" logo from cdn.redoc.ly: images from anywhere but this server
# (and inline data) are refused by the page itself, so an offline browser never even tries.
_DOCS_CSP = "img-src 'self' data:"


def _static(request: Request, path: str) -> str:
    return f"{request.scope.get('root_path', '')}{STATIC_URL}/{path}"


def install_docs(app: FastAPI) -> None:
    """Mount the vendored assets and serve the two documentation pages (the app is created with
    ``docs_url=None, redoc_url=None``)."""
    app.mount(STATIC_URL, StaticFiles(packages=[("flplatform", "static")]), name="docs-static")

    # Plain Starlette routes, as FastAPI registers its own documentation pages (outside the API).
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} – Swagger UI",
            swagger_js_url=_static(request, "swagger-ui/swagger-ui-bundle.js"),
            swagger_css_url=_static(request, "swagger-ui/swagger-ui.css"),
            swagger_favicon_url=_static(request, "swagger-ui/favicon-32x32.png"),
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        # Our small stylesheet after Swagger UI's: it hides the OAuth2 client fields this server ignores.
        extra = f'<link type="text/css" rel="stylesheet" href="{_static(request, "flplatform-docs.css")}">'
        html = bytes(page.body).decode().replace("</head>", f"{extra}\n</head>", 1)
        return HTMLResponse(html, headers={"Content-Security-Policy": _DOCS_CSP})

    async def swagger_ui_redirect(_: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
            title=f"{app.title} – ReDoc",
            redoc_js_url=_static(request, "redoc/redoc.standalone.js"),
            redoc_favicon_url=_static(request, "swagger-ui/favicon-32x32.png"),
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = _DOCS_CSP
        return page

    app.add_route(DOCS_URL, swagger_ui, include_in_schema=False)
    app.add_route(OAUTH2_REDIRECT_URL, swagger_ui_redirect, include_in_schema=False)
    app.add_route(REDOC_URL, redoc, include_in_schema=False)
