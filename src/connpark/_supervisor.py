"""The mirror process of one shard (``connpark serve --crash-recovery``, ``--shards``).

The fleet supervisor (``_fleet``) starts one of these per shard. It holds the
**mirror**: a second copy of every parked fd of its shard and its record
(``_mirror``), fed by the shard one message per batch, and runs the shard
itself. The shard inherits the shard's listening fd from us (and we from the
fleet), so workers that connect while a shard restarts wait in the backlog.
When the shard dies (SIGKILL, a crash, the OOM killer), the mirror starts a
new one and hands it every record and fd back: same tickets, same deadlines,
nothing lost; connections that were on their way to a worker wait in
quarantine until that worker reconnects and names them (HELLO v2 resume).
SIGHUP upgrades: re-exec with the code on disk, then a new shard.

It reads nothing from workers: only its own shard's mirror messages.

What is not survived: a mirror's own death (its shard then drains: every
parked connection goes back to its workers with SHUTDOWN, nothing is lost
while they are up) and the machine's.
"""

from __future__ import annotations

import base64
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
from ._errors import ConnparkError
from ._fdpass import Outbox, recv_fds
from ._lot import EPOCH_SHIFT
from ._mirror import Decoder, Kind, Record, Store, encode_done, encode_records
from ._reexec import read_state, reexec
from ._stats import ContainerStats, ProcessInfo
from ._stats_client import fetch_stats
from ._zygote import Spawner, has_exited, open_pidfd, send_signal

