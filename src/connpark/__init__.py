"""connpark: park idle TCP connections of heavy servers in a tiny container.

Layers, each importing only those below it:
  _cli / _demo                 command line and the basic line demo
  _service / _systemd / _metrics   serve as a service: sd_notify, socket activation, /metrics
  _supervisor                  --crash-recovery: one shard, its mirror, restarts, hot upgrade
  _container                   the trio daemon (sessions, routing, deadlines)
  _admit / _mirror             per-entry admission of parked fds; the mirror's codec and store
  _hook_* / aio / _worker      worker hooks (trio, threads, asyncio) over one sans-IO core
  _serving                     auto-responses and publish on parked sockets (non-blocking I/O)
  _lot / _tags                 the parking table: states, routing, deadlines, tags (no I/O)
  _autoresponse                the ping matcher over peeked bytes (no I/O)
  _watcher                     one epoll/kqueue instance for every parked fd
  _fdpass / _unixsock          SCM_RIGHTS send/recv; the control socket file
  _wire                        sans-IO protocol codec
  _errors                      the error hierarchy
"""

from ._config import ContainerConfig as ContainerConfig
from ._container import Container as Container
from ._container import serve as serve
from ._errors import ConnparkError as ConnparkError
from ._errors import ContainerError as ContainerError
from ._errors import ContainerLost as ContainerLost
from ._errors import ContainerTimeout as ContainerTimeout
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ParkingClosed as ParkingClosed
from ._errors import ParkRefused as ParkRefused
from ._errors import ProtocolError as ProtocolError
from ._errors import Refused as Refused
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._hook_blocking import BlockingParking as BlockingParking
from ._hook_trio import Parking as Parking
from ._hook_trio import WakeStream as WakeStream
from ._hook_trio import open_parking as open_parking
from ._stats import ContainerStats as ContainerStats
from ._stats import LatencySummary as LatencySummary
from ._wire import Reason as Reason
from ._wire import Refusal as Refusal
from ._wire import Rule as Rule
from ._wire import RuleKind as RuleKind
from ._worker import Backoff as Backoff
from ._worker import SendResult as SendResult
from ._worker import Woken as Woken

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "BlockingParking",
    "ConnparkError",
    "Container",
    "ContainerConfig",
    "ContainerError",
    "ContainerLost",
    "ContainerStats",
    "ContainerTimeout",
    "LatencySummary",
    "LocalProtocolError",
    "ParkRefused",
    "Parking",
    "ParkingClosed",
    "ProtocolError",
    "Reason",
    "Refusal",
    "Refused",
    "RemoteProtocolError",
    "Rule",
    "RuleKind",
    "SendResult",
    "WakeStream",
    "Woken",
    "__version__",
    "open_parking",
    "serve",
]
