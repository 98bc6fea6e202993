"""Encoding and decoding one chunk: the policy on top of the codecs.

``encode_chunk`` turns a user's ``codec=`` name into a stored descriptor per chunk:

* ``"raw"`` and ``"zstd"`` are honoured as given (an explicit choice is never second-guessed);
* ``"zstd-shuffle"`` byte-groups floats of two or more bytes whose length is a whole number of
  elements; anything else (integers, bools, float8, a ragged length) falls back to ``zstd/1``,
  because grouping single bytes or non-float bytes buys nothing;
* ``"auto"`` stores chunks under ``knobs.min_compress_bytes()`` as ``raw/1`` (small tensors:
  a few bytes saved, a fixed decode cost paid); on larger ones it makes the same choice as
  ``"zstd-shuffle"`` and then stores the chunk as ``raw/1`` unless the payload is at most
  ``knobs.min_compression_gain()`` of the raw bytes, so incompressible data costs nothing
  to load.

The checksum is computed here, on the encoding thread, over the payload that will be stored.
``decode_chunk`` looks the descriptor up in the registry and guarantees that malformed input
surfaces as :class:`CorruptionError` (unknown descriptors as :class:`CodecError`), whatever
library the codec used underneath. It does not verify the checksum: the loader does that
first, with the value from the table of contents.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import zstandard

from shardsave import knobs
from shardsave.codec.base import (
    BoxCopy,
    Buffer,
    Codec,
    EncodedChunk,
    U8Array,
    as_u8,
    payload_length,
    validate_codec_name,
)
from shardsave.codec.checksum import checksum
from shardsave.codec.registry import RAW, ZSTD, ZSTD_SHUFFLE, get_codec
from shardsave.errors import CodecError, CorruptionError, ShardsaveError


def choose_codec(codec: str, *, length: int, itemsize: int, is_float: bool) -> Codec:
    """The codec that ``codec=`` (a name from ``CODEC_NAMES``) tries first for such a chunk."""
    validate_codec_name(codec)
    if codec == "raw":
        return RAW
    if codec == "zstd":
        return ZSTD
    if ZSTD_SHUFFLE.supports(length=length, itemsize=itemsize, is_float=is_float):
        return ZSTD_SHUFFLE
    return ZSTD


def encode_chunk(raw: np.ndarray, *, itemsize: int, is_float: bool, codec: str) -> EncodedChunk:
    """Encode one chunk's bytes.

    ``raw`` is a 1-D C-contiguous uint8 array of little-endian elements of ``itemsize`` bytes;
    ``is_float`` says whether they are floating point (complex counts). Thread-safe; the
    compression itself runs without the GIL. For ``raw/1`` the payload *is* ``raw``: do not
    modify it until it has been written.
    """
    if not isinstance(itemsize, int) or itemsize < 1:
        raise CodecError(f"itemsize must be a positive int, got {itemsize!r}")
    data = _check_raw(raw)
    chosen: Codec
    payload: Buffer
    if codec == "auto" and data.size < knobs.min_compress_bytes():
        chosen, payload = RAW, data
    else:
        chosen = choose_codec(codec, length=data.size, itemsize=itemsize, is_float=is_float)
        payload = chosen.encode(data, itemsize=itemsize)
        if (
            codec == "auto"
            and chosen is not RAW
            and payload_length(payload) > knobs.min_compression_gain() * data.size
        ):
            chosen, payload = RAW, data
    return EncodedChunk(
        descriptor=chosen.descriptor,
        payload=payload,
        raw_length=int(data.size),
        checksum=checksum(payload),
    )


def decode_chunk(
    descriptor: str,
    payload: bytes | bytearray | memoryview | np.ndarray,
    *,
    raw_length: int,
    itemsize: int,
    out: np.ndarray,
) -> None:
    """Decode a stored payload into ``out`` (1-D contiguous uint8 of exactly ``raw_length``).

    Raises :class:`CodecError` for an unknown descriptor and :class:`CorruptionError` for any
    payload that is not a valid encoding of ``raw_length`` bytes; never allocates much more
    than ``raw_length``. On error ``out`` may have been partly written.
    """
    codec = get_codec(descriptor)
    if not isinstance(raw_length, int) or raw_length < 0:
        raise CorruptionError(f"raw length must be a non-negative int, got {raw_length!r}")
    if not isinstance(itemsize, int) or itemsize < 1:
        raise CorruptionError(f"itemsize must be a positive int, got {itemsize!r}")
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.uint8
        or out.ndim != 1
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise CodecError("out must be a writable 1-D C-contiguous uint8 numpy array")
    if out.size != raw_length:
        raise CodecError(f"out has {out.size} bytes but the chunk's raw length is {raw_length}")
    data = as_u8(payload, f"{descriptor} payload")
    try:
        codec.decode(data, raw_length=raw_length, itemsize=itemsize, out=out)
    except ShardsaveError:
        raise
    except (zstandard.ZstdError, struct.error, ValueError, IndexError, OverflowError) as exc:
        # The codecs validate what they can name; this is the net under them.
        raise CorruptionError(f"{descriptor} payload cannot be decoded: {exc}") from exc


def decode_chunk_boxes(
    descriptor: str,
    payload: bytes | bytearray | memoryview | np.ndarray,
    *,
    raw_length: int,
    itemsize: int,
    shape: tuple[int, ...],
    copies: list[BoxCopy],
) -> None:
    """Decode the boxes ``copies`` names of a stored chunk straight into their destinations.

    The chunk holds ``shape`` elements of ``itemsize`` bytes, row-major (``raw_length`` bytes
    in all). Each copy is ``(box, dst)``: ``box`` is ``(offsets, sizes)`` inside the chunk,
    ``dst`` a writable uint8 array of shape ``(*sizes, itemsize)`` whose last axis is
    contiguous (a view into a target tensor). Errors as for :func:`decode_chunk`; on error a
    destination may have been partly written.
    """
    codec = get_codec(descriptor)
    if math.prod(shape) * itemsize != raw_length:
        raise CorruptionError(f"a chunk of shape {list(shape)} with {itemsize}-byte elements has "
                              f"{math.prod(shape) * itemsize} bytes, not the declared {raw_length}")
    for (offs, sizes), dst in copies:
        if (len(offs) != len(shape) or len(sizes) != len(shape)
                or any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offs, sizes, shape))):
            raise CodecError(f"box at {list(offs)} of size {list(sizes)} is not inside a chunk of shape {list(shape)}")
        if (not isinstance(dst, np.ndarray) or dst.dtype != np.uint8 or not dst.flags.writeable
                or dst.shape != (*sizes, itemsize) or (itemsize > 1 and dst.size and dst.strides[-1] != 1)):
            raise CodecError(f"a box destination must be a writable uint8 array of shape {(*sizes, itemsize)} "
                             "with a contiguous last axis")
    data = as_u8(payload, f"{descriptor} payload")
    try:
        codec.decode_boxes(data, raw_length=raw_length, itemsize=itemsize, shape=tuple(shape), copies=copies)
    except ShardsaveError:
        raise
    except (zstandard.ZstdError, struct.error, ValueError, IndexError, OverflowError) as exc:
        raise CorruptionError(f"{descriptor} payload cannot be decoded: {exc}") from exc


def _check_raw(raw: np.ndarray) -> U8Array:
    if (
        not isinstance(raw, np.ndarray)
        or raw.dtype != np.uint8
        or raw.ndim != 1
        or not raw.flags.c_contiguous
    ):
        got = (
            f"{raw.dtype} array of shape {raw.shape}"
            if isinstance(raw, np.ndarray)
            else type(raw).__name__
        )
        raise CodecError(
            f"a chunk must be a 1-D C-contiguous uint8 numpy array, got {got} "
            "(pass tensor.view(torch.uint8).reshape(-1).numpy())"
        )
    return raw
