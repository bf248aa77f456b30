"""squashstore's read-only FUSE server for squash files (pyfuse3 + trio)."""
