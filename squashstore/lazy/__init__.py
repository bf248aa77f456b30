"""Lazy pull: run a squashed image from the registry before it has been downloaded.

`ranges` owns the pure range arithmetic (spans, chunk maps, coalescing, readahead);
`cache` owns the per-image local cache file shared by every process on the host; `source`
fetches byte ranges of one blob from a registry with HTTP Range requests; `lazyfile` joins
them into a `pread`-able file the squashfs reader opens instead of a local squash file;
`image` and `install` own lazy images in a store (marker, staging, completion, node-local
caches); `prefetch` the start-up prefetch list (its format, recording, keeping);
`background` completion in a detached process; `remote` the registry side.
"""
