"""A growable array of fixed-size numbers in an anonymous memory map.

For the tables indexed by fd that grow with the connections held (the lot's
packed connections, the mirror's records). Why not ``array.array``: growing
one reallocs inside the malloc heap, and a shard or mirror shares that heap
with the zygote it was forked from; every step copies, and every page a copy
touches stops being shared. Measured with ``bench_million.py``: about 90 B per
connection of PSS. A map's pages cost nothing until first written (zeros
until then), and it grows with ``mremap`` (no copy) where there is one.
"""

from __future__ import annotations

import mmap
import struct
from typing import Literal

#: The element types the tables use.
Code = Literal["B", "H", "I", "i", "q", "Q"]

_MIN_ENTRIES = 1024


def _anonymous(size: int) -> mmap.mmap:
    # Private: a shared anonymous map is a fixed-size shmem object (growing it
    # with mremap faults past the old end) and would be shared with children.
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


class Column:
    """``view`` is a typed memoryview of ``len(self)`` zeroed entries; ``reserve``
    grows it (by doubling), after which a ``view`` taken before is stale."""

    __slots__ = ("_code", "_map", "_size", "view")

    def __init__(self, code: Code) -> None:
        self._code = code
        self._size = struct.calcsize(code)
        self._map: mmap.mmap | None = None
        self.view: memoryview[int] = memoryview(bytearray()).cast(code)

    def __len__(self) -> int:
        return len(self.view)

    def reserve(self, entries: int) -> None:
        """At least ``entries`` entries (new ones zero)."""
        have = len(self.view)
        if entries <= have:
            return
        want = max(entries, 2 * have, _MIN_ENTRIES) * self._size
        self.view.release()
        grown = self._map
        if grown is None:
            grown = _anonymous(want)
        else:
            try:
                grown.resize(want)  # mremap: the pages move, nothing is copied
            except (OSError, SystemError, ValueError, BufferError):
                # No mremap (macOS, BSD), or a view of the map still held
                # somewhere (it stays valid, and stale): a copy.
                old, grown = grown, _anonymous(want)
                grown[: len(old)] = old[:]
                try:
                    old.close()
                except BufferError:
                    pass  # unmapped when its last view goes
        self._map = grown
        self.view = memoryview(grown).cast(self._code)

    def close(self) -> None:
        """Unmap (the column is empty again)."""
        self.view.release()
        self.view = memoryview(bytearray()).cast(self._code)
        if self._map is not None:
            self._map.close()
            self._map = None
