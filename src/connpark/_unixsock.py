"""The control socket's file: safe listen, clear connect errors, peer credentials."""

from __future__ import annotations

import errno
import os
import select
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


def shard_path(path: str, shard: int) -> str:
    """Where shard ``shard`` of the container at ``path`` listens (shard 0: ``path``)."""
    return f"{path}.{shard}" if shard else path


#: sun_path holds 108 bytes on Linux, 104 on macOS and the BSDs, NUL included.
MAX_PATH = 107 if sys.platform.startswith("linux") else 103


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_path(path: str) -> None:
    """Fail early, in one line, on a path no AF_UNIX socket can have."""
    size = len(os.fsencode(path))
    if size > MAX_PATH:
        raise ConnparkError(
            f"socket path is {size} bytes, over the AF_UNIX limit of {MAX_PATH}: {path}"
        )
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ConnparkError(f"cannot use {path}: directory {parent} does not exist")


def listen_unix(
    path: str | os.PathLike[str], *, mode: int = 0o600, backlog: int = 128
) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``, never readable by others in between.

    A stale socket file is replaced only when nothing answers on it; a live one,
    or a file that is not a socket, is an error. Every error is a one-line
    ``ConnparkError``.
    """
    path = os.fspath(path)
    check_path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConnparkError(f"cannot use {path}: {_why(exc)}") from exc
    else:
        if stat.S_ISDIR(st.st_mode):
            raise ConnparkError(f"{path} is a directory; give the socket file's path")
        if not stat.S_ISSOCK(st.st_mode):
            raise ConnparkError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)  # stale: its server is gone
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ConnparkError(f"cannot replace stale socket {path}: {_why(exc)}") from exc
        except OSError as exc:
            raise ConnparkError(f"cannot use {path}: {_why(exc)}") from exc
        else:
            raise ConnparkError(f"another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConnparkError(f"cannot listen on {path}: {_why(exc)}") from exc
    finally:
        os.umask(old)
    return sock


def connect_unix(path: str | os.PathLike[str]) -> socket.socket:
    """Connect to a container (or demo server); ``ContainerLost`` in one clear line."""
    path = os.fspath(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) > MAX_PATH:
            raise OSError(errno.ENAMETOOLONG, "path over the AF_UNIX limit")
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


#: Linux's SO_PEERPIDFD (6.5+; include/uapi/asm-generic/socket.h), if Python does not name it.
_SO_PEERPIDFD: int = getattr(socket, "SO_PEERPIDFD", 77)


def peer_gone(sock: socket.socket) -> bool:
    """The process that connected to us has exited, every thread of it (Linux).

    A pidfd of the peer (SO_PEERPIDFD) is readable once it has: that is
    exact, whatever pid namespace, and blind to pid reuse. Older kernels: its
    SO_PEERCRED pid is gone from /proc, or each of its threads is a zombie
    (only when /proc is our namespace's). False where that cannot be told.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return True
        return _gone_from_proc(sock)
    pidfd = int.from_bytes(raw, sys.byteorder, signed=True)
    try:
        return bool(select.select([pidfd], [], [], 0)[0])
    finally:
        os.close(pidfd)


def _gone_from_proc(sock: socket.socket) -> bool:
    try:
        pid = _peer_creds(sock)[0]
        if pid <= 0 or os.readlink("/proc/self") != str(os.getpid()):
            return False  # another pid namespace's, or a /proc not ours
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        except OSError:
            return False
        # "tid (comm) S ...": comm may hold spaces and parentheses.
        if raw[raw.rfind(b")") + 2 :][:1] not in (b"Z", b"X"):
            return False
    return True


def _peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected (Linux SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end, or None where the OS cannot say."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        return _peer_creds(sock)[1]
    if sys.platform == "darwin" or "bsd" in sys.platform:
        # LOCAL_PEERCRED (SOL_LOCAL=0, opt 1) -> struct xucred {u_int version; uid_t uid; ...}
        raw = sock.getsockopt(0, 1, 76)
        return int(struct.unpack_from("=II", raw)[1])
    return None
