"""``connpark serve --crash-recovery`` / ``--shards N``: the supervisor of N shards.

Processes::

    connpark serve (this: the fleet) ─┬─ mirror 0 (``_supervisor``) ── shard 0
                                      ├─ mirror 1 ── shard 1
                                      └─ ...

The fleet owns the control socket ``PATH`` (shard 0 listens on it) and one
socket per further shard, ``PATH.1`` ... (``shard_path``): workers connect to
``PATH``, learn the shard count from WELCOME (protocol v4) and keep a session
with every shard. Each shard's mirror holds a copy of that shard's parked fds,
so no process holds more than one shard's share: the fleet holds only the
listening sockets, which is what lets ``--shards`` grow past one process's fd
limit.

The fleet reads nothing from workers. It starts the mirrors (a mirror that
dies is started again; its shard hands its connections back to the workers
meanwhile), tells systemd (READY once every shard answers, STATUS with the
totals, WATCHDOG while every shard answers, RELOADING, STOPPING), serves
``/metrics``, and upgrades: on SIGHUP it re-execs itself with the code on
disk, then the new image upgrades each mirror in turn (each re-execs and
hands its shard over to a new one), then says READY.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import secrets
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from ._config import ContainerConfig
from ._errors import ConnparkError
from ._reexec import read_state, reexec
from ._service import keep_systemd_informed, status_line
from ._stats import ContainerStats, merge_stats
from ._stats_client import fetch_stats
from ._supervisor import SHARD_HANG, START_GRACE, ShardPlace, preflight
from ._systemd import Notifier
from ._unixsock import check_path, listen_unix, shard_path
from ._zygote import Spawner, open_pidfd, send_signal

LOGGER = logging.getLogger(__name__)
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: How long one mirror's upgrade (re-exec + a new shard) may take.
UPGRADE_TIMEOUT = 120.0
#: fds a shard keeps beside its connections: sessions, frames in flight, its own.
SHARD_OVERHEAD = 1024 + 64


def auto_shards(config: ContainerConfig) -> int:
    """``--shards auto``: one per core, and enough that ``max_parked`` fits the fd limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    per_shard = max(1024, hard - SHARD_OVERHEAD)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    need = math.ceil(config.max_parked / per_shard)
    if need > 255:
        raise ConnparkError(
            f"--shards auto: --max-parked {config.max_parked:,} needs {need} shards of"
            f" {per_shard:,} (the fd limit), over the 255 one container can run"
        )
    return max(cores or 1, need)


#: How far apart the first ticket epochs of one shard's successive mirrors are.
#: Odd, so 256 mirrors in turn start at 256 different epochs; and far, because a
#: mirror's shard takes the epochs after its first, one per generation.
MIRROR_EPOCH_STRIDE = 97


def next_mirror_epoch(epoch: int) -> int:
    """The first ticket epoch of the mirror after one that started at ``epoch``:
    not the tickets the dead mirror's shards issued (a random pick was once in
    256 the same), unless it went through 97 shard generations."""
    return (epoch + MIRROR_EPOCH_STRIDE) & 0xFF


