"""Bounded, strict decompression of one zstd frame into a caller's buffer.

Stored bytes are untrusted: a checkpoint may be damaged or crafted. ``zstandard``'s one-shot
``decompress()`` allocates whatever size the frame header declares and ignores
``max_output_size`` when a size is declared, so a 3 KB frame declaring 100 GB is a memory
bomb. Hence, before any decompression:

1. the frame must start with the zstd magic and declare its content size, and that size
   must equal the length we expect (the caller knows it from the table of contents);
2. the frame's block structure (RFC 8878, section 3.1.1.2) is walked to find where the frame
   ends, which must be exactly the end of the given bytes: no trailing data, no second frame.

Then the frame is decompressed straight into the destination. With zstandard's cffi binding
(``_zstd_cffi``) that is one call that writes at most the destination's size and fails
unless the blocks decode to exactly the declared size. Without it, a streaming reader of the
C binding does it (no allocation, measured ~15% faster than ``decompress()`` plus a copy),
and one more read must report the end of the frame, so a frame whose blocks expand past the
declared size is caught by zstd's own content-size check instead of being silently cut.
Either decoder's window buffer is bounded by the declared (and checked) content size.
"""

from __future__ import annotations

import zstandard

from shardsave.codec._threadlocal import decompressor, direct_decompressor
from shardsave.codec.base import U8Array
from shardsave.errors import CorruptionError

_MAGIC = b"\x28\xb5\x2f\xfd"
# Block_Maximum_Size is min(Window_Size, 128 KiB) for every frame (RFC 8878 3.1.1.2.3).
_MAX_BLOCK = 128 * 1024
_FHD_RESERVED_BIT = 0x08
_FHD_CHECKSUM_FLAG = 0x04


def frame_end(frame: memoryview, what: str) -> int:
    """Offset just past the zstd frame that starts ``frame``; raise if it is malformed."""
    if frame.nbytes < 6 or bytes(frame[:4]) != _MAGIC:
        raise CorruptionError(f"{what}: not a zstd frame (bad magic or too short)")
    fhd = frame[4]
    if fhd & _FHD_RESERVED_BIT:
        raise CorruptionError(f"{what}: zstd frame header has its reserved bit set")
    try:
        pos = int(zstandard.frame_header_size(frame))
    except zstandard.ZstdError as exc:
        raise CorruptionError(f"{what}: bad zstd frame header ({exc})") from None
    end = frame.nbytes
    while True:
        if pos + 3 > end:
            raise CorruptionError(f"{what}: zstd frame truncated inside its block headers")
        header = int.from_bytes(frame[pos : pos + 3], "little")
        pos += 3
        last = header & 1
        block_type = (header >> 1) & 3
        block_size = header >> 3
        if block_type == 3:
            raise CorruptionError(f"{what}: zstd block of reserved type at offset {pos - 3}")
        if block_size > _MAX_BLOCK:
            raise CorruptionError(
                f"{what}: zstd block of {block_size} bytes (the maximum is {_MAX_BLOCK})"
            )
        pos += 1 if block_type == 1 else block_size  # an RLE block stores one byte
        if last:
            break
    if fhd & _FHD_CHECKSUM_FLAG:
        pos += 4
    if pos > end:
        raise CorruptionError(f"{what}: zstd frame truncated ({end} bytes, needs {pos})")
    return pos


def decompress_into(frame: memoryview, out: U8Array, what: str) -> None:
    """Decompress the single zstd frame ``frame`` into ``out``, which it must fill exactly."""
    expected = int(out.size)
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CorruptionError(f"{what}: bad zstd frame header ({exc})") from None
    if declared != expected:
        claim = "no size" if declared < 0 else f"{declared} bytes"
        raise CorruptionError(f"{what}: zstd frame declares {claim}, expected {expected} bytes")
    end = frame_end(frame, what)
    if end != frame.nbytes:
        raise CorruptionError(
            f"{what}: {frame.nbytes - end} bytes of unexpected data after the zstd frame"
        )
    direct = direct_decompressor()
    if direct is not None:
        direct.decompress_into(frame, out, what)
        return
    try:
        reader = decompressor().stream_reader(frame, read_across_frames=False)
        view = out.data
        got = 0
        while got < expected:
            n = reader.readinto(view[got:])
            if n <= 0:
                raise CorruptionError(
                    f"{what}: zstd frame ended after {got} of its declared {expected} bytes"
                )
            got += n
        if reader.readinto(bytearray(1)) != 0:
            raise CorruptionError(f"{what}: zstd frame expands past its declared {expected} bytes")
    except zstandard.ZstdError as exc:
        raise CorruptionError(f"{what}: zstd cannot decode the frame ({exc})") from None
