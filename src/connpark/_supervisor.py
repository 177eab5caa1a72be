"""``connpark serve --crash-recovery``: a small supervisor, one container shard, the mirror.

The supervisor owns the control socket (the shard inherits the listening
fd, so workers that connect while a shard restarts wait in the backlog),
starts the shard, and holds the **mirror**: a second copy of every parked fd
and its record (``_mirror``), fed by the shard one message per batch. When
the shard dies (SIGKILL, a crash, the OOM killer), the supervisor starts a
new one and hands it every record and fd back: same tickets, same deadlines,
nothing lost; connections that were on their way to a worker wait in
quarantine until that worker reconnects and names them (HELLO v2 resume).

It reads nothing from workers: only its own shard's mirror messages.

What is not survived: the supervisor's own death (the shard then drains:
every parked connection goes back to its workers with SHUTDOWN, nothing is
lost while they are up) and the machine's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from ._config import ContainerConfig
from ._container import raise_nofile_limit
from ._fdpass import Outbox, recv_fds
from ._mirror import Decoder, Kind, Record, Store, encode_done, encode_records
from ._unixsock import listen_unix

LOGGER = logging.getLogger(__name__)
#: A shard that dies sooner than this after its start makes the next start wait.
_QUICK_DEATH = 5.0


class Supervisor:
    """Runs one shard at a time and restarts it with everything the mirror holds."""

    def __init__(self, config: ContainerConfig, *, log_args: Sequence[str] = ()) -> None:
        self.config = config
        self.log_args = list(log_args)
        self.store = Store()
        self.epoch = 0
        self.restarts = 0
        self.stopping = False
        self._signals = 0
        self._proc: trio.Process | None = None
        self._listener: socket.socket | None = None

    def listen(self) -> None:
        """Bind the control socket now: start-up errors surface before any task runs."""
        raise_nofile_limit()
        self._listener = listen_unix(self.config.path, mode=self.config.socket_mode)

    async def run(self) -> None:
        if self._listener is None:
            self.listen()
        listener = self._listener
        assert listener is not None
        delay = 0.0
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._on_signals, signals)
                    while not self.stopping:
                        started = time.monotonic()
                        code = await self._run_shard(listener)
                        if self.stopping:
                            LOGGER.info("shard stopped (exit %s)", code)
                            break
                        self.restarts += 1
                        self.epoch = (self.epoch + 1) & 0xFF
                        quick = time.monotonic() - started < _QUICK_DEATH
                        delay = min(5.0, max(0.1, delay * 2)) if quick else 0.0
                        LOGGER.error(
                            "shard died (exit %s); restarting it with the %d connections"
                            " the mirror holds%s",
                            code,
                            len(self.store),
                            f" in {delay:g}s" if delay else "",
                        )
                        await trio.sleep(delay)
                    nursery.cancel_scope.cancel()
        finally:
            self.store.close()
            listener.close()
            try:
                os.unlink(self.config.path)
            except OSError:
                pass

    async def _on_signals(self, signals: Any) -> None:
        async for signum in signals:
            self.stopping = True
            self._signals += 1
            LOGGER.info("got %s: stopping the shard", signal.Signals(signum).name)
            if self._proc is not None and self._proc.returncode is None:
                self._proc.send_signal(signal.SIGTERM)

    async def _run_shard(self, listener: socket.socket) -> int | None:
        """Start a shard, give it the mirror's records, keep the mirror until it exits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = json.dumps(attrs.asdict(self.config))
        argv = [
            sys.executable,
            "-m",
            "connpark",
            "_shard",
            "--listen-fd",
            str(listener.fileno()),
            "--mirror-fd",
            str(theirs.fileno()),
            "--epoch",
            str(self.epoch),
            "--config-json",
            config,
            *self.log_args,
        ]
        try:
            proc = await trio.lowlevel.open_process(
                argv,
                pass_fds=(listener.fileno(), theirs.fileno()),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we tell the shard
            )
        finally:
            theirs.close()
        self._proc = proc
        if self.stopping:
            proc.send_signal(signal.SIGTERM)
        ours.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_mirror, ours)
                await self._give_back(ours)
                await proc.wait()
                # The reader goes on to EOF: what the shard wrote before it died counts.
        finally:
            ours.close()
            self._proc = None
        return proc.returncode

    async def _give_back(self, sock: socket.socket) -> None:
        """RESTORE every record (its fd goes too; the mirror keeps its own copy), then DONE."""
        records: list[Record] = list(self.store.records.values())
        out = Outbox(own_fds=False)
        out.add(encode_records(Kind.RESTORE, records))
        out.add(encode_done())
        while out:
            try:
                out.send_some(sock)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
            except OSError as exc:
                LOGGER.error("could not hand the mirror to the shard: %s", exc)
                return

    async def _keep_mirror(self, sock: socket.socket) -> None:
        decoder = Decoder()
        try:
            while True:
                try:
                    data, fds = recv_fds(sock)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not data:
                    return
                decoder.receive_data(data, fds)
                for msg in decoder:
                    self.store.apply(msg)
        except (OSError, Exception) as exc:  # a broken mirror must not end the supervisor
            LOGGER.error("mirror stream from the shard broke: %s", exc)
        finally:
            decoder.close()


def receive_restore(sock: socket.socket, timeout: float = 60.0) -> list[Record]:
    """The shard's side, before it serves: every record the supervisor gives back."""
    sock.settimeout(timeout)
    decoder = Decoder()
    records: list[Record] = []
    try:
        while True:
            data, fds = recv_fds(sock)
            if not data:
                raise ConnectionError("the supervisor closed the mirror before DONE")
            decoder.receive_data(data, fds)
            for msg in decoder:
                if msg.kind is Kind.DONE:
                    return records
                records.extend(msg.records)
    finally:
        sock.settimeout(None)
        decoder.close()


def run_shard(config: ContainerConfig, *, listen_fd: int, mirror_fd: int, epoch: int) -> None:
    """The shard process: restore, then serve until SIGTERM (or the supervisor is gone)."""
    from ._container import Container

    mirror = socket.socket(fileno=mirror_fd)
    restore = receive_restore(mirror)
    container = Container(config, listen_fd=listen_fd, mirror=mirror, epoch=epoch, restore=restore)
    container.listen()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides

    async def watch_supervisor() -> None:
        await trio.lowlevel.wait_readable(mirror)  # it never writes again: EOF
        LOGGER.error("the supervisor is gone: draining")
        container.request_shutdown()

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for _ in signals:
                        container.request_shutdown()

                nursery.start_soon(on_signal)
                nursery.start_soon(watch_supervisor)
                await container.run()
                nursery.cancel_scope.cancel()

    trio.run(main)
