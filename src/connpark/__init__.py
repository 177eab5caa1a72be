"""connpark: park idle TCP connections of heavy servers in a tiny container.

Layers, each importing only those below it:
  _cli / _demo                 command line and the basic line demo
  _container                   the trio daemon (sessions, routing, deadlines)
  _hook_*                      client hooks for workers (trio, blocking, asyncio)
  _watcher                     one epoll/kqueue instance for every parked fd
  _fdpass                      SCM_RIGHTS send/recv
  _wire                        sans-IO protocol codec
  _errors                      the error hierarchy
"""

from ._errors import ConnparkError as ConnparkError
from ._errors import ContainerError as ContainerError
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ParkingClosed as ParkingClosed
from ._errors import ParkRefused as ParkRefused
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._wire import Reason as Reason
from ._wire import Refusal as Refusal

__version__ = "0.1.0"

__all__ = [
    "ConnparkError",
    "ContainerError",
    "LocalProtocolError",
    "ParkRefused",
    "ParkingClosed",
    "ProtocolError",
    "Reason",
    "Refusal",
    "RemoteProtocolError",
    "__version__",
]