LOGGER = logging.getLogger(__name__)
#: A shard that dies sooner than this after its start makes the next start wait.
_QUICK_DEATH = 5.0
#: ``_run_shard``'s answer when the supervisor must re-exec itself now.
_EXEC = -1000


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: How long a starting shard counts as healthy without answering (see ``_check``).
START_GRACE = 15.0
#: A shard silent this long (or half the systemd watchdog interval) is killed and restarted.
SHARD_HANG = 10.0
_SHARD_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def preflight() -> str | None:
    """Does the code on disk start? None if so, else the reason (one line)."""
    check = "import connpark._cli, connpark._supervisor, connpark._container"
    try:
        out = subprocess.run(
            [sys.executable, "-c", check], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the code on disk does not start: {exc}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"the code on disk does not start: {last}"
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@attrs.frozen
class ShardPlace:
    """Which shard a mirror runs, and what it tells its shard about the fleet."""

    shard: int = 0
    shards: int = 1
    #: The fleet supervisor's pid, and the mirror's, for ``stats``' process list.
    fleet_pid: int = 0
    mirror_pid: int = 0
    #: A shard silent this long is killed (``SHARD_HANG``, or half systemd's watchdog).
    hang_limit: float = SHARD_HANG
    #: The first ticket epoch (the fleet picks one per mirror it starts, so that a
    #: new mirror's shard does not issue the tickets a dead one did).
    epoch: int = 0


class Supervisor:
    """Runs one shard at a time and restarts it with everything the mirror holds."""

    def __init__(
        self,
        config: ContainerConfig,
        listener: socket.socket,
        *,
        place: ShardPlace = ShardPlace(),
        log_args: Sequence[str] = (),
        spawner: Spawner | None = None,
        lifeline: int = -1,
    ) -> None:
        #: ``config.path`` is our shard's own path (``shard_path``).
        self.config = config
        self.place = place
        self.log_args = list(log_args)
        self._listener = listener
        #: Starts our shard: forked from the zygote that forked us, if any.
        self.spawner = spawner or Spawner()
        self._path_warned = False
        #: The socket file (inode, device) through which the shard last answered.
        self._answered_via: tuple[int, int] | None = None
        #: The read end of a pipe only the fleet can write to: EOF when it is gone.
        self.lifeline = lifeline
        self.store = Store()
        self.epoch = place.epoch & 0xFF
        self.restarts = 0
        self.stopping = False
        self._shard_pid: int | None = None
        self._shard_pidfd: int | None = None
        #: A shard that outlived our re-exec: (pid, our end of its mirror, decoder leftovers).
        #: (pid, pidfd, our end of its mirror, decoder leftovers, their fds).
        self._adopted: tuple[int, int | None, socket.socket, bytes, list[int]] | None = None
        #: SIGHUP: re-exec with the code on disk, then hand the shard over to a new one.
        self._upgrade = trio.Event()
        self._handover = False
        self._mirror_decoder: Decoder | None = None
        self._mirror_sock: socket.socket | None = None
        self._exec_pid = 0
        self._exec_pidfd: int | None = None
        #: When the current shard was started (``_check``'s start-up grace).
        self._spawned_at = time.monotonic()
        self._last_stats: ContainerStats | None = None
        #: When ``_check`` last had a healthy answer (shared by its callers).
        self._answered_at = 0.0
        #: The current shard has answered since it was started.
        self._up = False
        self._stop_requested = trio.Event()
        #: How many times this supervisor was executed (1 + upgrades).
        self.generation = 1

    async def run(self) -> None:
        raise_nofile_limit()
        listener = self._listener
        delay = 0.0
        execed = False
        try:
            with trio.open_signal_receiver(*_SIGNALS) as signals:
                # Blocked across an upgrade's exec (a signal in that window must
                # not kill us): delivered to the receiver now.
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._on_signals, signals)
                    nursery.start_soon(self._watch_shard)
                    if self.lifeline >= 0:
                        nursery.start_soon(self._watch_fleet)
                    if self._adopted is not None:  # we were re-executed: finish the upgrade
                        LOGGER.info(
                            "upgrade: mirror of shard %d re-executed (generation %d),"
                            " %d connections mirrored; handing the shard over",
                            self.place.shard,
                            self.generation,
                            len(self.store),
                        )
                        self._handover = True
                    drains = 0
                    while True:
                        started = time.monotonic()
                        code = await self._run_shard(listener)
                        if code == _EXEC:
                            execed = True
                            self._exec(listener)  # returns only if exec failed
                            execed = False
                            continue
                        self.epoch = self._next_epoch()
                        if self.stopping:
                            # A shard that died before it drained leaves connections
                            # in the mirror: a new one drains them (SHUTDOWN wakes).
                            if not len(self.store) or drains >= 3:
                                LOGGER.info("shard stopped (exit %s)", code)
                                break
                            drains += 1
                            LOGGER.warning(
                                "shard exited (%s) before it drained; a new one hands back"
                                " the %d connections the mirror holds",
                                code,
                                len(self.store),
                            )
                            continue
                        if self._handover:
                            self._handover = False
                            LOGGER.info(
                                "upgrade: starting a new shard with the %d connections"
                                " the mirror holds",
                                len(self.store),
                            )
                            continue
                        self.restarts += 1
                        quick = time.monotonic() - started < _QUICK_DEATH
                        delay = min(5.0, max(0.1, delay * 2)) if quick else 0.0
                        LOGGER.error(
                            "shard died (exit %s); restarting it with the %d connections"
                            " the mirror holds%s",
                            code,
                            len(self.store),
                            f" in {delay:g}s" if delay else "",
                        )
                        with trio.move_on_after(delay):
                            await self._stop_requested.wait()  # a stop drains at once
                    nursery.cancel_scope.cancel()
        finally:
            if not execed:
                self.store.close()
                listener.close()

    def _next_epoch(self) -> int:
        """The next shard's ticket epoch: one no mirrored ticket uses (tickets stay unique)."""
        used = {r.ticket >> EPOCH_SHIFT for r in self.store.records()}
        for step in range(1, 257):
            epoch = (self.epoch + step) & 0xFF
            if epoch not in used:
                return epoch
        raise ConnparkError("every ticket epoch is in use")  # 256 generations parked at once

    async def _watch_fleet(self) -> None:
        """The fleet died (SIGKILL, a crash): stop, as on SIGTERM. Our shard hands every
        connection back to its workers, and nothing is left behind that a new
        ``connpark serve`` would have to find and kill."""
        await trio.lowlevel.wait_readable(self.lifeline)
        if not self.stopping:
            LOGGER.error("the supervisor is gone: stopping the shard (it drains)")
            self.stopping = True
            self._stop_requested.set()
            self._signal_shard(signal.SIGTERM)

    async def _on_signals(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if self.stopping or self._upgrade.is_set() or self._handover:
                    LOGGER.warning("got SIGHUP: an upgrade or a stop is under way; ignored")
                    continue
                LOGGER.info("got SIGHUP: upgrading (re-exec, then a new shard)")
                self._upgrade.set()
                continue
            self.stopping = True
            self._stop_requested.set()
            LOGGER.info("got %s: stopping the shard", signal.Signals(signum).name)
            self._signal_shard(signal.SIGTERM)

    async def _check(self) -> ContainerStats | None:
        """Healthy: the shard answered STATS in time (the watchdog's condition).

        While a shard starts (at most ``START_GRACE`` s after its spawn) the last
        answer stands in: a restart is not a hang, and must not make systemd's
        watchdog kill the supervisor that holds every connection.
        """
        if self.stopping:  # a connection now would socket-activate us again under systemd
            return self._last_stats
        try:
            stats = await trio.to_thread.run_sync(
                lambda: fetch_stats(self.config.path, timeout=2.0, one_shard=True),
                abandon_on_cancel=True,
            )
        except (ConnparkError, OSError):
            starting = not self._up and time.monotonic() - self._spawned_at < START_GRACE
            if starting and self._last_stats is not None:
                self._answered_at = time.monotonic()
                return self._last_stats
            return None
        self._last_stats = stats
        self._up = True
        self._answered_at = time.monotonic()
        return stats

    async def _watch_shard(self) -> None:
        """A shard that stops answering (hung, stopped) is killed, and so restarted
        from the mirror: before systemd's watchdog would take everything down."""
        limit = self.place.hang_limit
        tick = min(1.0, limit / 4)
        answered = time.monotonic()
        while True:
            await trio.sleep(tick)
            if time.monotonic() - self._answered_at < tick:
                answered = self._answered_at  # the systemd task asked just now: no 2nd STATS
            elif await self._check() is not None:
                answered = time.monotonic()
                self._answered_via = self._path_id()
            elif time.monotonic() - answered > limit and self._shard_pid is not None:
                busy = self.stopping or self._upgrade.is_set() or self._handover
                if not busy and self._path_is_ours():
                    LOGGER.error("the shard has not answered for %gs: killing it", limit)
                    self._signal_shard(signal.SIGKILL)
                answered = time.monotonic()

    def _path_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.config.path)
        except OSError:
            return None
        return st.st_ino, st.st_dev

    def _path_is_ours(self) -> bool:
        """Is the socket file the one our shard answered through? If it was removed
        or replaced, silence proves nothing: the shard is not killed for it."""
        if self._answered_via is None or self._path_id() == self._answered_via:
            self._path_warned = False
            return True
        if not self._path_warned:
            self._path_warned = True
            LOGGER.error(
                "%s no longer names our socket (removed or replaced): the shard cannot be"
                " checked, and is not restarted for not answering there",
                self.config.path,
            )
        return False

    def _signal_shard(self, sig: int) -> None:
        send_signal(self._shard_pid, self._shard_pidfd, sig)

    async def _run_shard(self, listener: socket.socket) -> int | None:
        """Start (or adopt) a shard, keep its mirror until it exits; its exit code.

        ``_EXEC`` instead: SIGHUP came, the mirror is quiet, re-exec now.
        """
        if self._adopted is not None:
            pid, pidfd, ours, leftover, fds = self._adopted
            self._adopted = None
            decoder = Decoder()
            decoder.receive_data(leftover, fds)
        else:
            pid, pidfd, ours = await self._spawn(listener)
            decoder = Decoder()
        self._shard_pid, self._shard_pidfd = pid, pidfd
        if self.stopping:
            self._signal_shard(signal.SIGTERM)
        elif self._handover:
            self._signal_shard(signal.SIGUSR1)  # the old shard: exit, the mirror has it all
        try:
            if pidfd is not None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_mirror, ours, decoder)
                    nursery.start_soon(self._upgrade_when_asked, nursery.cancel_scope)
                    await trio.lowlevel.wait_readable(pidfd)
                    nursery.cancel_scope.cancel()
            running = pidfd is not None and not has_exited(pidfd)
            if self._upgrade.is_set() and not self.stopping and running:
                self._mirror_sock, self._mirror_decoder = ours, decoder
                self._exec_pid, self._exec_pidfd = pid, pidfd
                return _EXEC
            # The shard is gone: the reader goes on to EOF, what it wrote before counts.
            await self._drain_mirror(ours, decoder)
            return self._reap(pid, wait=True)
        finally:
            if pidfd is not None and self._exec_pidfd != pidfd:
                os.close(pidfd)
            if self._mirror_sock is not ours:
                ours.close()
                decoder.close()
            self._shard_pid = self._shard_pidfd = None

    async def _upgrade_when_asked(self, scope: trio.CancelScope) -> None:
        await self._upgrade.wait()
        scope.cancel()

    def _reap(self, pid: int, *, wait: bool) -> int | None:
        """The shard's exit code (negative: killed by that signal), or None if it runs."""
        return self.spawner.reap(pid, wait=wait)

    async def _spawn(self, listener: socket.socket) -> tuple[int, int | None, socket.socket]:
        """Start a shard: its pid, a pidfd (held from now on, across our upgrade's exec:
        the zygote reaps it the moment it exits), our end of its mirror."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        place = attrs.evolve(self.place, mirror_pid=os.getpid())
        args = [
            "_shard",
            "--listen-fd",
            "@fd0",
            "--mirror-fd",
            "@fd1",
            "--epoch",
            str(self.epoch),
            "--generation",
            str(self.generation),
            "--place-json",
            json.dumps(attrs.asdict(place)),
            "--config-json",
            json.dumps(attrs.asdict(self.config)),
            *self.log_args,
        ]
        # The shard starts with SIGTERM/SIGUSR1 blocked (the mask survives fork and
        # exec) and unblocks them once it can handle them: a stop or a hand-over
        # sent while it starts waits for it instead of killing it.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SHARD_SIGNALS)
        try:
            pid = self.spawner.spawn(args, [listener.fileno(), theirs.fileno()])
            pidfd = open_pidfd(pid)  # None: dead already
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            theirs.close()
        self._spawned_at = time.monotonic()
        self._up = False
        ours.setblocking(False)
        await self._give_back(ours)
        return pid, pidfd, ours

    async def _drain_mirror(self, sock: socket.socket, decoder: Decoder) -> None:
        with trio.move_on_after(10):
            await self._keep_mirror(sock, decoder)

    def _exec(self, listener: socket.socket) -> None:
        """Replace this process with the code on disk, keeping every fd and the shard."""
        sock, decoder = self._mirror_sock, self._mirror_decoder
        assert sock is not None
        assert decoder is not None
        leftover, pending_fds = decoder.detach()
        records = self.store.records()
        state = {
            "place": attrs.asdict(self.place),
            "lifeline": self.lifeline,
            "config": attrs.asdict(self.config),
            "log_args": self.log_args,
            "epoch": self.epoch,
            "restarts": self.restarts,
            "listen_fd": listener.fileno(),
            "mirror_fd": sock.fileno(),
            "shard_pid": self._exec_pid,
            "shard_pidfd": self._exec_pidfd,
            "generation": self.generation + 1,
            "leftover": base64.b64encode(leftover).decode(),
            "pending_fds": pending_fds,
            "records": [
                [
                    r.ticket,
                    r.fd,
                    r.deadline_ms,
                    r.flags,
                    r.pool,
                    _b64(r.token),
                    _b64(r.pending),
                    r.woken,
                ]
                for r in records
            ],
        }
        keep = [listener.fileno(), sock.fileno(), *pending_fds, *(r.fd for r in records)]
        if self.lifeline >= 0:
            keep.append(self.lifeline)
        if self._exec_pidfd is not None:
            keep.append(self._exec_pidfd)
        # From here a stop waits (pending) for the new image, or for us if exec fails.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            problem = preflight()
            if problem:
                raise OSError(problem)
            LOGGER.info("upgrade: re-executing the mirror (%d mirrored)", len(records))
            reexec(state, keep, [])  # signals stay blocked until the new image listens
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            LOGGER.error("upgrade failed, the running code carries on: %s", exc)
            # The same shard goes on, with the same mirror stream.
            self._adopted = (self._exec_pid, self._exec_pidfd, sock, leftover, pending_fds)
            self._exec_pidfd = None
            self._mirror_sock = self._mirror_decoder = None
            self._upgrade = trio.Event()

    async def _give_back(self, sock: socket.socket) -> None:
        """RESTORE every record (its fd goes too; the mirror keeps its own copy), then DONE."""
        records: list[Record] = self.store.records()
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

    async def _keep_mirror(self, sock: socket.socket, decoder: Decoder) -> None:
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


def resume_supervisor(state_fd: int) -> Supervisor:
    """The new image after an upgrade's re-exec: the old one's state, fds and shard."""
    state = read_state(state_fd)
    sup = Supervisor(
        ContainerConfig.from_mapping(state["config"]),
        socket.socket(fileno=state["listen_fd"]),
        place=ShardPlace(**state["place"]),
        log_args=state["log_args"],
        lifeline=state.get("lifeline", -1),
    )
    sup.epoch = state["epoch"]
    sup.restarts = state["restarts"]
    sup.generation = state["generation"]
    mirror = socket.socket(fileno=state["mirror_fd"])
    mirror.setblocking(False)
    for ticket, fd, deadline, flags, pool, token, pending, woken in state["records"]:
        token_b, pending_b = base64.b64decode(token), base64.b64decode(pending)
        record = Record(ticket, fd, deadline, flags, pool, token_b, pending_b, woken)
        sup.store.add(record)
    pidfd = state["shard_pidfd"]
    fds = [sup._listener.fileno(), mirror.fileno(), *state["pending_fds"]]
    fds += [] if pidfd is None else [pidfd]
    fds += [] if sup.lifeline < 0 else [sup.lifeline]
    fds += [r.fd for r in sup.store.records()]
    for fd in fds:
        os.set_inheritable(fd, False)
    leftover = base64.b64decode(state["leftover"])
    sup._adopted = (state["shard_pid"], pidfd, mirror, leftover, list(state["pending_fds"]))
    return sup


def run_supervisor(supervisor: Supervisor) -> None:
    """Run the mirror (and its shard) until it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the fleet decides
    trio.run(supervisor.run)


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


