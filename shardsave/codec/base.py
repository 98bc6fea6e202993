"""The codec interface: what a codec is, what it returns, and how payloads are passed around.

A codec turns the raw bytes of one chunk into the payload stored on disk and back. Codecs are
small frozen dataclasses registered by their versioned descriptor (``"zstd-shuffle/1"``); the
descriptor is what the table of contents records, so a change to a codec's byte layout is a
new descriptor, never an edit of an old one (old checkpoints must keep loading).

Buffers are passed as numpy ``uint8`` arrays internally because numpy slices are free, copies
into them release the GIL, and every storage layer accepts the buffer protocol. The stable
byte-level description of every payload lives in ``docs/CODECS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import numpy as np
import numpy.typing as npt

from shardsave.errors import CodecError

# A buffer written to storage as is. ``bytes`` for compressed payloads; for "raw/1" it is the
# caller's own array (no copy), so it must not be mutated until it is written.
Buffer = Union[bytes, bytearray, memoryview, "npt.NDArray[np.uint8]"]

U8Array = npt.NDArray[np.uint8]

# The unsigned integer of each element size that has one: byte grouping reads and writes
# whole elements through these views.
WORD_DTYPES: dict[int, type[np.unsignedinteger]] = {2: np.uint16, 4: np.uint32, 8: np.uint64}

# A box of a chunk, ``(offsets, sizes)``, and a copy of one into a destination: a writable
# uint8 array of shape ``(*sizes, itemsize)`` with a contiguous last axis (see ``_boxes``).
Box = tuple[tuple[int, ...], tuple[int, ...]]
BoxCopy = tuple[Box, "npt.NDArray[np.uint8]"]


def box_slices(box: Box) -> tuple[slice, ...]:
    """The index of ``box`` in an array (or tensor) whose origin is the box's reference."""
    return tuple(slice(o, o + n) for o, n in zip(*box))

# What a user may pass as ``codec=``. "auto" picks per chunk; the others force a codec (with the
# documented fallback of "zstd-shuffle" to "zstd" where byte grouping does not apply).
CODEC_NAMES: tuple[str, ...] = ("auto", "raw", "zstd", "zstd-shuffle")


def validate_codec_name(name: str) -> str:
    """Return ``name`` if a user may pass it as ``codec=``; raise :class:`CodecError` if not."""
    if not isinstance(name, str) or name not in CODEC_NAMES:
        raise CodecError(
            f"unknown codec {name!r}; choose one of {', '.join(repr(n) for n in CODEC_NAMES)}"
        )
    return name


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk as it goes to storage."""

    descriptor: str
    """Versioned codec descriptor recorded in the table of contents, e.g. ``"zstd/1"``."""
    payload: Buffer
    """The bytes to store, as is. For ``"raw/1"`` this aliases the input array."""
    raw_length: int
    """Length in bytes of the chunk before encoding (what decoding must produce)."""
    checksum: int
    """:func:`shardsave.codec.checksum` of ``payload`` (the stored bytes), an unsigned 32-bit int."""

    @property
    def stored_length(self) -> int:
        """Number of bytes ``payload`` occupies on storage."""
        return payload_length(self.payload)


@runtime_checkable
class Codec(Protocol):
    """A chunk codec. Implementations are frozen dataclasses and hold no mutable state.

    Call order, on any thread: ``encode`` at save (from the encoder thread pool), ``decode`` at
    load. Both must be thread-safe; per-thread scratch lives in ``_threadlocal``.
    """

    @property
    def descriptor(self) -> str:
        """Versioned name recorded on storage."""
        ...

    def supports(self, *, length: int, itemsize: int, is_float: bool) -> bool:
        """Whether ``encode`` accepts a chunk of ``length`` bytes of such elements."""
        ...

    def encode(self, raw: U8Array, *, itemsize: int) -> Buffer:
        """Encode ``raw`` (1-D contiguous uint8) into a payload."""
        ...

    def decode(self, payload: U8Array, *, raw_length: int, itemsize: int, out: U8Array) -> None:
        """Decode ``payload`` into ``out`` (exactly ``raw_length`` bytes) or raise
        :class:`~shardsave.errors.CorruptionError`."""
        ...

    def decode_boxes(self, payload: U8Array, *, raw_length: int, itemsize: int, shape: tuple[int, ...],
                     copies: list[BoxCopy]) -> None:
        """Decode boxes of the chunk (elements row-major in ``shape``) straight into their
        destinations (see ``_boxes``), moving as few bytes as the codec allows."""
        ...


def as_u8(data: bytes | bytearray | memoryview | np.ndarray, what: str) -> U8Array:
    """A 1-D uint8 view of a contiguous buffer (no copy)."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise CodecError(f"{what} must be a C-contiguous array, got strides {data.strides}")
        if data.dtype != np.uint8:
            data = data.reshape(-1).view(np.uint8)
        return data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        if not mv.c_contiguous:
            raise CodecError(f"{what} must be a contiguous buffer")
        if mv.nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, np.uint8)
    raise CodecError(
        f"{what} must be bytes, bytearray, memoryview or a numpy array, got {type(data).__name__}"
    )


def payload_length(data: Buffer) -> int:
    """Length in bytes of a buffer."""
    if isinstance(data, np.ndarray):
        return int(data.nbytes)
    return memoryview(data).nbytes
