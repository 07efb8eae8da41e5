"""lmforge dashboard [RUNS_DIR]: a web page of training runs (lmforge/web/), live while they train."""

import argparse
import asyncio
import ipaddress
import logging
import signal
from pathlib import Path

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


def add_parser(sub) -> None:
    p = sub.add_parser("dashboard", help="watch training runs in a browser: curves, config, checkpoints",
                       description="Serve a web page listing the runs under RUNS_DIR (directories written by "
                                   "`lmforge train`, up to two levels down) with their method, model, status, last "
                                   "loss and speed, and for the runs picked: loss / validation loss / learning rate "
                                   "/ tokens-per-second curves and any other logged number, overlaid, updated while "
                                   "they train, their resolved config and checkpoints. Read-only; needs no network.")
    p.add_argument("runs_dir", nargs="?", type=Path, default=Path("runs"), help="the runs directory (default runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8100, help="port to listen on; 0 picks a free one (default 8100)")
    p.add_argument("--refresh", type=float, default=2.0, metavar="SECONDS",
                   help="how often the page reads the runs again (default 2)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.cli.serve import _listen
    from lmforge.serve.server import uvicorn_server
    from lmforge.web.dashboard import create_dashboard_app

    if not args.runs_dir.is_dir():
        raise LmforgeError(f"{args.runs_dir} is not a directory; pass the folder your runs' output_dir are in")
    if args.port < 0:
        raise LmforgeError(f"--port must be >= 0, got {args.port}")
    if not args.refresh > 0:
        raise LmforgeError(f"--refresh must be > 0 seconds, got {args.refresh}")
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn_server(create_dashboard_app(args.runs_dir, args.refresh), access_log=False,
                            log_level=logging.getLogger().level)
    shown = f"[{host}]" if ":" in host else host
    if not ipaddress.ip_address(host).is_loopback:
        log.warning("the dashboard has no access control: anyone who can reach %s:%d can read these runs' configs "
                    "and metrics", shown, port)
    log.info("dashboard of %s on http://%s:%d/", args.runs_dir.resolve(), shown, port)
    # as lmforge serve: uvicorn re-raises SIGINT/SIGTERM under the handlers it found; ignored, the exit is clean
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
