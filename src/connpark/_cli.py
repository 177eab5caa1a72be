"""Command line: ``connpark serve | stats | demo server|client``; ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence

from . import __version__
from ._errors import ConnparkError

LOGGER = logging.getLogger("connpark")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), not the usage block and a traceback-like wall."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _mode(text: str) -> int:
    from ._config import parse_mode

    try:
        return parse_mode(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("socket_mode", "--socket-mode")) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}")
    return value


def _shards(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'auto': {text!r}") from None
    if not 1 <= value <= 255:
        raise argparse.ArgumentTypeError(f"must be 1 to 255: {value}")
    return value


def _host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every interface)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"want HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"write an IPv6 address in brackets, [{host}]:{port}")
    return host or "0.0.0.0", int(port)


def _add_demo(sub: argparse._SubParsersAction[_Parser]) -> None:
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


def _add_serve(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the container",
        description="Run the container: hold idle TCP connections parked by workers "
        "and hand each back when its client sends data, hangs up, or times out.",
    )
    p.add_argument(
        "--socket",
        help="control socket path (default: $XDG_RUNTIME_DIR "
        "or the working directory, connpark.sock)",
    )
    p.add_argument("--max-parked", type=_positive_int, help="most connections held at once")
    p.add_argument(
        "--idle-timeout", type=_positive_float, help="default idle deadline, seconds (300)"
    )
    p.add_argument(
        "--allow-uid", type=int, action="append", help="peer uid allowed (repeat); default: ours"
    )
    p.add_argument("--socket-mode", type=_mode, help="socket file mode, octal (default 0600)")
    p.add_argument(
        "--orphan-timeout", type=_positive_float, help="seconds a wake waits for a worker (60)"
    )
    p.add_argument(
        "--shutdown-grace", type=_positive_float, help="seconds to wait for ACKs on SIGTERM (10)"
    )
    p.add_argument(
        "--max-output-bytes",
        type=_positive_int,
        help="bytes queued to one session before it is not read (1048576)",
    )
    p.add_argument(
        "--max-output-messages",
        type=_positive_int,
        help="messages queued to one session before it is not read (1024)",
    )
    p.add_argument(
        "--output-timeout",
        type=_positive_float,
        help="seconds a session may stay over its output limit before it is ended (10)",
    )
    p.add_argument(
        "--ack-deadline",
        type=_positive_float,
        help="seconds without an ACK before a session's pool-mates get its new wakes (5)",
    )
    p.add_argument(
        "--end-grace",
        type=_positive_float,
        help="seconds an ended session has to close its end before its wakes stay with it (5)",
    )
    p.add_argument(
        "--restore-grace",
        type=_positive_float,
        help="with --crash-recovery: seconds a restored wake waits for its worker to claim it (10)",
    )
    p.add_argument(
        "--crash-recovery",
        action="store_true",
        help="run the container as a shard under a supervisor that mirrors every parked fd:"
        " a killed shard is restarted with every connection",
    )
    p.add_argument(
        "--shards",
        type=_shards,
        metavar="N|auto",
        help="run N container processes (shards), each with its mirror (implies"
        " --crash-recovery); auto: one per core, and enough for --max-parked within the"
        " per-process fd limit (default 1)",
    )
    p.add_argument(
        "--metrics",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (needs prometheus_client)",
    )
    p.add_argument("--config", help="TOML file with the same keys ([connpark] table)")
    _add_log_flags(p)


def _add_log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])


def _add_stats(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("stats", help="print a running container's statistics")
    p.add_argument("--socket", help="control socket path (default as for serve)")
    p.add_argument("--json", action="store_true", help="one JSON object per snapshot")
    p.add_argument(
        "--watch",
        type=_positive_float,
        nargs="?",
        const=1.0,
        metavar="SECONDS",
        help="repeat every SECONDS (default 1) until interrupted",
    )


def _add_shard(sub: argparse._SubParsersAction[_Parser]) -> None:
    """The supervisor starts its shard with this (not for people: no help shown)."""
    p = sub.add_parser("_shard")
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--mirror-fd", type=int, required=True)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--generation", type=int, default=1)
    p.add_argument("--place-json", default="{}")
    p.add_argument("--config-json", required=True)
    _add_log_flags(p)


def _add_mirror(sub: argparse._SubParsersAction[_Parser]) -> None:
    """The fleet starts each shard's mirror with this (not for people)."""
    p = sub.add_parser("_mirror")
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--lifeline-fd", type=int, default=-1)
    p.add_argument("--place-json", required=True)
    p.add_argument("--config-json", required=True)
    _add_log_flags(p)


