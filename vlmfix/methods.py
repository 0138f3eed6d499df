"""The method registry by name: `vlmfix.methods.get("vhr")` returns the class."""

from __future__ import annotations

from vlmfix.decoding.method import METHODS, Method


def get(name: str) -> type[Method]:
    """The method class registered as `name`; the error lists the available names."""
    return METHODS.get(name)


def names() -> list[str]:
    return METHODS.names()


def create(name: str, **params: object) -> Method:
    """An instance of the method `name` with `params` (validated by its constructor)."""
    return get(name)(**params)
