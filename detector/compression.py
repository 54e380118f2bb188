"""Bounded gzip decompression: one implementation for every gzip file the product reads.

A small gzip file can inflate a thousandfold (a "gzip bomb"), so nothing here decompresses into
memory or without a limit: `gunzip_to` streams the file through fixed-size buffers to a target
file and stops as soon as the output passes `max_bytes` (the setting
PTD_MAX_DECOMPRESSED_BYTES, `Settings.max_decompressed_bytes`). Memory stays at a few buffers
whatever the input.

gzip is read as gzip tools read it (RFC 1952; Python's `gzip` module, which this uses):
concatenated members (`cat a.gz b.gz`, what pigz and some exporters write) are one stream whose
output is the members' outputs in order; zero bytes padding the end are ignored; every member's
CRC-32 and length are checked. Anything else is refused with `schema.InputError` naming the
file: not gzip, truncated, corrupt, trailing bytes that are not a gzip member, or over the limit.
A refused target file is removed, so no partial output is ever left to be read.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from detector.schema import InputError

GZIP_MAGIC = b"\x1f\x8b"  # RFC 1952, section 2.3.1: ID1 ID2
BUFFER_BYTES = 1 << 20  # bytes decompressed per step (and written per write call)


def is_gzip(path: Path) -> bool:
    """Whether the file starts with the gzip magic bytes 1f 8b (RFC 1952). False for a file
    shorter than two bytes. Raises OSError if the file cannot be opened."""
    with Path(path).open("rb") as handle:
        return handle.read(len(GZIP_MAGIC)) == GZIP_MAGIC


def gunzip_to(source: Path, target: Path, max_bytes: int, *, name: str | None = None) -> int:
    """Decompress the gzip file `source` into `target`; returns the bytes written.

    Streams in BUFFER_BYTES steps, so memory does not depend on the sizes involved. Raises
    `InputError` (its message starts with `name`, default the source's file name, and never
    quotes the data) when:

    - the output would exceed `max_bytes`: raised as soon as a step passes the limit (at most
      `max_bytes` bytes are ever written, one more step decompressed), with the message
      "<name>: decompresses to more than <max_bytes> bytes; the limit is
      PTD_MAX_DECOMPRESSED_BYTES";
    - `source` is not gzip (no magic bytes, or empty);
    - the stream is truncated (ends inside a member) or corrupt (bad deflate data, CRC-32 or
      length mismatch, trailing bytes that are neither zero padding nor a gzip member).

    On any error `target` is removed. OSError from the file system (a full disk) propagates.
    """
    source, target = Path(source), Path(target)
    label = name or source.name
    if max_bytes < 0:
        raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
    if not is_gzip(source):
        raise InputError(f"{label}: not a gzip stream (no gzip magic bytes at its start)")
    written = 0
    try:
        with gzip.open(source, "rb") as stream, target.open("wb") as out:
            while True:
                try:
                    block = stream.read(BUFFER_BYTES)
                except EOFError:
                    raise InputError(
                        f"{label}: the gzip stream is truncated (it ends inside a member)"
                    ) from None
                except (gzip.BadGzipFile, zlib.error) as exc:
                    raise InputError(f"{label}: the gzip stream is corrupt: {_why(exc)}") from None
                if not block:
                    break
                written += len(block)
                if written > max_bytes:
                    raise InputError(
                        f"{label}: decompresses to more than {max_bytes} bytes; "
                        "the limit is PTD_MAX_DECOMPRESSED_BYTES"
                    )
                out.write(block)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return written


def _why(exc: Exception) -> str:
    """The decoder's reason, without the bytes Python's gzip quotes for a bad member header."""
    text = str(exc).strip() or type(exc).__name__
    if text.startswith("Not a gzipped file"):
        return "bytes after a member are neither zero padding nor another gzip member"
    return text.splitlines()[0][:200]


__all__ = ["BUFFER_BYTES", "GZIP_MAGIC", "gunzip_to", "is_gzip"]