def _add_upgrade(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "upgrade",
        help="replace a --crash-recovery container's processes with the code on disk",
        description="Hot upgrade: the supervisor re-executes itself keeping every fd, then a"
        " new shard takes every parked connection from the mirror. Nothing is lost or"
        " delivered twice; workers reconnect by themselves. Same as SIGHUP to the supervisor.",
    )
    p.add_argument("--socket", help="control socket path (default as for serve)")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        help="seconds (default 30, and 10 more per shard past the third)",
    )


def _add_resume(sub: argparse._SubParsersAction[_Parser]) -> None:
    """An upgrading supervisor re-executes into this (not for people)."""
    p = sub.add_parser("_resume")
    p.add_argument("--state-fd", type=int, required=True)
    p.add_argument("--fleet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="connpark",
        description="Park idle TCP connections of heavy servers in a tiny container.",
    )
    parser.add_argument("--version", action="version", version=f"connpark {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_stats(sub)
    _add_demo(sub)
    _add_upgrade(sub)
    _add_shard(sub)
    _add_mirror(sub)
    _add_resume(sub)
    return parser


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("connpark")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _run_serve(args: argparse.Namespace) -> int:
    from ._config import ContainerConfig

    _setup_logging(args.log_level, args.log_format)
    config = ContainerConfig.from_args(args)
    if args.metrics is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ConnparkError(
                "--metrics needs prometheus_client: pip install 'connpark[metrics]'"
            ) from None
    if args.crash_recovery or args.shards not in (None, 1):
        import os

        import attrs

        from ._fleet import Fleet, auto_shards, run_fleet
        from ._service import control_socket
        from ._systemd import Notifier, listen_fds

        shards = auto_shards(config) if args.shards == "auto" else int(args.shards or 1)
        log_args = ["--log-level", args.log_level, "--log-format", args.log_format]
        notifier = Notifier.from_environ()
        inherited = control_socket(listen_fds())
        if inherited is not None:
            config = attrs.evolve(config, path=os.fsdecode(inherited.getsockname()))
        fleet = Fleet(config, shards, log_args=log_args, notifier=notifier, metrics=args.metrics)
        fleet.listen(inherited)  # start-up errors: one line, no trio traceback
        run_fleet(fleet)
        return 0
    from ._service import run_serve

    return run_serve(config, metrics=args.metrics)


def _run_shard(args: argparse.Namespace) -> int:
    from ._config import ContainerConfig
    from ._supervisor import ShardPlace, run_shard

    _setup_logging(args.log_level, args.log_format)
    config = ContainerConfig.from_mapping(json.loads(args.config_json))
    run_shard(
        config,
        listen_fd=args.listen_fd,
        mirror_fd=args.mirror_fd,
        epoch=args.epoch,
        generation=args.generation,
        place=ShardPlace(**json.loads(args.place_json)),
    )
    return 0


def _run_mirror(args: argparse.Namespace) -> int:
    import socket

    from ._config import ContainerConfig
    from ._supervisor import ShardPlace, Supervisor, run_supervisor
    from ._zygote import Spawner

    _setup_logging(args.log_level, args.log_format)
    config = ContainerConfig.from_mapping(json.loads(args.config_json))
    log_args = ["--log-level", args.log_level, "--log-format", args.log_format]
    listener = socket.socket(fileno=args.listen_fd)
    place = ShardPlace(**json.loads(args.place_json))
    mirror = Supervisor(
        config,
        listener,
        place=place,
        log_args=log_args,
        spawner=Spawner.from_environ(),
        lifeline=args.lifeline_fd,
    )
    run_supervisor(mirror)
    return 0


def _run_resume(args: argparse.Namespace) -> int:
    from ._fleet import resume_fleet, run_fleet
    from ._supervisor import resume_supervisor, run_supervisor

    if args.fleet:
        fleet = resume_fleet(args.state_fd)
        log = fleet.log_args
        _setup_logging(log[log.index("--log-level") + 1], log[log.index("--log-format") + 1])
        run_fleet(fleet)
        return 0
    supervisor = resume_supervisor(args.state_fd)
    log = supervisor.log_args
    _setup_logging(log[log.index("--log-level") + 1], log[log.index("--log-format") + 1])
    run_supervisor(supervisor)
    return 0


def _run_upgrade(args: argparse.Namespace) -> int:
    import os
    import time

    from ._stats_client import fetch_stats
    from ._unixsock import default_socket_path

    path = args.socket or str(default_socket_path())
    before = fetch_stats(path)
    sup = [p for p in before.processes if p.role == "supervisor"]
    if not sup:
        raise ConnparkError(
            f"the container at {path} has no supervisor (start it with --crash-recovery):"
            " it cannot be upgraded in place"
        )
    old = {p.pid for p in before.processes if p.role == "shard"}
    timeout = args.timeout or 30.0 + 10.0 * max(0, len(old) - 3)
    from ._supervisor import preflight

    problem = preflight()
    if problem:
        raise ConnparkError(f"not upgrading: {problem}")
    shard_ids = sorted(p.shard for p in before.processes if p.role == "shard" and p.shard)
    if shard_ids and not before.shards:
        raise ConnparkError(
            f"{path} is the socket of shard {shard_ids[0]}:"
            " upgrade through the control socket (shard 0's path)"
        )
    try:
        os.kill(sup[0].pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ConnparkError(
            f"the supervisor (pid {sup[0].pid}) is gone: its shards are draining; start"
            " connpark serve again"
        ) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            os.kill(sup[0].pid, 0)
        except ProcessLookupError:
            raise ConnparkError(
                f"the supervisor (pid {sup[0].pid}) exited during the upgrade: see its log"
            ) from None
        try:
            now = fetch_stats(path, timeout=2)
        except ConnparkError:
            continue  # between shards: try again
        shards = {p.pid for p in now.processes if p.role == "shard"}
        if len(shards) >= len(old) and not shards & old:
            gen = [p.generation or 0 for p in now.processes if p.role == "mirror"]
            held = now.parked + now.queued + now.unacked
            print(
                f"upgraded: supervisor {sup[0].pid}, mirrors at generation"
                f" {min(gen) if gen else '?'}, shard {' '.join(map(str, sorted(old)))} ->"
                f" {' '.join(map(str, sorted(shards)))}; {held:,} connections held"
            )
            return 0
    raise ConnparkError(f"the upgrade did not finish within {timeout:g} s")


def _run_stats(args: argparse.Namespace) -> int:
    import time

    from ._stats import format_table
    from ._stats_client import fetch_stats
    from ._unixsock import default_socket_path

    path = args.socket or str(default_socket_path())
    first = True
    while True:
        stats = fetch_stats(path)
        if args.json:
            print(stats.to_json(), flush=True)
        else:
            # A blank line between --watch snapshots; each has a timestamp in its header.
            print(("" if first else "\n") + format_table(stats, source=path), flush=True)
        first = False
        if not args.watch:
            return 0
        time.sleep(args.watch)


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
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "stats":
            return _run_stats(args)
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "_shard":
            return _run_shard(args)
        if args.command == "_mirror":
            return _run_mirror(args)
        if args.command == "_resume":
            return _run_resume(args)
        if args.command == "upgrade":
            return _run_upgrade(args)
    except ConnparkError as exc:
        print(f"connpark {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)
