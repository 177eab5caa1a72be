"""``connpark serve`` as a service: systemd notifications, socket activation, ``/metrics``.

The pieces a supervisor reuses, each small:

- ``control_socket(listen_fds())``: the control socket systemd handed us, or None.
- ``keep_systemd_informed(notifier, check)``: a task sending ``STATUS=`` when it
  changes and ``WATCHDOG=1`` each time ``check()`` answers in time. ``check`` is
  the health check: an async callable returning a ``ContainerStats`` (healthy;
  also the source of STATUS) or None (not healthy: no ping this time).
- ``status_line(stats)``: the one line systemd shows for us.
- ``run_serve(config, metrics=...)``: today's single-container ``serve`` with all
  of the above around it (READY=1 once the control socket listens, STOPPING=1
  when the drain starts, RELOADING=1 + READY=1 around SIGHUP).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import attrs
import trio

from ._config import ContainerConfig
from ._container import Container
from ._errors import ConnparkError
from ._stats import ContainerStats
from ._systemd import Notifier, listen_fds

LOGGER = logging.getLogger(__name__)

#: Healthy: a snapshot (STATUS= is made of it). Not healthy: None.
HealthCheck = Callable[[], Awaitable["ContainerStats | None"]]
#: The name connpark.socket gives the control socket (FileDescriptorName=).
CONTROL_FD_NAME = "control"


def status_line(stats: ContainerStats) -> str:
    """What ``systemctl status`` shows on its Status: line."""
    workers = stats.sessions - stats.pools.get("_stats", 0)  # not the askers, us included
    text = (
        f"parked {stats.parked}, queued {stats.queued}, un-ACKed {stats.unacked}, "
        f"sessions {workers}"
    )
    return "draining: " + text if stats.shutting_down else text


def control_socket(inherited: Sequence[tuple[str, socket.socket]]) -> socket.socket | None:
    """The inherited control socket: the one named ``control``, else the only one.

    It must be a listening AF_UNIX stream socket (``ListenStream=/path``). Any
    other inherited socket is closed (our copy only: systemd keeps its own).
    """
    if not inherited:
        return None
    named = [sock for name, sock in inherited if name == CONTROL_FD_NAME]
    if len(named) > 1 or (not named and len(inherited) > 1):
        for _, sock in inherited:
            sock.close()
        names = ", ".join(name for name, _ in inherited)
        raise ConnparkError(
            f"systemd passed {len(inherited)} sockets ({names}); "
            f"name the control socket with FileDescriptorName={CONTROL_FD_NAME}"
        )
    chosen = named[0] if named else inherited[0][1]
    for name, sock in inherited:
        if sock is not chosen:
            LOGGER.warning("closing socket %r from systemd: only %r is used", name, CONTROL_FD_NAME)
            sock.close()
    listening = chosen.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if chosen.family != socket.AF_UNIX or chosen.type != socket.SOCK_STREAM or not listening:
        what = f"{chosen.family.name} {chosen.type.name}{'' if listening else ', not listening'}"
        chosen.close()
        raise ConnparkError(
            f"the control socket from systemd must be a listening unix stream socket "
            f"(ListenStream=/path), got {what}"
        )
    return chosen


async def keep_systemd_informed(
    notifier: Notifier,
    check: HealthCheck,
    *,
    status_every: float = 2.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """STATUS= on change and WATCHDOG=1 while ``check()`` answers within each tick.

    A tick is half the watchdog interval (or ``status_every`` without a watchdog,
    or if shorter). A check that takes longer than a tick counts as unhealthy:
    that tick sends no ping. If the loop itself stalls, this task does not run and
    no ping goes out either, which is the point.
    """
    task_status.started()
    interval = notifier.watchdog_interval()
    tick = min(status_every, interval / 2) if interval else status_every
    healthy = True
    deadline = trio.current_time()
    while True:
        stats: ContainerStats | None = None
        with trio.move_on_after(tick):
            stats = await check()
        if stats is None:
            if healthy:
                LOGGER.warning("health check failed: no WATCHDOG=1 until it passes again")
            healthy = False
        else:
            if not healthy:
                LOGGER.info("health check passes again")
            healthy = True
            if interval:
                notifier.watchdog()
            text = status_line(stats)
            if text != notifier.last_status:
                notifier.status(text)
        deadline = max(deadline + tick, trio.current_time())
        await trio.sleep_until(deadline)


def container_check(container: Container) -> HealthCheck:
    """A single container's health: the loop ran this check, so it is not stalled."""

    async def check() -> ContainerStats | None:
        return container.stats()

    return check


def run_serve(config: ContainerConfig, *, metrics: tuple[str, int] | None = None) -> int:
    """``connpark serve``: one container, told to systemd and served on ``/metrics``."""
    notifier = Notifier.from_environ()
    inherited = control_socket(listen_fds())
    if inherited is not None:
        path = os.fsdecode(inherited.getsockname())
        if path != config.path:
            LOGGER.info("using systemd's control socket %s", path)
        config = attrs.evolve(config, path=path)
    token: list[trio.lowlevel.TrioToken] = []
    container = Container(config)

    def snapshots() -> list[tuple[str, ContainerStats]]:
        if not token:
            return []
        try:
            return [("0", trio.from_thread.run_sync(container.stats, trio_token=token[0]))]
        except trio.RunFinishedError:
            return []

    server = None
    try:
        if metrics is not None:
            from ._metrics import MetricsServer

            server = MetricsServer(*metrics, snapshots)
        container.listen(inherited)  # start-up errors: one line, no trio traceback
        inherited = None
        trio.run(_serve, container, notifier, token)
    finally:
        if inherited is not None:
            inherited.close()
        if server is not None:
            server.close()
    return 0


async def _serve(
    container: Container, notifier: Notifier, token: list[trio.lowlevel.TrioToken]
) -> None:
    token.append(trio.lowlevel.current_trio_token())
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, signals, container, notifier)
            await nursery.start(_run_container, container, nursery.cancel_scope)
            notifier.ready(status_line(container.stats()))
            if notifier.enabled:
                nursery.start_soon(keep_systemd_informed, notifier, container_check(container))


async def _run_container(
    container: Container,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Container] = trio.TASK_STATUS_IGNORED,
) -> None:
    await container.run(task_status=task_status)
    scope.cancel()


async def _on_signals(
    signals: AsyncIterator[int], container: Container, notifier: Notifier
) -> None:
    draining = False
    async for signum in signals:
        if signum == signal.SIGHUP:
            # The hot upgrade (issue 10) hooks in here; for now a reload changes nothing.
            notifier.reloading()
            LOGGER.info("got SIGHUP: reload requested; nothing to reload in this version")
            notifier.ready(status_line(container.stats()))
            continue
        LOGGER.info(
            "got %s: draining (again to stop waiting for ACKs)", signal.Signals(signum).name
        )
        if not draining:
            draining = True
            stats = container.stats()
            notifier.stopping(f"draining: waking {stats.parked} parked connections")
        container.request_shutdown()
