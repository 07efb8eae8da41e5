"""The run dashboard (`lmforge dashboard RUNS_DIR`, or /runs of `lmforge serve --runs RUNS_DIR`): a page over a small
JSON API that reads the run directories on every request, so runs that start, log or finish while it is open show up
at the page's next poll.

    GET /                           the dashboard page (/runs under `lmforge serve`)
    GET /api/runs                   {"root", "refresh_s" (the page's poll interval), "runs": [summary, ...]}
    GET /api/run?name=N             {"summary", "config" (config.yaml's text), "checkpoints"}
    GET /api/metrics?name=N&offset=B  {"records", "offset", "reset"}: metrics.jsonl from byte B on (live tailing)
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from lmforge import __version__
from lmforge.serve.errors import APIError
from lmforge.web.assets import SECURITY_HEADERS, add_asset_routes
from lmforge.web.runs import RecordCache, checkpoints, find_runs, read_config, read_metrics, summarize


def create_dashboard_app(root: Path, refresh_s: float = 2.0) -> FastAPI:
    """The app of `lmforge dashboard`: the page at / and the API."""
    app = FastAPI(title="lmforge dashboard", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(_: Request, e: RequestValidationError) -> JSONResponse:  # e.g. offset=abc
        first = e.errors()[0]
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        return APIError(400, f"Invalid value for '{param}': {first['msg']}.", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown routes, 405s
        message = f"Unknown route: {request.method} {request.url.path}." if e.status_code == 404 else str(e.detail)
        return APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()

    add_runs_api(app, root, refresh_s)
    add_asset_routes(app, "dashboard.html")
    return app


def add_runs_api(app: FastAPI, root: Path, refresh_s: float) -> None:
    """The dashboard's JSON routes over the runs under `root` (`lmforge dashboard`, `lmforge serve --runs`)."""
    root = Path(root).resolve()
    cache = RecordCache()

    def run_dir(name: str) -> Path:
        runs = find_runs(root)
        if name not in runs:
            raise APIError(404, f"No run named {name!r} under {root}. Runs: {', '.join(runs) or 'none'}.",
                           param="name", code="not_found")
        return runs[name]

    @app.get("/api/runs", include_in_schema=False)
    async def list_runs() -> JSONResponse:
        runs = [summarize(name, path, cache=cache).to_json() for name, path in find_runs(root).items()]
        return JSONResponse({"root": str(root), "refresh_s": refresh_s, "runs": runs}, headers=SECURITY_HEADERS)

    @app.get("/api/run", include_in_schema=False)
    async def run(name: str) -> JSONResponse:
        path = run_dir(name)
        config, _ = read_config(path)
        return JSONResponse({"summary": summarize(name, path, cache=cache).to_json(), "config": config,
                             "checkpoints": checkpoints(path)}, headers=SECURITY_HEADERS)

    @app.get("/api/metrics", include_in_schema=False)
    async def metrics(name: str, offset: int = 0) -> JSONResponse:
        if offset < 0:
            raise APIError(400, f"offset must be >= 0, got {offset}.", param="offset")
        chunk = read_metrics(run_dir(name) / "metrics.jsonl", offset)
        return JSONResponse({"records": chunk.records, "offset": chunk.offset, "reset": chunk.reset},
                            headers=SECURITY_HEADERS)
