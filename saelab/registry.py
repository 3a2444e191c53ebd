"""A tiny name -> object registry, so architectures, activations, corpora and losses are chosen by name.

Modelled on SAELens's ``registry.py`` (dict + duplicate check); the CLI's ``choices`` and the
parametrised tests read :meth:`Registry.names`, so nothing can drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of objects (classes, functions or factories).

    Args:
        kind: what the registry holds, used in error messages (e.g. ``"activation"``).

    Example:
        >>> ACTS = Registry("activation")
        >>> @ACTS.register("relu")
        ... def relu(x): return x.clamp_min(0)
        >>> ACTS.get("relu") is relu
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``.

        Raises:
            ValueError: if ``name`` is already registered.
        """

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            KeyError: naming the unknown entry and listing the valid ones.
        """
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
