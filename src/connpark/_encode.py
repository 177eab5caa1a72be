"""The container's hot-path encoders: WAKE and PARKED frames packed straight
from slots and results (docs/protocol.md, section 6), no message objects.

``tests/test_container_clock.py`` checks them against ``_wire.encode``.
"""

from __future__ import annotations

import struct
import sys
from array import array

from ._lot import INET6, Slot
from ._wire import DEFAULT_MAX_BODY, HEADER, MAX_FDS_PER_FRAME, Frame, MessageType

#: WAKE body bytes per frame, leaving room for the count.
_WAKE_BODY = DEFAULT_MAX_BODY - 64
_WAKE_ENTRY = struct.Struct("!QBBHI")
#: A WAKE frame's header and entry count.
_WAKE_HEAD = struct.Struct(HEADER.format + "H")
_HAS_FD = 1
_WAKE_INET6 = 2
_WAKE_EXT = 4
_HAS_FD_INET6 = _HAS_FD | _WAKE_INET6


def wake_frames(
    slots: list[Slot], budget: int, ext: bool = True
) -> tuple[list[Frame], list[list[Slot]], int]:
    """WAKE frames for the first of ``slots`` whose entries fit in ``budget`` bytes (at
    least one): (frames, the slots of each frame, how many slots they hold).

    A frame holds up to 253 entries and ``_WAKE_BODY`` bytes (at least one
    entry). ``ext``: the session speaks v3, so entries may carry auto-response
    counts and unsent bytes (``Extra.wake_ext``).
    """
    pack = _WAKE_ENTRY.pack
    inet6 = INET6
    frames: list[Frame] = []
    groups: list[list[Slot]] = []
    n = len(slots)
    start = total = 0  # the frame's first slot; entry bytes taken before it
    while start < n:
        limit = min(_WAKE_BODY - 2, budget - total)  # this frame's entry bytes
        group = slots[start : start + min(MAX_FDS_PER_FRAME, limit // _PLAIN_ENTRY)]
        if group and not [1 for x in group if x.token or x.pending or x.extra is not None]:
            # All plain (no bytes, no extension), the usual: built column by column.
            held = [x.fd for x in group]
            if min(held) >= 0:
                count = len(group)
                frames.append(Frame(_plain_wake(group), tuple(held)))
                groups.append(group)
                start += count
                total += count * _PLAIN_ENTRY
                continue
        parts: list[bytes] = [b""]  # [0]: the header and entry count, once known
        add = parts.append
        fds: list[int] = []
        keep = fds.append
        used = count = 0
        for x in slots[start : start + MAX_FDS_PER_FRAME]:
            token = x.token
            pending = x.pending
            if token or pending:
                tlen = len(token)
                plen = len(pending)
                entry = 16 + tlen + plen
                data = True
            else:
                tlen = plen = 0
                entry = 16
                data = False
            if x.extra is not None and ext:
                tail = x.extra.wake_ext()
                if tail is not None:
                    entry += len(tail)
            else:
                tail = None
            used += entry
            # Full: the frame (it has an entry), or the budget (some entry is taken).
            if used > limit and (count or (total and total + entry > budget)):
                used -= entry
                break
            fd = x.fd
            if fd >= 0:
                keep(fd)
                flags = _HAS_FD_INET6 if x.flags & inet6 else _HAS_FD
            else:
                flags = _WAKE_INET6 if x.flags & inet6 else 0
            if tail is None:
                add(pack(x.ticket, x.reason, flags, tlen, plen))
            else:
                add(pack(x.ticket, x.reason, flags | _WAKE_EXT, tlen, plen))
            if data:
                add(token)
                add(pending)
            if tail is not None:
                add(tail)
            count += 1
        if not count:
            break  # the budget is spent
        parts[0] = _WAKE_HEAD.pack(used + 2, MessageType.WAKE, 0, len(fds), count)
        frames.append(Frame(b"".join(parts), tuple(fds)))
        groups.append(slots[start : start + count])
        start += count
        total += used
    return frames, groups, start


#: A plain WAKE entry (fd, no token, pending or extension): 16 bytes.
_PLAIN_ENTRY = _WAKE_ENTRY.size
#: A slot's flags (< 256) -> a plain WAKE entry's flags byte.
_WAKE_FLAGS_OF = bytes(_HAS_FD_INET6 if f & INET6 else _HAS_FD for f in range(256))
_SWAP = sys.byteorder == "little"


def _plain_wake(group: list[Slot]) -> bytes:
    """A WAKE frame of plain entries (each 16 bytes: ticket, reason, flags, two
    zero lengths), written column by column into zeros: ~3x cheaper than an
    entry at a time, and the usual case of the hot path."""
    count = len(group)
    tickets = array("Q", [x.ticket for x in group])
    if _SWAP:
        tickets.byteswap()  # big-endian
    body = bytearray(_WAKE_HEAD.size + count * _PLAIN_ENTRY)
    _WAKE_HEAD.pack_into(body, 0, len(body) - HEADER.size, MessageType.WAKE, 0, count, count)
    with memoryview(body) as view, view[_WAKE_HEAD.size :] as entries:
        with entries.cast("Q") as q:
            q[0::2] = tickets
        entries[8::_PLAIN_ENTRY] = bytes([x.reason for x in group])
        entries[9::_PLAIN_ENTRY] = bytes([x.flags for x in group]).translate(_WAKE_FLAGS_OF)
    return bytes(body)


def wake_frame(slots: list[Slot], ext: bool = True) -> Frame:
    """One WAKE frame for these slots (the caller keeps them within one frame)."""
    return wake_frames(slots, len(slots) * _WAKE_BODY, ext)[0][0]


# (The hot paths read a field of each slot with a list comprehension, not
# ``map(operator.attrgetter(...))``: a slot attribute is specialized bytecode,
# attrgetter's is a generic lookup, twice the cost.)

#: PARKED layouts by entry count (at most 253: one per fd of a PARK frame).
_PARKED: dict[int, struct.Struct] = {}


def parked_frame_flat(request_id: int, flat: list[int]) -> Frame:
    """One PARKED frame from ``[refusal, ticket, refusal, ticket, ...]``, one pair
    per entry of one PARK frame: one ``pack`` for them all."""
    n = len(flat) // 2
    layout = _PARKED.get(n)
    if layout is None:
        layout = _PARKED[n] = struct.Struct("!II" + "BQ" * n)
    body = layout.pack(request_id, n, *flat)
    return Frame(HEADER.pack(len(body), MessageType.PARKED, 0, 0) + body)


def parked_frame(request_id: int, results: list[tuple[int, int]]) -> Frame:
    """One PARKED frame: (refusal, ticket) per entry of one PARK frame."""
    return parked_frame_flat(request_id, [v for pair in results for v in pair])