def run_shard(
    config: ContainerConfig,
    *,
    listen_fd: int,
    mirror_fd: int,
    epoch: int,
    generation: int = 1,
    place: ShardPlace = ShardPlace(),
) -> None:
    """The shard process: restore, then serve until SIGTERM (or its mirror is gone)."""
    from ._container import Container

    mirror = socket.socket(fileno=mirror_fd)
    restore = receive_restore(mirror)
    keepers = (
        ProcessInfo("supervisor", place.fleet_pid),
        ProcessInfo("mirror", place.mirror_pid or os.getppid(), place.shard, generation=generation),
    )
    container = Container(
        config,
        listen_fd=listen_fd,
        mirror=mirror,
        epoch=epoch,
        restore=restore,
        shard=place.shard,
        shards=place.shards,
        keepers=keepers,
    )
    container.listen()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides

    async def watch_supervisor() -> None:
        await trio.lowlevel.wait_readable(mirror)  # it never writes again: EOF
        LOGGER.error("our mirror is gone: draining")
        container.request_shutdown()

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGUSR1) as signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SHARD_SIGNALS)
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for signum in signals:
                        if signum == signal.SIGUSR1:  # an upgrade: our successor takes over
                            container.hand_over()
                        container.request_shutdown()

                nursery.start_soon(on_signal)
                nursery.start_soon(watch_supervisor)
                await container.run()
                nursery.cancel_scope.cancel()

    trio.run(main)