class Fleet:
    """Starts a mirror (and so a shard) per shard index and keeps them running."""

    def __init__(
        self,
        config: ContainerConfig,
        shards: int = 1,
        *,
        log_args: Sequence[str] = (),
        notifier: Notifier | None = None,
        metrics: tuple[str, int] | None = None,
        spawner: Spawner | None = None,
    ) -> None:
        if not 1 <= shards <= 255:
            raise ConnparkError(f"--shards must be 1 to 255, not {shards}")
        self.config = config
        self.shards = shards
        self.log_args = list(log_args)
        self.notifier = notifier or Notifier(None)
        self.metrics = metrics
        #: Starts the mirrors: forked from our zygote (``run_fleet`` forks it).
        self.spawner = spawner or Spawner()
        self._listeners: list[socket.socket] = []
        #: The control socket came from systemd (socket activation): never unlinked.
        self._owns_path = True
        self._pids: list[int | None] = [None] * shards
        #: Each mirror's pidfd, held from its start (across our exec): the zygote
        #: reaps a mirror the moment it exits, so its pid alone may name another.
        self._pidfds: list[int | None] = [None] * shards
        #: Mirrors that outlived our re-exec, (pid, pidfd): taken over instead of started.
        self._adopt: list[tuple[int, int | None] | None] = [None] * shards
        self.generation = 1
        self.restarts = 0
        self.stopping = False
        self._exec_now = False
        self._upgrading = False
        self._keepers_scope: trio.CancelScope | None = None
        #: Per shard: its last answer and when it came (the watchdog's tolerance).
        self._last: list[ContainerStats | None] = [None] * shards
        self._answered: list[float] = [0.0] * shards
        self._started: list[float] = [time.monotonic()] * shards
        #: Each shard's next mirror's first ticket epoch (``next_mirror_epoch``).
        self._epochs = [secrets.randbelow(256) for _ in range(shards)]
        #: Zygotes of our images before an upgrade: they exit once their mirrors
        #: are upgraded, and we reap them.
        self._old_zygotes: list[int] = []
        #: A pipe only we write to (never, in fact): each mirror holds the read end
        #: and stops when we are gone (EOF). Made after the zygote, which must not
        #: hold the write end.
        self._lifeline: tuple[int, int] | None = None

    @property
    def paths(self) -> list[str]:
        return [shard_path(self.config.path, i) for i in range(self.shards)]

    def listen(self, inherited: socket.socket | None = None) -> None:
        """Bind every shard's socket now (or take systemd's): start-up errors surface here."""
        for path in self.paths:
            check_path(path)
        try:
            for i, path in enumerate(self.paths):
                if i == 0 and inherited is not None:
                    self._listeners.append(inherited)
                    self._owns_path = False
                else:
                    self._listeners.append(listen_unix(path, mode=self.config.socket_mode))
        except BaseException:
            self._close_listeners()
            raise

    def _close_listeners(self) -> None:
        for i, sock in enumerate(self._listeners):
            sock.close()
            if i or self._owns_path:
                try:
                    os.unlink(self.paths[i])
                except OSError:
                    pass
        self._listeners = []

    async def run(self) -> None:
        if not self._listeners:
            self.listen()
        try:
            while True:
                with trio.open_signal_receiver(*_SIGNALS) as signals:
                    # Blocked across an upgrade's exec: delivered to the receiver now.
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                    async with trio.open_nursery() as aux:
                        aux.start_soon(self._on_signals, signals, aux)
                        aux.start_soon(self._tell_systemd)
                        aux.start_soon(self._reap_old_zygotes)
                        if self._upgrading:  # we were re-executed: the mirrors' turn
                            aux.start_soon(self._upgrade_mirrors)
                        async with trio.open_nursery() as keepers:
                            self._keepers_scope = keepers.cancel_scope
                            for i in range(self.shards):
                                keepers.start_soon(self._keep, i)
                        aux.cancel_scope.cancel()
                if not self._exec_now:
                    break
                self._exec()  # returns only if the exec failed: carry on, not upgraded
                self._exec_now = False
                self._upgrading = False
                self.notifier.ready(self.notifier.last_status or "not upgraded")
        finally:
            if not self._exec_now:
                self._close_listeners()

    # -- mirrors ----------------------------------------------------------------

    async def _keep(self, i: int) -> None:
        """Run mirror ``i`` (start it, or take over the one that outlived our exec) for good."""
        delay = 0.0
        while True:
            adopted = self._adopt[i]
            self._adopt[i] = None
            if adopted is None:
                pid = self._spawn(i)
                pidfd = open_pidfd(pid)  # None: gone already (the zygote reaped it)
            else:
                pid, pidfd = adopted
            self._pids[i], self._pidfds[i] = pid, pidfd
            started = time.monotonic()
            if self.stopping:
                self._signal(i, signal.SIGTERM)
            if pidfd is not None:
                await trio.lowlevel.wait_readable(pidfd)  # cancelled: our exec keeps it
                os.close(pidfd)
            self._pidfds[i] = None
            code = self.spawner.reap(pid, wait=True)
            self._pids[i] = None
            if self.stopping:
                LOGGER.info("mirror %d stopped (exit %s)", i, code)
                return
            self.restarts += 1
            quick = time.monotonic() - started < 5.0
            delay = min(5.0, max(0.1, delay * 2)) if quick else 0.0
            LOGGER.error(
                "mirror %d died (exit %s): its shard hands its connections back to the"
                " workers; starting a new one%s",
                i,
                code,
                f" in {delay:g}s" if delay else "",
            )
            await trio.sleep(delay)

    def _spawn(self, i: int) -> int:
        listener = self._listeners[i]
        interval = self.notifier.watchdog_interval()
        place = ShardPlace(
            shard=i,
            shards=self.shards,
            fleet_pid=os.getpid(),
            hang_limit=min(SHARD_HANG, interval / 2) if interval else SHARD_HANG,
            epoch=self._epochs[i],
        )
        self._epochs[i] = next_mirror_epoch(self._epochs[i])
        if self._lifeline is None:
            self._lifeline = os.pipe()
        # Its share of max_parked: a hook tries another shard when one is full.
        share = math.ceil(self.config.max_parked / self.shards)
        config = attrs.evolve(self.config, path=self.paths[i], max_parked=share)
        args = [
            "_mirror",
            "--listen-fd",
            "@fd0",
            "--lifeline-fd",
            "@fd1",
            "--place-json",
            json.dumps(attrs.asdict(place)),
            "--config-json",
            json.dumps(attrs.asdict(config)),
            *self.log_args,
        ]
        # Started with our signals blocked (the mask survives fork and exec): a stop
        # sent while it starts waits for its handlers instead of killing it.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = self.spawner.spawn(args, [listener.fileno(), self._lifeline[0]])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._started[i] = time.monotonic()
        return pid

    def _signal(self, i: int, sig: int) -> None:
        send_signal(self._pids[i], self._pidfds[i], sig)

    async def _reap_old_zygotes(self) -> None:
        while self._old_zygotes:
            for pid in list(self._old_zygotes):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG
                except ChildProcessError:
                    done = pid
                if done:
                    self._old_zygotes.remove(pid)
            await trio.sleep(1.0)

    # -- signals, upgrade -----------------------------------------------------------

    async def _on_signals(self, signals: Any, nursery: trio.Nursery) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if self.stopping or self._upgrading:
                    LOGGER.warning("got SIGHUP: an upgrade or a stop is under way; ignored")
                    continue
                self._upgrading = True
                self.notifier.reloading()
                nursery.start_soon(self._upgrade)
                continue
            if not self.stopping:
                self.notifier.stopping("draining: the shards hand every connection back")
                LOGGER.info("got %s: stopping the shards", signal.Signals(signum).name)
            self.stopping = True
            for i in range(self.shards):
                self._signal(i, signal.SIGTERM)

    async def _upgrade(self) -> None:
        """Re-exec with the code on disk; the new image upgrades the mirrors."""
        problem = await trio.to_thread.run_sync(preflight)
        if problem:
            LOGGER.error("not upgrading: %s", problem)
            self._upgrading = False
            self.notifier.ready(self.notifier.last_status or "not upgraded")
            return
        if not self.stopping and self._keepers_scope is not None:
            self._exec_now = True
            self._keepers_scope.cancel()

    async def _upgrade_mirrors(self) -> None:
        """Each mirror re-execs and hands its shard over to a new one, in turn."""
        LOGGER.info("upgrade: supervisor re-executed; upgrading %d shard(s)", self.shards)
        for i in range(self.shards):
            if self.stopping:
                break
            old = await self._shard_pid(i)
            self._signal(i, signal.SIGHUP)
            deadline = time.monotonic() + UPGRADE_TIMEOUT
            while time.monotonic() < deadline and not self.stopping:
                await trio.sleep(0.05)
                now = await self._shard_pid(i)
                if now is not None and now != old:
                    break
            else:
                LOGGER.error("shard %d did not come back new within the upgrade timeout", i)
        LOGGER.info("upgrade: done (generation %d)", self.generation)
        self._upgrading = False

    async def _shard_pid(self, i: int) -> int | None:
        stats = await self._ask(i)
        pids = [p.pid for p in stats.processes if p.role == "shard"] if stats else []
        return pids[0] if pids else None

    def _exec(self) -> None:
        """Replace this process with the code on disk, keeping the sockets and mirrors."""
        state = {
            "config": attrs.asdict(self.config),
            "shards": self.shards,
            "notify_socket": self.notifier.address,
            "watchdog": self.notifier.watchdog_interval(),
            "owns_path": self._owns_path,
            "metrics": self.metrics,
            "log_args": self.log_args,
            "generation": self.generation + 1,
            "restarts": self.restarts,
            "listen_fds": [s.fileno() for s in self._listeners],
            "pids": self._pids,
            "pidfds": self._pidfds,
            "zygotes": [*self._old_zygotes, self.spawner.zygote_pid],
            "lifeline": self._lifeline,
        }
        keep = [s.fileno() for s in self._listeners]
        keep += [fd for fd in self._pidfds if fd is not None]
        keep += list(self._lifeline or ())
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            LOGGER.info("upgrade: re-executing the supervisor")
            reexec(state, keep, ["--fleet"])
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            LOGGER.error("upgrade of the supervisor failed, the running code carries on: %s", exc)
            self._adopt = [
                None if pid is None else (pid, pidfd)
                for pid, pidfd in zip(self._pids, self._pidfds, strict=True)
            ]

    # -- health, systemd, metrics ---------------------------------------------------

    async def _ask(self, i: int, within: float = 2.0) -> ContainerStats | None:
        try:
            stats = await trio.to_thread.run_sync(
                lambda: fetch_stats(self.paths[i], timeout=within, one_shard=True),
                abandon_on_cancel=True,
            )
        except (ConnparkError, OSError):
            return None
        self._last[i] = stats
        self._answered[i] = time.monotonic()
        return stats

    async def _ask_all(self) -> list[ContainerStats | None]:
        """Every shard at once, each within half a health tick (one slow shard must not
        use up the time the others need: ``keep_systemd_informed`` cancels at a tick)."""
        interval = self.notifier.watchdog_interval()
        within = min(2.0, interval / 4) if interval else 2.0
        got: list[ContainerStats | None] = [None] * self.shards

        async def one(i: int) -> None:
            got[i] = await self._ask(i, within)

        async with trio.open_nursery() as nursery:
            for i in range(self.shards):
                nursery.start_soon(one, i)
        return got

    async def _check(self) -> ContainerStats | None:
        """Healthy: every shard answered STATS, or is (re)starting (``START_GRACE``).

        A mirror kills a shard silent for its hang limit and starts a new one:
        a restart is not a hang, and must not make systemd's watchdog kill the
        processes that hold every connection.
        """
        if self.stopping:  # a connection now would socket-activate us again under systemd
            return None
        got: list[ContainerStats] = []
        now = time.monotonic()
        for i, stats in enumerate(await self._ask_all()):
            if stats is None:
                last = self._last[i]
                recent = max(self._answered[i], self._started[i])
                if last is None or now - recent > SHARD_HANG + START_GRACE:
                    return None
                stats = last
            got.append(stats)
        return merge_stats(got)

    async def _tell_systemd(self) -> None:
        """READY=1 once every shard answers (again, after an upgrade), then STATUS/WATCHDOG."""
        if not self.notifier.enabled:
            return
        while self._upgrading or (stats := await self._all_up()) is None:
            if self.notifier.watchdog_interval():
                self.notifier.watchdog()  # our own start is bounded by TimeoutStartSec
            await trio.sleep(0.05)
        self.notifier.ready(status_line(stats))
        await keep_systemd_informed(self.notifier, self._check)

    async def _all_up(self) -> ContainerStats | None:
        got = [stats for stats in await self._ask_all() if stats is not None]
        return merge_stats(got) if len(got) == self.shards else None

    def snapshots(self) -> list[tuple[str, ContainerStats]]:
        """For ``/metrics`` (called from its HTTP thread): each shard's statistics."""
        out = []
        for i, path in enumerate(self.paths):
            try:
                out.append((str(i), fetch_stats(path, timeout=2.0, one_shard=True)))
            except (ConnparkError, OSError):
                pass
        return out


