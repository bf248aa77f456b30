"""Registries: the docker registry HTTP API as squashstore uses it.

`auth` owns credentials (podman's auth file, then docker's config; `login`/`logout`
write podman's file); `client` owns one registry's HTTP session (TLS as podman configures
it, the anonymous/basic/bearer-token handshake, retries, blobs streamed with Range-resume,
chunked uploads); `docker` resolves a ``docker://`` reference to an `Image` whose layers
stream from the registry; `artifact` owns squashstore's own artifact format (push, pull).
"""
