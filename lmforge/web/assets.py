"""The web pages' files (lmforge/web/static: plain HTML, CSS and JavaScript modules, no build step, nothing from a
CDN), served with a strict Content-Security-Policy: scripts and styles from this origin only, no inline code, no
eval, requests to this origin only, and the page may not be framed."""

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response

from lmforge.serve.errors import APIError

STATIC = Path(__file__).parent / "static"
ASSET_PREFIX = "/ui/"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def asset_names() -> set[str]:
    """The files a page may load: exactly those shipped in static/ (a request names one of them or gets a 404,
    so no path can reach outside the folder)."""
    return {p.name for p in STATIC.iterdir() if p.suffix in MEDIA_TYPES}


def page(name: str) -> Response:
    path = STATIC / name
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


def add_asset_routes(app: FastAPI, root_page: str | None, pages: dict[str, str] | None = None) -> None:
    """GET / answers `root_page` (if any), GET PATH each other page of `pages` (path -> file); GET /ui/NAME answers the
    shipped file NAME. None needs the API key: they hold no data, and the pages ask for the key themselves."""
    names = asset_names()

    def add_page(path: str, name: str) -> None:
        app.add_api_route(path, lambda: page(name), methods=["GET"], include_in_schema=False)

    for path, name in {**({"/": root_page} if root_page else {}), **(pages or {})}.items():
        add_page(path, name)

    @app.get(ASSET_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in names:
            raise APIError(404, f"No such page asset: {name}.", code="not_found")
        return page(name)
