"""Copy-on-write overlays on the committed tables, so a change can be applied, checked and
thrown away without copying 10,000 records, and a group of changes can be stacked."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

V = TypeVar("V")
DELETED: Any = object()


class Table(Generic[V]):
    """A mapping id → record layered over `base` (a dict or another Table)."""

    __slots__ = ("base", "order", "over")

    def __init__(self, base: Mapping[str, V] | Table[V]) -> None:
        self.base = base
        self.over: dict[str, V] = {}
        self.order: list[str] | None = None  # set by replace(): the new key order

    def get(self, key: str) -> V | None:
        if key in self.over:
            value = self.over[key]
            return None if value is DELETED else value
        return self.base.get(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __getitem__(self, key: str) -> V:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def put(self, key: str, value: V) -> None:
        self.over[key] = value

    def delete(self, key: str) -> None:
        self.over[key] = DELETED

    def items(self) -> Iterator[tuple[str, V]]:
        keys = self.order if self.order is not None else self.base.keys()
        known = set(keys) if self.order is not None else None
        for key in keys:
            value = self.get(key)
            if value is not None:
                yield key, value
        for key, value in self.over.items():
            if value is DELETED:
                continue
            if (key not in known) if known is not None else (self.base.get(key) is None):
                yield key, value

    def keys(self) -> Iterator[str]:
        return (k for k, _ in self.items())

    def values(self) -> Iterator[V]:
        return (v for _, v in self.items())

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def replace(self, mapping: Mapping[str, V]) -> None:
        """Make the content exactly `mapping`, in its order (a hand edit taken in whole)."""
        for key in [k for k in self.keys() if k not in mapping]:
            self.delete(key)
        for key, value in mapping.items():
            if self.get(key) is not value:
                self.put(key, value)
        self.order = list(mapping)

    @property
    def dirty(self) -> bool:
        return bool(self.over) or self.order is not None

    def merge_into(self, parent: Table[V]) -> None:
        if self.order is not None:
            parent.order = self.order
        parent.over.update(self.over)
