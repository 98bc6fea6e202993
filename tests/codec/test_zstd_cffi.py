"""zstd through zstandard's cffi binding (``codec/_zstd_cffi.py``): ordinary frames, the
Huffman-literal parameter really applied, errors named, and a clean fallback without cffi."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
import zstandard

from shardsave import knobs
from shardsave.codec import _threadlocal, _zstd_cffi, decode_chunk, encode_chunk
from shardsave.errors import CodecError, CorruptionError

pytestmark = pytest.mark.skipif(
    _zstd_cffi.binding() is None, reason="zstandard's cffi binding is not available (no cffi)"
)


def exponent_like(n: int, seed: int = 0) -> np.ndarray:
    """Low-entropy bytes without long repeats, like the exponent stream of trained weights."""
    rng = np.random.default_rng(seed)
    return (120 + np.clip(rng.normal(0, 1.5, n), -8, 8)).astype(np.uint8)


def compress(cctx: _zstd_cffi.Compressor, src: np.ndarray) -> bytes:
    dst = np.empty(_threadlocal.frame_bound(src.size), np.uint8)
    size = cctx.compress_into(src, dst)
    return dst[:size].tobytes()


def test_frames_are_ordinary_zstd_frames_both_ways() -> None:
    src = exponent_like(300_000)
    frame = compress(_zstd_cffi.Compressor(level=1, hash_log=6, min_match=7, target_length=16,
                                           huffman_literals=True), src)
    assert zstandard.frame_content_size(frame) == src.size
    assert zstandard.ZstdDecompressor().decompress(frame) == src.tobytes()
    # and frames of the C binding decode through the cffi decompressor
    other = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(src.tobytes())
    out = np.empty(src.size, np.uint8)
    _zstd_cffi.Decompressor().decompress_into(memoryview(other), out, "test")
    assert np.array_equal(out, src)


def test_huffman_literal_parameter_reaches_zstd() -> None:
    # With acceleration, zstd stores literals raw unless told otherwise: ratio ~1 on these
    # bytes. With the parameter, they are Huffman-coded (entropy ~3 bits: ratio > 2).
    src = exponent_like(1 << 20)
    raw_literals = compress(_zstd_cffi.Compressor(level=1, target_length=16), src)
    huffman = compress(
        _zstd_cffi.Compressor(level=1, target_length=16, huffman_literals=True), src
    )
    assert src.size / len(raw_literals) < 1.2
    assert src.size / len(huffman) > 2.0


def test_destination_too_small_is_a_codec_error() -> None:
    src = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)
    with pytest.raises(CodecError, match="zstd compression of 10000 bytes"):
        _zstd_cffi.Compressor(level=1).compress_into(src, np.empty(100, np.uint8))


def test_bad_parameter_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match="zstd parameter"):
        _zstd_cffi.Compressor(level=1, hash_log=99)


def test_decoding_more_or_less_than_the_buffer_is_corruption() -> None:
    src = exponent_like(5000)
    frame = memoryview(compress(_zstd_cffi.Compressor(level=1), src))
    dctx = _zstd_cffi.Decompressor()
    with pytest.raises(CorruptionError, match="what"):
        dctx.decompress_into(frame, np.empty(4999, np.uint8), "what")
    with pytest.raises(CorruptionError, match="what"):
        dctx.decompress_into(frame[:-3], np.empty(5000, np.uint8), "what")


def test_stream_compressor_follows_the_knob_and_level() -> None:
    with knobs.override(ZSTD_CFFI=1):
        assert isinstance(_threadlocal.stream_compressor(1), _zstd_cffi.Compressor)
        assert _threadlocal.direct_decompressor() is not None
        with pytest.raises(CodecError, match="out of range"):
            _threadlocal.stream_compressor(99)
    with knobs.override(ZSTD_CFFI=0):
        assert not isinstance(_threadlocal.stream_compressor(1), _zstd_cffi.Compressor)
        assert _threadlocal.direct_decompressor() is None


def test_trained_like_weights_compress_at_least_as_well_as_the_c_binding() -> None:
    weights = (torch.randn(1 << 19) * 0.02).to(torch.bfloat16)
    raw = weights.view(torch.uint8).numpy()
    sizes = {}
    for flag in (0, 1):
        with knobs.override(ZSTD_CFFI=flag):
            enc = encode_chunk(raw, itemsize=2, is_float=True, codec="zstd-shuffle")
            sizes[flag] = enc.stored_length
            out = np.empty(raw.size, np.uint8)
            decode_chunk(enc.descriptor, enc.payload, raw_length=raw.size, itemsize=2, out=out)
            assert np.array_equal(out, raw)
    assert sizes[1] <= sizes[0] * 1.01


def test_threads_use_their_own_contexts() -> None:
    sources = [exponent_like(200_000, seed) for seed in range(4)]
    results: dict[int, bool] = {}

    def work(i: int) -> None:
        ok = True
        for _ in range(20):
            enc = encode_chunk(sources[i], itemsize=2, is_float=True, codec="zstd-shuffle")
            out = np.empty(sources[i].size, np.uint8)
            decode_chunk(enc.descriptor, enc.payload, raw_length=out.size, itemsize=2, out=out)
            ok &= bool(np.array_equal(out, sources[i]))
        results[i] = ok

    with knobs.override(ZSTD_CFFI=1):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == dict.fromkeys(range(4), True)


def test_without_cffi_the_c_binding_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard.backend_cffi", None)  # import fails
    monkeypatch.setattr(_zstd_cffi, "_loaded", False)
    monkeypatch.setattr(_zstd_cffi, "_binding", None)
    assert _zstd_cffi.binding() is None
    with pytest.raises(CodecError, match="pip install cffi"):
        _zstd_cffi.Compressor(level=1)
    src = exponent_like(100_000)
    result: list[bool] = []

    def fresh_thread() -> None:  # no contexts cached from earlier tests
        enc = encode_chunk(src, itemsize=2, is_float=True, codec="zstd-shuffle")
        out = np.empty(src.size, np.uint8)
        decode_chunk(enc.descriptor, enc.payload, raw_length=out.size, itemsize=2, out=out)
        result.append(bool(np.array_equal(out, src)) and _threadlocal.direct_decompressor() is None)

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert result == [True]
