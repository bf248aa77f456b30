"""JSON for the mount program's path, through CPython's C accelerator without ``json``.

Importing ``json`` imports ``re`` (its decoder, scanner and encoder compile patterns at
import) and with it enum, functools and collections: ~20 ms of wall time of a ~60 ms mount
program run (page faults and ``.pyc`` reads; `python -X importtime`, NOTES.md, branch fast).
The parsing and the writing are not Python's anyway: ``json.loads`` and ``json.dumps``
(without ``indent``) run the C scanner and encoder of the ``_json`` module, which imports
nothing. This module calls those two directly, with the arguments ``json`` itself passes
them, so `loads` and `dumps` give exactly what ``json.loads`` and ``json.dumps`` (default
options) give (tests/test_fast.py checks that with Hypothesis); where ``_json`` is missing
(another Python) it uses ``json``. Only the mount registry's records and the config cache go
through it; everything else uses ``json``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

WHITESPACE = " \t\n\r"
"""JSON's insignificant whitespace (``json.decoder.WHITESPACE``)."""

_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """The attributes the C scanner reads from a ``json.JSONDecoder`` (default options)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict[str, str] = {}


def _unserializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_scan: Callable[[str, int], tuple[Any, int]] | None = None
_encoder: Callable[[Any], str] | None = None
_ascii: Callable[[str], str] | None = None
try:
    import _json
except ImportError:  # pragma: no cover (an interpreter without the accelerator)
    pass
else:
    _scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # duck-typed context
    _ascii = _json.encode_basestring_ascii

    def _encode(value: Any) -> str:
        encode = _json.make_encoder({}, _unserializable, _json.encode_basestring_ascii, None,
                                    ": ", ", ", False, False, True)
        return "".join(encode(value, 0))

    _encoder = _encode


def loads(data: str | bytes) -> Any:
    """``json.loads(data)`` (UTF-8 for bytes); ValueError for what is not one JSON value."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip(WHITESPACE))
    try:
        try:
            value, end = _scan(text, start)
        except SystemError:
            # The C scanner raises json.decoder.JSONDecodeError, which it looks up in
            # sys.modules without importing it (SystemError when absent): bad input is the
            # rare case, so json is imported only then, and the scan repeated.
            import json.decoder

            value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value at {exc.value}") from None
    if text[end:].strip(WHITESPACE):
        raise ValueError(f"Extra data at {end}")
    return value


def dumps(value: Any) -> str:
    """``json.dumps(value)``: one line, ASCII."""
    if _encoder is None or _ascii is None:  # pragma: no cover
        import json

        return json.dumps(value)
    if isinstance(value, str):
        return _ascii(value)
    return _encoder(value)
