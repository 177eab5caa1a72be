"""Command line: ``connpark serve | stats | demo server|client``; ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from . import __version__
from ._errors import ConnparkError

LOGGER = logging.getLogger("connpark")


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ._demo import default_demo_path

    demo = sub.add_parser(
        "demo",
        help="the classic fd-passing line demo (basic mode)",
        description="The server passes its stdout to the client over a unix socket; "
        "each line typed in the client appears on the server's terminal.",
    )
    roles = demo.add_subparsers(dest="role", required=True)
    for role, text in (
        ("server", "hand this terminal's stdout to each client that asks"),
        ("client", "copy stdin, line by line, into the server's stdout"),
    ):
        p = roles.add_parser(role, help=text, description=text)
        p.add_argument(
            "--socket",
            default=default_demo_path(),
            help="unix socket path (default: %(default)s)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connpark",
        description="Park idle TCP connections of heavy servers in a tiny container.",
    )
    parser.add_argument("--version", action="version", version=f"connpark {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import run_client, serve_demo

    if args.role == "server":
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            serve_demo(args.socket)
        except KeyboardInterrupt:
            return 0
        return 0
    return run_client(args.socket)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _run_demo(args)
    except ConnparkError as exc:
        print(f"connpark {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)
