"""Kept for importers of the old name: tar-split now lives in `squashstore.tar.split`."""

from squashstore.tar.split import tar_from_diff_dir, tar_from_tar_split

__all__ = ["tar_from_diff_dir", "tar_from_tar_split"]
