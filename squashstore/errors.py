"""The root of squashstore's exceptions, in a module that imports nothing.

Every error squashstore reports as one ``squashstore: ...`` line derives from
`SquashstoreError`; it lives here (and is re-exported by `squashstore.image`) so that the
mount program's per-container-start path can name it without importing the image types.
"""


class SquashstoreError(Exception):
    """An error the command line reports as one line (``squashstore: <message>``)."""
