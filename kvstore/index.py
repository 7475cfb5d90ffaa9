"""The block index: key -> record, and prefix lookup over ordered key chains.

Only READY records are visible. Mutated from one thread only (the daemon's event loop), so it
takes no locks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvstore.block import BlockRecord, BlockState


class BlockIndex:
    def __init__(self) -> None:
        self._records: dict[bytes, BlockRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: bytes) -> bool:
        return key in self._records

    def __iter__(self) -> Iterator[BlockRecord]:
        return iter(self._records.values())

    def get(self, key: bytes) -> BlockRecord | None:
        """The record of ``key`` in any state (WRITING included), or None."""
        return self._records.get(key)

    def add(self, record: BlockRecord) -> None:
        if record.key in self._records:
            raise RuntimeError(f"block {record.key.hex()[:16]} is already indexed")
        self._records[record.key] = record

    def discard(self, record: BlockRecord) -> None:
        """Forget ``record`` if it is the one indexed under its key."""
        if self._records.get(record.key) is record:
            del self._records[record.key]

    def prefix(self, keys: Sequence[bytes]) -> list[BlockRecord]:
        """Records of the leading readable keys: stops at the first that is absent, not READY, or
        has no filled copy."""
        found: list[BlockRecord] = []
        records = self._records
        ready = BlockState.READY
        for key in keys:
            record = records.get(key)
            if record is None or record.state is not ready or not record.copies:
                break
            found.append(record)
        return found
