"""The control socket's file: safe listen, clear connect errors, peer credentials."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
from pathlib import Path

from ._errors import ConnparkError, lost_from_os_error


def default_socket_path(name: str = "connpark.sock") -> Path:
    """``$XDG_RUNTIME_DIR/NAME`` (a per-user 0700 dir) if set, else ``./NAME``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and os.path.isdir(runtime) else Path.cwd()
    return base / name


def listen_unix(
    path: str | os.PathLike[str], *, mode: int = 0o600, backlog: int = 128
) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``, never readable by others in between.

    A stale socket file is replaced only when nothing answers on it; a live one,
    or a file that is not a socket, is an error.
    """
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConnparkError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: its server is gone
        else:
            raise ConnparkError(f"another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConnparkError(f"cannot bind {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(backlog)
    return sock


def connect_unix(path: str | os.PathLike[str]) -> socket.socket:
    """Connect to a container (or demo server); ``ContainerLost`` in one clear line."""
    path = os.fspath(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ECONNREFUSED and _exists_not_socket(path):
            exc = OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK))
        raise lost_from_os_error(exc, f"cannot connect to {path}") from exc
    return sock


def _exists_not_socket(path: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end, or None where the OS cannot say."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
    if sys.platform == "darwin" or "bsd" in sys.platform:
        # LOCAL_PEERCRED (SOL_LOCAL=0, opt 1) -> struct xucred {u_int version; uid_t uid; ...}
        raw = sock.getsockopt(0, 1, 76)
        return int(struct.unpack_from("=II", raw)[1])
    return None
