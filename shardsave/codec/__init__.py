"""Chunk codecs: how one chunk's bytes become the payload on storage, and back.

Public surface: the names a user may pass as ``codec=`` (``CODEC_NAMES``), per-chunk
:func:`encode_chunk` / :func:`decode_chunk`, the payload :func:`checksum`, and the registry of
versioned codecs by stored descriptor. Byte layouts are specified in ``docs/CODECS.md``.
"""

from __future__ import annotations

from shardsave.codec.base import (
    CODEC_NAMES,
    BoxCopy,
    Buffer,
    Codec,
    EncodedChunk,
    validate_codec_name,
)
from shardsave.codec.checksum import checksum
from shardsave.codec.chunk import choose_codec, decode_chunk, decode_chunk_boxes, encode_chunk
from shardsave.codec.raw import RawCodec
from shardsave.codec.registry import CODEC_DESCRIPTORS, codec_registry, get_codec
from shardsave.codec.shuffle import ByteGroupedZstdCodec
from shardsave.codec.zstd import ZstdCodec

__all__ = [
    "CODEC_DESCRIPTORS",
    "CODEC_NAMES",
    "BoxCopy",
    "Buffer",
    "ByteGroupedZstdCodec",
    "Codec",
    "EncodedChunk",
    "RawCodec",
    "ZstdCodec",
    "checksum",
    "choose_codec",
    "codec_registry",
    "decode_chunk",
    "decode_chunk_boxes",
    "encode_chunk",
    "get_codec",
    "validate_codec_name",
]
