"""One generic, typed registry for methods, adapters, parsers and other named things."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from vlmfix.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, checked against a base class; failed lookups list the available names.

    >>> methods = Registry("method", base=object)
    >>> _ = methods.register("greedy")(object)
    >>> methods.get("greedy") is object
    True
    """

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, T] = {}
        self._frozen = False

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if self._frozen:
                raise RuntimeError(f"The {self.kind} registry is frozen; cannot add {name!r}.")
            if self.base is not None and isinstance(obj, type) and not issubclass(obj, self.base):
                raise TypeError(f"{obj.__name__} must subclass {self.base.__name__} to be a {self.kind}.")
            for key in (name, *aliases):
                if key in self._entries and self._entries[key] is not obj:
                    raise ValueError(f"The {self.kind} name {key!r} is already taken by {self._entries[key]!r}.")
                self._entries[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(f"Unknown {self.kind} {name!r}. Available: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def freeze(self) -> None:
        self._frozen = True

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
