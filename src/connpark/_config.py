"""The container's configuration: one frozen, validated value, from code, flags or TOML."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Mapping
from typing import Any

import attrs

from ._errors import ConnparkError
from ._unixsock import default_socket_path
from ._wire import DEFAULT_MAX_BODY, MAX_TOKEN


def _positive(inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attr.name} must be > 0, got {value!r}")


def _own_uid() -> tuple[int, ...]:
    return (os.getuid(),)


@attrs.frozen(kw_only=True)
class ContainerConfig:
    """Everything ``connpark serve`` can be told. Defaults work with no flags."""

    #: Control socket path (default: $XDG_RUNTIME_DIR/connpark.sock, else ./connpark.sock).
    path: str = attrs.field(factory=lambda: str(default_socket_path()), converter=str)
    #: Most connections held at once (parked + waiting for a worker); also capped by fds.
    max_parked: int = attrs.field(default=1_000_000, validator=_positive)
    #: Idle deadline, seconds, for parks that do not set their own.
    idle_timeout: float = attrs.field(default=300.0, validator=_positive)
    #: Peer uids allowed to connect (SO_PEERCRED); default: our own uid only.
    allow_uids: tuple[int, ...] = attrs.field(factory=_own_uid, converter=tuple)
    socket_mode: int = attrs.field(default=0o600)
    max_token: int = attrs.field(default=4096, validator=attrs.validators.le(MAX_TOKEN))
    #: At most what fits one frame beside the largest token (WAKE carries both).
    max_pending: int = attrs.field(
        default=65536,
        validator=[attrs.validators.ge(0), attrs.validators.le(DEFAULT_MAX_BODY - MAX_TOKEN - 64)],
    )
    max_sessions: int = attrs.field(default=1024, validator=_positive)
    #: Unacknowledged wakes per session before further wakes queue in the container.
    window: int = attrs.field(default=1024, validator=_positive)
    #: How long a woken connection waits for a session of its pool, then is closed.
    orphan_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: On SIGTERM: how long to wait for workers to ACK the SHUTDOWN wakes.
    shutdown_grace: float = attrs.field(default=10.0, validator=_positive)
    #: fds kept free (one full 253-fd frame, sessions, the process); parks past it are refused.
    fd_reserve: int = attrs.field(default=300, validator=attrs.validators.ge(8))

    @socket_mode.validator
    def _check_mode(self, attr: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value <= 0o777:
            raise ValueError(f"socket_mode must be within 0o000..0o777, got {value:#o}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ContainerConfig:
        """Build from a dict (TOML table or parsed flags); unknown keys are an error."""
        names = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConnparkError(f"unknown configuration keys: {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConnparkError(f"bad configuration: {exc}") from exc

    @classmethod
    def from_toml(cls, path: str) -> ContainerConfig:
        """Read ``[connpark]`` (or top-level) keys from a TOML file."""
        try:
            tomllib: Any = importlib.import_module("tomllib")
        except ImportError:
            raise ConnparkError("--config needs Python 3.11+ (tomllib)") from None

        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConnparkError(f"cannot read config {path}: {exc}") from exc
        table = doc.get("connpark", doc)
        if "socket_mode" in table and isinstance(table["socket_mode"], str):
            table["socket_mode"] = int(table["socket_mode"], 8)
        return cls.from_mapping(table)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ContainerConfig:
        """Flags override the TOML file, which overrides the defaults."""
        base: dict[str, Any] = {}
        if args.config:
            base = attrs.asdict(cls.from_toml(args.config))
        flags = {
            "path": args.socket,
            "max_parked": args.max_parked,
            "idle_timeout": args.idle_timeout,
            "allow_uids": tuple(args.allow_uid) if args.allow_uid else None,
            "socket_mode": int(args.socket_mode, 8) if args.socket_mode else None,
            "orphan_timeout": args.orphan_timeout,
            "shutdown_grace": args.shutdown_grace,
        }
        base.update({k: v for k, v in flags.items() if v is not None})
        return cls.from_mapping(base)
