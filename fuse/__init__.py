"""squashstore's read-only FUSE server for squash files (pyfuse3 on its own small loop)."""
