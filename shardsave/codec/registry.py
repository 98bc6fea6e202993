"""The codec registry: one place that maps stored descriptors to codecs.

Loading looks a chunk's descriptor up here; an unknown one (a newer shardsave wrote it, or the
table of contents is damaged) fails with the list of known ones. The user-facing names of
``codec=`` map onto descriptors in ``chunk.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from shardsave.codec.base import Codec
from shardsave.codec.raw import RawCodec
from shardsave.codec.shuffle import ByteGroupedZstdCodec
from shardsave.codec.zstd import ZstdCodec
from shardsave.errors import CodecError

RAW = RawCodec()
ZSTD = ZstdCodec()
ZSTD_SHUFFLE = ByteGroupedZstdCodec()

_REGISTRY: Mapping[str, Codec] = MappingProxyType(
    {codec.descriptor: codec for codec in (RAW, ZSTD, ZSTD_SHUFFLE)}
)

# Every stored descriptor this version reads, in a fixed order (new codecs are appended), for
# tables that refer to codecs by number.
CODEC_DESCRIPTORS: tuple[str, ...] = tuple(_REGISTRY)


def codec_registry() -> Mapping[str, Codec]:
    """Every registered codec by descriptor (read-only)."""
    return _REGISTRY


def get_codec(descriptor: str) -> Codec:
    """The codec stored under ``descriptor``; :class:`CodecError` if there is none."""
    codec = _REGISTRY.get(descriptor) if isinstance(descriptor, str) else None
    if codec is None:
        raise CodecError(
            f"unknown codec descriptor {descriptor!r}; this shardsave knows "
            f"{', '.join(repr(d) for d in _REGISTRY)} (was the checkpoint written by a newer "
            f"shardsave? upgrade to read it)"
        )
    return codec
