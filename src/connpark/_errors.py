"""The error hierarchy: one root, few branches, meaning in the docstrings."""

from __future__ import annotations


class ConnparkError(Exception):
    """Root of every error connpark raises on purpose."""


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

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"park refused: {reason}")
        #: The refusal code's name, e.g. ``"full"`` or ``"not-a-tcp-stream"``.
        self.reason = reason


class ContainerError(ConnparkError):
    """The container told us to go away (ERROR message) or could not be reached."""

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class ParkingClosed(ConnparkError):
    """The parking handle was closed (by you, or because the session ended)."""
