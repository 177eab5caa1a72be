"""Replace this process with the code on disk, keeping chosen fds: the hot upgrade's step.

The state goes in a memfd whose number is passed as ``--state-fd``; every fd in
``keep`` survives the exec at the same number. The caller blocks its signals
first (a stop in this window waits for the new image, or for us if the exec
fails) and handles the OSError of a failed exec: everything is as before.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any


def reexec(state: dict[str, Any], keep: Sequence[int], args: Sequence[str]) -> None:
    """``python -m connpark _resume ARGS --state-fd N``; returns only by raising OSError."""
    blob = -1
    try:
        blob = os.memfd_create("connpark-upgrade", 0)
        os.write(blob, json.dumps(state).encode())
        os.lseek(blob, 0, os.SEEK_SET)
        for fd in (*keep, blob):
            os.set_inheritable(fd, True)
        argv = [sys.executable, "-m", "connpark", "_resume", *args, "--state-fd", str(blob)]
        for handler in logging.getLogger("connpark").handlers:
            handler.flush()
        os.execv(sys.executable, argv)
    except OSError:
        if blob >= 0:
            os.close(blob)
        for fd in keep:
            os.set_inheritable(fd, False)
        raise


def read_state(state_fd: int) -> dict[str, Any]:
    """The new image's side: the state ``reexec`` passed."""
    with os.fdopen(state_fd, "rb") as f:
        state: dict[str, Any] = json.loads(f.read())
    return state
