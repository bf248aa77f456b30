"""A native squashfs 4.0 implementation: format structs, codecs, writer and reader."""
