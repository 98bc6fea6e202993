"""Malformed payloads: always CorruptionError (CodecError for unknown descriptors), never a
different exception, never an allocation much larger than the chunk."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zstandard

from shardsave.codec import decode_chunk, encode_chunk
from shardsave.codec.shuffle import header_size
from shardsave.errors import CodecError, CorruptionError

from .helpers import sample

pytestmark = pytest.mark.usefixtures("zstd_binding")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def encoded(
    codec: str, dtype: torch.dtype = torch.float32, numel: int = 3000
) -> tuple[bytes, str, int, int]:
    raw = sample(dtype, numel)
    itemsize = dtype.itemsize
    enc = encode_chunk(raw, itemsize=itemsize, is_float=True, codec=codec)
    return bytes(memoryview(enc.payload)), enc.descriptor, raw.size, itemsize


def decode(descriptor: str, payload: bytes, raw_length: int, itemsize: int) -> np.ndarray:
    out = np.empty(raw_length, np.uint8)
    decode_chunk(descriptor, payload, raw_length=raw_length, itemsize=itemsize, out=out)
    return out


def test_unknown_descriptor_names_it_and_the_known_ones() -> None:
    with pytest.raises(CodecError) as info:
        decode("lz4/1", b"abc", 3, 1)
    message = str(info.value)
    assert "'lz4/1'" in message and "'zstd-shuffle/1'" in message and "'raw/1'" in message
    with pytest.raises(CodecError):
        decode("zstd-shuffle/2", b"", 0, 2)


@pytest.mark.parametrize("codec", ["raw", "zstd", "zstd-shuffle"])
def test_every_truncation_is_detected(codec: str) -> None:
    payload, desc, n, itemsize = encoded(codec)
    for cut in sorted(
        {0, 1, 3, 4, 5, 9, 20, 40, len(payload) // 2, len(payload) - 4, len(payload) - 1}
    ):
        with pytest.raises(CorruptionError):
            decode(desc, payload[:cut], n, itemsize)


@pytest.mark.parametrize("codec", ["raw", "zstd", "zstd-shuffle"])
def test_trailing_bytes_are_detected(codec: str) -> None:
    payload, desc, n, itemsize = encoded(codec)
    for extra in (b"\x00", b"junk", payload[:64]):
        with pytest.raises(CorruptionError):
            decode(desc, payload + extra, n, itemsize)


@pytest.mark.parametrize("codec", ["raw", "zstd", "zstd-shuffle"])
def test_lying_raw_length(codec: str) -> None:
    payload, desc, n, itemsize = encoded(codec)
    for claim in (0, itemsize, n - itemsize, n + itemsize, 2 * n):
        with pytest.raises(CorruptionError):
            decode(desc, payload, claim, itemsize)


def test_wrong_itemsize_for_shuffle() -> None:
    payload, desc, n, _ = encoded("zstd-shuffle")
    for itemsize in (1, 2, 8):
        with pytest.raises(CorruptionError):
            decode(desc, payload, n, itemsize)


def test_negative_or_non_int_lengths() -> None:
    with pytest.raises(CorruptionError):
        decode_chunk("raw/1", b"", raw_length=-1, itemsize=1, out=np.empty(0, np.uint8))
    with pytest.raises(CorruptionError):
        decode_chunk("raw/1", b"", raw_length=0, itemsize=0, out=np.empty(0, np.uint8))


def test_bad_out_is_a_codec_error() -> None:
    for out in (
        np.empty(9, np.uint8),
        np.empty(10, np.int8),
        np.empty((2, 5), np.uint8),
        np.empty(20, np.uint8)[::2],
    ):
        with pytest.raises(CodecError):
            decode_chunk("raw/1", b"0123456789", raw_length=10, itemsize=1, out=out)


def test_every_flipped_header_byte_of_shuffle() -> None:
    payload, desc, n, itemsize = encoded("zstd-shuffle")
    for pos in range(header_size(itemsize)):
        for value in (0x00, 0x01, 0x7F, 0xFF):
            bad = bytearray(payload)
            if bad[pos] == value:
                continue
            bad[pos] = value
            try:
                out = decode(desc, bytes(bad), n, itemsize)
            except CorruptionError:
                continue
            # Only the high bytes of a stream length could be changed without notice, and
            # those are checked against the payload size, so nothing may decode here.
            pytest.fail(f"header byte {pos} set to {value:#x} went unnoticed ({out[:4]})")


def lengths_header(modes_lengths: list[tuple[int, int]], itemsize: int) -> bytes:
    head = struct.pack("<BBBB", 1, itemsize, itemsize, 0)
    return head + b"".join(struct.pack("<BQ", m, ln) for m, ln in modes_lengths)


def test_shuffle_lying_stream_lengths() -> None:
    n = 100
    body = bytes(2 * n)
    cases = [
        [(0, n), (0, n + 1)],  # raw stream longer than raw_length / itemsize
        [(0, n), (0, n - 1)],
        [(0, 2**64 - 1), (0, n)],  # absurd length, must not overflow anything
        [(1, 0), (0, n)],  # empty compressed stream
        [(1, n + 1), (0, n)],  # compressed stream longer than the raw stream
        [(2, n), (0, n)],  # unknown mode
    ]
    for entries in cases:
        with pytest.raises(CorruptionError):
            decode("zstd-shuffle/1", lengths_header(entries, 2) + body, 2 * n, 2)


def test_shuffle_frame_declaring_the_wrong_size() -> None:
    n = 1000
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(n + 1))
    payload = lengths_header([(0, n), (1, len(frame))], 2) + bytes(n) + frame
    with pytest.raises(CorruptionError, match="declares"):
        decode("zstd-shuffle/1", payload, 2 * n, 2)


def test_frame_without_content_size() -> None:
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(100))
    with pytest.raises(CorruptionError, match="no size"):
        decode("zstd/1", frame, 100, 1)


def test_two_frames_and_skippable_frames() -> None:
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    frame = cctx.compress(b"a" * 50)
    with pytest.raises(CorruptionError):
        decode("zstd/1", frame + frame, 50, 1)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"abcd"
    with pytest.raises(CorruptionError):
        decode("zstd/1", skippable + frame, 50, 1)
    with pytest.raises(CorruptionError):
        decode("zstd/1", frame + skippable, 50, 1)


def test_frame_whose_blocks_expand_past_the_declared_size() -> None:
    # Declared content size patched down from 4096 to 300: the block structure is intact, so
    # only decoding can notice; it must stop at the buffer and report corruption.
    frame = bytearray(
        zstandard.ZstdCompressor(level=1, write_content_size=True).compress(b"xy" * 2048)
    )
    fhd = frame[4]
    assert fhd >> 6 == 1 and fhd & 0x20  # 2-byte FCS, single segment (value - 256)
    frame[5:7] = (300 - 256).to_bytes(2, "little")
    assert zstandard.frame_content_size(bytes(frame)) == 300
    with pytest.raises(CorruptionError):
        decode("zstd/1", bytes(frame), 300, 1)


def test_checksummed_frame_from_another_writer_decodes() -> None:
    frame = zstandard.ZstdCompressor(
        level=3, write_content_size=True, write_checksum=True
    ).compress(b"hello" * 999)
    assert bytes(decode("zstd/1", frame, 5 * 999, 1)) == b"hello" * 999
    bad = bytearray(frame)
    bad[-1] ^= 0xFF  # the content checksum
    with pytest.raises(CorruptionError):
        decode("zstd/1", bytes(bad), 5 * 999, 1)


def test_zstd_bomb_is_refused_before_allocating() -> None:
    # 1 GiB of zeros in a 32 KB frame, claimed to be a small chunk, decoded under an
    # address-space limit far below 1 GiB: a decoder that trusted the frame would die with
    # MemoryError (or worse) instead of raising CorruptionError.
    script = textwrap.dedent(
        """
        import resource, struct, sys, types
        import numpy as np, zstandard

        # Import only the codec package: the top-level package pulls in torch, whose
        # address-space reservations would make the limit below meaningless.
        package = types.ModuleType("shardsave")
        package.__path__ = [sys.argv[1] + "/shardsave"]
        sys.modules["shardsave"] = package
        from shardsave.codec import decode_chunk
        from shardsave.errors import CorruptionError

        size = 1 << 30
        cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
        zeros = bytes(1 << 24)
        bomb = b"".join(cobj.compress(zeros) for _ in range(size // len(zeros))) + cobj.flush()
        del zeros
        assert zstandard.frame_content_size(bomb) == size
        shuffle_bomb = struct.pack("<BBBBBQBQ", 1, 2, 2, 0, 0, 5, 1, len(bomb)) + bytes(5) + bomb
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
        limit = vm + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        results = []
        for desc, payload, claim in (
            ("zstd/1", bomb, 10),
            ("zstd/1", bomb, 1 << 20),
            ("zstd-shuffle/1", shuffle_bomb, 10),
        ):
            out = np.empty(claim, np.uint8)
            try:
                decode_chunk(desc, payload, raw_length=claim, itemsize=2 if "shuffle" in desc else 1, out=out)
                results.append("decoded")
            except CorruptionError:
                results.append("refused")
        print(results)
        sys.exit(0 if results == ["refused"] * 3 else 1)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, REPO], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
