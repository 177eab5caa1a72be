"""Tags on parked connections: pool + tag -> the parked slots that carry it. No I/O.

A park may carry a few short tags (``room:42``); ``Send``, and UNPARK/CLOSE
by tag, find every parked connection of the pool with that tag. Only PARKED
slots are indexed: the parking table drops a slot from the index the moment
it leaves PARKED (woken, closed), so the index never outgrows what is
parked. A tag's bytes are stored once (the index's key object) however many
connections carry it.
"""

from __future__ import annotations

from typing import Any

#: Defaults, each a per-entry PARK refusal past it (``too-many-tags``, ``tag-too-large``).
MAX_TAGS = 8
MAX_TAG_LEN = 64


class _Members(set[Any]):
    """The parked slots with one tag, and the tag's one shared bytes object."""

    __slots__ = ("tag",)

    def __init__(self, tag: bytes) -> None:
        super().__init__()
        self.tag = tag


class TagIndex:
    """Per pool name: tag -> parked slots. Slots keep their tags in ``slot.extra.tags``.

    A tag only one connection carries (``user:17``) maps to the slot itself,
    not to a set: a set costs about 200 B, which would double the price of a
    parked connection with a per-user tag.
    """

    def __init__(self) -> None:
        self._pools: dict[str, dict[bytes, Any]] = {}
        #: Parked slots with at least one tag.
        self.tagged = 0

    def add(self, pool: str, tags: tuple[bytes, ...], slot: Any) -> tuple[bytes, ...]:
        """Index ``slot`` under ``tags``; returns the tags as shared objects where a set
        already holds one (a tag of one connection stays that connection's object)."""
        index = self._pools.setdefault(pool, {})
        self.tagged += bool(tags)
        shared = []
        for tag in tags:
            members = index.get(tag)
            if members is None:
                index[tag] = slot
            elif isinstance(members, _Members):
                members.add(slot)
                tag = members.tag
            else:  # the second connection with this tag: now a set
                both = index[tag] = _Members(tag)
                both.add(members)
                both.add(slot)
            shared.append(tag)
        return tuple(shared)

    def discard(self, pool: str, tags: tuple[bytes, ...], slot: Any) -> None:
        index = self._pools.get(pool)
        if index is None:
            return
        self.tagged -= bool(tags)
        for tag in tags:
            members = index.get(tag)
            if members is slot:
                del index[tag]
            elif isinstance(members, _Members):
                members.discard(slot)
                if not members:
                    del index[tag]
        if not index:
            del self._pools[pool]

    def members(self, pool: str, tag: bytes) -> list[Any]:
        """A copy (the caller wakes or closes them, which changes the index)."""
        members = self._pools.get(pool, {}).get(tag)
        if members is None:
            return []
        return list(members) if isinstance(members, _Members) else [members]

    @property
    def tags(self) -> int:
        """Distinct (pool, tag) pairs with at least one parked connection."""
        return sum(len(index) for index in self._pools.values())
