"""``raw/1``: the chunk's bytes as they are.

Used for what does not compress (``codec="auto"`` falls back to it) and when the user asks for
no compression. Encoding returns the input array itself, not a copy: at save time the chunk
is already a private staging copy, and copying 16 MiB into a fresh buffer costs more than
writing it (~0.5 GB/s with page faults).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardsave.codec._boxes import BoxCopy, copy_boxes
from shardsave.codec.base import Buffer, U8Array
from shardsave.errors import CorruptionError


@dataclass(frozen=True)
class RawCodec:
    """Stores the bytes unchanged."""

    descriptor: str = "raw/1"

    def supports(self, *, length: int, itemsize: int, is_float: bool) -> bool:
        return True

    def encode(self, raw: U8Array, *, itemsize: int) -> Buffer:
        return raw

    def decode(self, payload: U8Array, *, raw_length: int, itemsize: int, out: U8Array) -> None:
        if payload.size != raw_length:
            raise CorruptionError(
                f"raw/1 payload has {payload.size} bytes, expected raw length {raw_length}"
            )
        np.copyto(out, payload)

    def decode_boxes(self, payload: U8Array, *, raw_length: int, itemsize: int, shape: tuple[int, ...],
                     copies: list[BoxCopy]) -> None:
        if payload.size != raw_length:
            raise CorruptionError(
                f"raw/1 payload has {payload.size} bytes, expected raw length {raw_length}"
            )
        copy_boxes(payload, shape, itemsize, copies)
