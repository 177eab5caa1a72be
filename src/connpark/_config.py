"""The container's configuration: one frozen, validated value, from code, flags or TOML."""

from __future__ import annotations

import argparse
import importlib
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._errors import ConnparkError
from ._unixsock import default_socket_path
from ._wire import DEFAULT_MAX_BODY, MAX_TOKEN


def _integer(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attr.name} must be an integer, got {value!r}")


def _number(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attr.name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{attr.name} must be finite, got {value!r}")


def _positive(inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attr.name} must be > 0, got {value!r}")


def _count(default: int, *more: Any) -> Any:
    """An integer field, > 0 unless ``more`` validators say otherwise."""
    return attrs.field(default=default, validator=[_integer, *(more or (_positive,))])


def _seconds(default: float) -> Any:
    return attrs.field(default=default, validator=[_number, _positive])


def _path(value: object) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"path must be a string, got {value!r}")
    return os.fspath(value)


def _uids(value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"allow_uids must be a list of integers, got {value!r}")
    uids = tuple(value)
    if any(isinstance(u, bool) or not isinstance(u, int) or u < 0 for u in uids):
        raise TypeError(f"allow_uids must be a list of integers >= 0, got {value!r}")
    return uids


def parse_mode(text: object) -> int:
    """A socket file mode: an octal string such as ``"0600"``, or an int."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        try:
            value = int(text, 8)
        except ValueError:
            raise ValueError(f"socket_mode must be octal, like 0600, got {text!r}") from None
    else:
        raise TypeError(f'socket_mode must be an octal string like "0600", got {text!r}')
    if not 0 <= value <= 0o777:
        raise ValueError(f"socket_mode must be within 0000..0777, got {text!r}")
    return value


def _own_uid() -> tuple[int, ...]:
    return (os.getuid(),)


@attrs.frozen(kw_only=True)
class ContainerConfig:
    """Everything ``connpark serve`` can be told. Defaults work with no flags."""

    #: Control socket path (default: $XDG_RUNTIME_DIR/connpark.sock, else ./connpark.sock).
    path: str = attrs.field(factory=lambda: str(default_socket_path()), converter=_path)
    #: Most connections held at once (parked + waiting for a worker); also capped by fds.
    max_parked: int = _count(1_000_000)
    #: Idle deadline, seconds, for parks that do not set their own.
    idle_timeout: float = _seconds(300.0)
    #: Peer uids allowed to connect (SO_PEERCRED); default: our own uid only.
    allow_uids: tuple[int, ...] = attrs.field(factory=_own_uid, converter=_uids)
    socket_mode: int = attrs.field(default=0o600, converter=parse_mode)
    max_token: int = _count(4096, attrs.validators.ge(0), attrs.validators.le(MAX_TOKEN))
    #: At most what fits one frame beside the largest token (WAKE carries both).
    max_pending: int = _count(
        65536, attrs.validators.ge(0), attrs.validators.le(DEFAULT_MAX_BODY - MAX_TOKEN - 64)
    )
    max_sessions: int = _count(1024)
    #: Pools known at once (names are the workers' choice; one with no session
    #: and no connection is forgotten). At most 2048: STATS lists each.
    max_pools: int = _count(1024, attrs.validators.ge(1), attrs.validators.le(2048))
    #: Unacknowledged wakes per session before further wakes queue in the container.
    window: int = _count(1024)
    #: How long a woken connection waits for a session of its pool, then is closed.
    orphan_timeout: float = _seconds(60.0)
    #: On SIGTERM: how long to wait for workers to ACK the SHUTDOWN wakes.
    shutdown_grace: float = _seconds(10.0)
    #: fds kept free for the process itself (logs, accept, stats); see the fd budget.
    fd_reserve: int = _count(64, attrs.validators.ge(8))
    #: Bytes queued to one session (encoded, not yet taken by its socket). Past
    #: it the session is not read, and gets no more wakes encoded, until it drains.
    max_output_bytes: int = _count(1 << 20, attrs.validators.ge(64 << 10))
    #: Messages queued to one session, the same way (a STATS flood is many small ones).
    max_output_messages: int = _count(1024, attrs.validators.ge(16))
    #: A session over an output limit this long (seconds) is ended (ERROR LIMIT).
    output_timeout: float = _seconds(10.0)
    #: A session whose oldest un-ACKed wake is older than this (seconds) gets
    #: no new wakes while another session of its pool has room.
    ack_deadline: float = _seconds(5.0)
    #: After the container ends a session (ERROR), how long it keeps reading
    #: ACKs waiting for the worker to close its end (seconds).
    end_grace: float = _seconds(5.0)
    #: After a crash (``--crash-recovery``): how long restored connections that
    #: were on their way to a worker wait for it to reconnect and claim them
    #: before they are woken again for any worker of their pool (seconds).
    restore_grace: float = _seconds(10.0)
    #: Auto-response rule sets one session (or one pool) may register (RULES).
    max_rule_sets: int = _count(16)
    #: Tags per park, and bytes per tag (PARK refusals ``too-many-tags``, ``tag-too-large``).
    max_tags: int = _count(8, attrs.validators.ge(0), attrs.validators.le(255))
    max_tag_len: int = _count(64, attrs.validators.ge(1), attrs.validators.le(255))
    #: Bytes one SEND may publish (RESULT ``too-large`` past it).
    max_publish: int = _count(
        65536, attrs.validators.ge(1), attrs.validators.le(DEFAULT_MAX_BODY - 4096)
    )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ContainerConfig:
        """Build from a dict (TOML table or parsed flags); unknown keys are an error."""
        names = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConnparkError(f"unknown configuration keys: {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError, OverflowError) as exc:
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
        if not isinstance(table, dict):
            raise ConnparkError(f"config {path}: [connpark] must be a table")
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
            "socket_mode": args.socket_mode,
            "orphan_timeout": args.orphan_timeout,
            "shutdown_grace": args.shutdown_grace,
            "max_output_bytes": args.max_output_bytes,
            "max_output_messages": args.max_output_messages,
            "output_timeout": args.output_timeout,
            "ack_deadline": args.ack_deadline,
            "end_grace": args.end_grace,
            "restore_grace": getattr(args, "restore_grace", None),
        }
        base.update({k: v for k, v in flags.items() if v is not None})
        return cls.from_mapping(base)
