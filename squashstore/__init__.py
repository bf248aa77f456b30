"""squashstore: OCI images as single squashfs files in a podman additional image store."""

__version__ = "0.1.0"
