"""Start mirrors and shards by forking a warmed-up process: the fixed cost per process.

A fresh interpreter that imports trio and connpark holds about 19 MB of
private memory, and a million connections need over a hundred processes here
(20,000 fds each, mirrors included). So the supervisor forks a **zygote**
before it starts trio: everything imported, ``gc.freeze()``d, single-threaded,
no event loop. The zygote forks each mirror and shard on request; their
imported modules stay shared, copy-on-write (measured: about 3 MB private
each instead of 19).

Protocol: a SOCK_SEQPACKET channel per requester. A request is the
``connpark`` argv of the process to start (``@fd0``, ``@fd1``... stand for
the fds sent with it, SCM_RIGHTS); the answer ``{"pid": N}``; later,
``{"exit": N, "code": C}`` once the zygote reaped it. A mirror gets a channel
of its own (``CONNPARK_ZYGOTE_FD``) to ask for its shard. Without a zygote
(it died, or a process was re-executed by an upgrade), ``Spawner`` starts a
fresh interpreter instead: only the memory differs.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from ._fdpass import recv_fds

LOGGER = logging.getLogger(__name__)
ENV = "CONNPARK_ZYGOTE_FD"
#: Signals blocked in a new mirror or shard until it can handle them.
_CHILD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_ANSWER_TIMEOUT = 10.0


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, or None if it is gone already (the zygote reaps at once)."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def send_signal(pid: int | None, pidfd: int | None, sig: int) -> None:
    """Signal a process we started, by its pidfd when we have one (a pid may be reused)."""
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        elif pid is not None:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def has_exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def _fill(args: Sequence[str], fds: Sequence[int]) -> list[str]:
    return [str(fds[int(a[3:])]) if a.startswith("@fd") else a for a in args]


class Spawner:
    """Starts connpark's own processes: from the zygote if there is one, else fresh."""

    def __init__(self, channel: socket.socket | None = None, zygote_pid: int = 0) -> None:
        self._channel = channel
        #: The zygote, when we forked it (our child: we reap it, see ``reap_zygote``).
        self.zygote_pid = zygote_pid
        #: Exit codes the zygote reported, by pid.
        self._exits: dict[int, int] = {}
        #: Processes the zygote forked for us: it reaps them and tells us.
        self._forked: set[int] = set()

    @classmethod
    def from_environ(cls) -> Spawner:
        """A mirror's spawner: its channel to the zygote that forked it, if any."""
        fd = os.environ.pop(ENV, "")
        return cls(socket.socket(fileno=int(fd)) if fd.isdigit() else None)

    @classmethod
    def start(cls, close: Sequence[int] = ()) -> Spawner:
        """Fork the zygote now, before any thread or event loop starts (``close``: fds the
        zygote must not hold); a fresh-interpreter spawner if that fails."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            LOGGER.warning("no zygote (%s): each process starts a fresh interpreter", exc)
            return cls()
        pid = os.fork()
        if pid == 0:
            ours.close()
            for fd in close:
                os.close(fd)
            _serve(theirs)
        theirs.close()
        return cls(ours, pid)

    def spawn(self, args: Sequence[str], fds: Sequence[int]) -> int:
        """Start ``connpark ARGS``; ``@fdI`` in ARGS is ``fds[I]`` in the new process."""
        if self._channel is not None:
            try:
                return self._ask(args, fds)
            except OSError as exc:
                LOGGER.warning("the zygote is gone (%s): starting a fresh interpreter", exc)
                self._channel.close()
                self._channel = None
        proc = subprocess.Popen(
            [sys.executable, "-m", "connpark", *_fill(args, fds)],
            pass_fds=tuple(fds),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
        )
        return proc.pid

    def _ask(self, args: Sequence[str], fds: Sequence[int]) -> int:
        assert self._channel is not None
        socket.send_fds(self._channel, [json.dumps(list(args)).encode()], list(fds))
        deadline = time.monotonic() + _ANSWER_TIMEOUT
        while True:
            msg = self._receive(deadline - time.monotonic())
            if msg is None:
                raise OSError("no answer")
            if "pid" in msg:
                self._forked.add(int(msg["pid"]))
                return int(msg["pid"])

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """One message from the zygote (exit notices are kept), or None."""
        channel = self._channel
        if channel is None or not select.select([channel], [], [], max(0.0, timeout))[0]:
            return None
        data = channel.recv(4096)
        if not data:
            raise OSError("the zygote closed its channel")
        msg: dict[str, Any] = json.loads(data)
        if "exit" in msg:
            self._exits[int(msg["exit"])] = int(msg["code"])
        return msg

    def reap(self, pid: int, *, wait: bool) -> int | None:
        """``pid``'s exit code (negative: its signal), or None if it runs (or is not known)."""
        if pid not in self._forked:  # a fresh interpreter of ours: we reap it
            try:
                got, status = os.waitpid(pid, 0 if wait else os.WNOHANG)
            except ChildProcessError:
                return None
            if got == 0:
                return None
            return os.waitstatus_to_exitcode(status)
        deadline = time.monotonic() + (2.0 if wait else 0.0)
        try:
            while pid not in self._exits:
                if self._receive(deadline - time.monotonic()) is None:
                    return None
        except (OSError, ValueError):
            return None
        self._forked.discard(pid)
        return self._exits.pop(pid)


def _serve(first: socket.socket) -> NoReturn:
    """The zygote: fork what is asked, reap, report; exit once nobody can ask."""
    try:
        for sig in _CHILD_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # the supervisor's stop is not ours
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        # SIGCHLD wakes the select below: an exit is reported at once.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        gc.freeze()  # what is imported now stays shared with every child
        channels: dict[int, socket.socket] = {first.fileno(): first}
        owner: dict[int, socket.socket] = {}
        while channels:
            ready = select.select([wake_r, *channels], [], [], 1.0)[0]
            if wake_r in ready:
                os.read(wake_r, 512)
            for fd in ready:
                channel = channels.get(fd)
                if channel is None:
                    continue
                try:
                    data, fds = recv_fds(channel)
                except OSError:
                    data, fds = b"", []
                if not data:
                    channels.pop(channel.fileno()).close()
                    continue
                pid = _fork(json.loads(data), fds, channels, (wake_r, wake_w))
                for received in fds:
                    os.close(received)
                if pid:
                    owner[pid] = channel
                    _tell(channel, {"pid": pid})
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                asker = owner.pop(pid, None)
                if asker is not None and asker.fileno() in channels:
                    _tell(asker, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
    except BaseException:
        traceback.print_exc()
    os._exit(0)


def _tell(channel: socket.socket, msg: dict[str, int]) -> None:
    try:
        channel.send(json.dumps(msg).encode())
    except OSError:
        pass


def _fork(
    args: list[str], fds: list[int], channels: dict[int, socket.socket], wake: tuple[int, int]
) -> int:
    """Fork one mirror or shard; 0 if that failed (the requester hears nothing: it times out)."""
    mine: socket.socket | None = None
    theirs: socket.socket | None = None
    if args and args[0] == "_mirror":  # a mirror asks for its shards
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError:
        return 0
    if pid:
        if mine is not None and theirs is not None:
            theirs.close()
            channels[mine.fileno()] = mine
        return pid
    code = 1
    try:
        os.setsid()
        signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)  # until it handles them
        for sig in (*_CHILD_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for fd in wake:
            os.close(fd)
        for channel in channels.values():
            channel.close()
        if mine is not None and theirs is not None:
            mine.close()
            os.environ[ENV] = str(theirs.fileno())
        from ._cli import main

        code = main(_fill(args, fds))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        os._exit(code)
