"""The error hierarchy: one root, few branches, meaning in the docstrings.

Every error a hook raises derives from ``ConnparkError``; where an OSError
caused it, the OSError is in ``__cause__`` (``lost_from_os_error`` is the one
place that translates it).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._wire import Refusal


class ConnparkError(Exception):
    """Root of every error connpark raises on purpose."""


class InternalError(ConnparkError):
    """A transition connpark's own rules forbid: a bug in connpark, never the peer's
    doing. Raised, not asserted: ``python -O`` must not turn a broken invariant
    into two owners of one connection.
    """


class ProtocolError(ConnparkError):
    """The control-socket conversation broke its rules; the session cannot go on.

    Abstract: raise one of the two subclasses, which say whose fault it was.
    """

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        #: Wire error code (see ``ErrorCode``) sent to the peer in ERROR.
        self.code = code


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol cannot carry (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or fds that break the protocol."""


class ParkRefused(ConnparkError):
    """The container refused to park a socket; the socket is still yours and usable."""

    def __init__(self, reason: Refusal, message: str | None = None) -> None:
        super().__init__(message or f"park refused: {reason.label}")
        #: Why, e.g. ``Refusal.FULL``; ``reason.label`` is ``"full"``.
        self.reason = reason


class Refused(ConnparkError):
    """The container refused a request that is not a park: rules past their bounds,
    a publish too large (``.reason``, a ``Refusal``)."""

    def __init__(self, reason: Refusal, what: str = "request") -> None:
        super().__init__(f"{what} refused: {reason.label}")
        self.reason = reason


class ContainerError(ConnparkError):
    """The container will not have us: uid not allowed, protocol version, not trusted.

    Reconnecting cannot help. ``code`` is the ERROR code when the container sent one.
    """

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class ContainerLost(ConnparkError):
    """The container could not be reached, or the session ended (EOF, reset, crash).

    A hook with ``reconnect=True`` raises it only once it gives up.
    """


class ContainerTimeout(ConnparkError):
    """The container did not answer in time (handshake, or a call's ``timeout``)."""


class ParkingClosed(ConnparkError):
    """The parking handle was closed by you; nothing more can be done with it."""


_WHY = {
    errno.ENOENT: "no such socket file",
    errno.ECONNREFUSED: "connection refused (nothing is listening)",
    errno.EACCES: "permission denied",
    errno.ENOTSOCK: "not a socket",
    errno.EPIPE: "the container closed the session",
    errno.ECONNRESET: "the container reset the session",
}


def lost_from_os_error(exc: OSError, what: str) -> ContainerLost:
    """The one place an OSError of a control socket becomes a connpark error."""
    why = _WHY.get(exc.errno or 0, exc.strerror or str(exc))
    error = ContainerLost(f"{what}: {why}")
    error.__cause__ = exc
    return error
