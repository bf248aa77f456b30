"""Image transports, one module per transport (as containers/image has them).

`squashstore.sources` parses a reference and dispatches to `containers_storage`,
`oci_layout` (``oci:`` and ``oci-archive:``) or `docker_archive`; ``docker://`` is
`squashstore.registry`'s. Each returns the same `squashstore.image.Image`.
"""
