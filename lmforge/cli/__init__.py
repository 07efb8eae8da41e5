"""`lmforge <command>`: argument parsing only; each command lives in its own module."""

import argparse
import logging
import os
import sys
import traceback

from lmforge import __version__
from lmforge.cli import chat, config, convert, dashboard, data, env, eval, generate, info, merge, plot, serve, train
from lmforge.errors import LmforgeError

COMMANDS = (convert, info, env, generate, chat, serve, train, config, plot, dashboard, merge, data, eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Fine-tune and serve open LLMs.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--quiet", "-q", action="store_true", help="log only warnings and errors to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="lmforge: %(message)s")
    try:
        return args.run(args) or 0
    except (LmforgeError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            traceback.print_exc()
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"lmforge {args.command}{rank}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
