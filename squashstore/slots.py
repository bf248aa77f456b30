"""Plain typed records for the modules every container start imports: `Slots`.

The mount program runs at every container start, so what it imports is start-up time:
`dataclasses` costs ~40 M instructions to import (it imports inspect, hence ast, dis and
tokenize) and ~4 M per class it makes (it compiles each class's generated methods), together
more than a third of a mount program's run (callgrind; NOTES.md, issue 14). The records on
that path (host, jobs, config, mountrecords, mountprogram) are therefore `Slots` subclasses:
each lists its fields in ``__slots__`` (with annotations, for mypy) and writes its
``__init__``; this base derives equality, hashing, ``repr`` and `replace` from the slots.
They are read-only by convention, like the frozen dataclasses elsewhere.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from typing import Any, Self


class Slots:
    """Equality, hash, repr and `replace` over the subclass's ``__slots__``, in order."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Slots)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: object) -> Self:
        """A copy with `changes` (keyword arguments of ``__init__``, named as the slots)."""
        unknown = set(changes) - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        values = {name: getattr(self, name) for name in self.__slots__}
        make: Any = type(self)
        result: Self = make(**{**values, **changes})
        return result
