"""``zstd/1``: the whole chunk as one zstd frame, content size in the header.

The codec for everything that is not a float of two or more bytes (integers, bools, float8,
indices, masks), and for floats when the user asks for ``codec="zstd"``. The level is
``knobs.zstd_level()``. Decoding is bounded by the chunk's raw length, see ``_zstd_frame``.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardsave import knobs
from shardsave.codec._boxes import BoxCopy, copy_boxes
from shardsave.codec._threadlocal import compressor, scratch
from shardsave.codec._zstd_frame import decompress_into
from shardsave.codec.base import Buffer, U8Array


@dataclass(frozen=True)
class ZstdCodec:
    """The chunk compressed as one zstd frame."""

    descriptor: str = "zstd/1"

    def supports(self, *, length: int, itemsize: int, is_float: bool) -> bool:
        return True

    def encode(self, raw: U8Array, *, itemsize: int) -> Buffer:
        # zstandard releases the GIL while compressing.
        return bytes(compressor(knobs.zstd_level(), byte_streams=False).compress(raw.data))

    def decode(self, payload: U8Array, *, raw_length: int, itemsize: int, out: U8Array) -> None:
        decompress_into(payload.data, out, self.descriptor)

    def decode_boxes(self, payload: U8Array, *, raw_length: int, itemsize: int, shape: tuple[int, ...],
                     copies: list[BoxCopy]) -> None:
        out = scratch("zstd-decode", raw_length)
        decompress_into(payload.data, out, self.descriptor)
        copy_boxes(out, shape, itemsize, copies)
