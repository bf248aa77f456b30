"""The root of squashstore's exceptions, in a module that imports nothing.

Every error squashstore reports as one ``squashstore: ...`` line derives from
`SquashstoreError`; it lives here (and is re-exported by `squashstore.image`) so that the
mount program's per-container-start path can name it without importing the image types.
`printable` is the one rule for putting untrusted text (a registry's error, a name from an
image or a job comment) on a terminal or in a log: one line, control characters escaped.
"""


class SquashstoreError(Exception):
    """An error the command line reports as one line (``squashstore: <message>``)."""


def printable(text: str) -> str:
    """`text` as one line: runs of whitespace become one space, other control (and format)
    characters are escaped as Python does (``\\x1b``, ``\\u202e``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(text.split()))