def resume_fleet(state_fd: int) -> Fleet:
    """The new image after an upgrade's re-exec: the old one's sockets and mirrors."""
    state = read_state(state_fd)
    fleet = Fleet(
        ContainerConfig.from_mapping(state["config"]),
        state["shards"],
        log_args=state["log_args"],
        notifier=Notifier(state["notify_socket"], state["watchdog"]),
        metrics=tuple(state["metrics"]) if state["metrics"] else None,
    )
    fleet._owns_path = state["owns_path"]
    fleet.generation = state["generation"]
    fleet.restarts = state["restarts"]
    fleet._listeners = [socket.socket(fileno=fd) for fd in state["listen_fds"]]
    for sock in fleet._listeners:
        os.set_inheritable(sock.fileno(), False)
    pidfds = state.get("pidfds") or [None] * fleet.shards
    for fd in pidfds:
        if fd is not None:
            os.set_inheritable(fd, False)
    fleet._old_zygotes = [pid for pid in state.get("zygotes", ()) if pid]
    lifeline = state.get("lifeline")
    if lifeline:
        fleet._lifeline = (lifeline[0], lifeline[1])
        for fd in lifeline:
            os.set_inheritable(fd, False)
    fleet._adopt = [
        None if pid is None else (pid, pidfd)
        for pid, pidfd in zip(state["pids"], pidfds, strict=True)
    ]
    fleet._upgrading = True
    return fleet


def run_fleet(fleet: Fleet) -> None:
    """Fork the zygote, serve ``/metrics`` (if asked), run the fleet until it stops."""
    fleet.spawner = Spawner.start(close=[s.fileno() for s in fleet._listeners])
    server = None
    if fleet.metrics is not None:
        from ._metrics import MetricsServer

        server = MetricsServer(*fleet.metrics, fleet.snapshots)
    try:
        trio.run(fleet.run)
    finally:
        if server is not None:
            server.close()
