"""Golden payloads: bytes written by shardsave that every later version must decode.

Never edit these; add new ones when a codec version is added. docs/CODECS.md walks through
the first shuffle example byte by byte.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardsave.codec import checksum, decode_chunk

_ONE_TWO = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
_PATTERN = torch.tensor([1.0, 1.5, -2.0, 0.0] * 16, dtype=torch.bfloat16)

GOLDEN = [
    ("raw/1", "803f00c0003f", _ONE_TWO, None),
    (
        "zstd-shuffle/1",
        "010202000003000000000000000003000000000000008000003fc03f",
        _ONE_TWO,
        None,
    ),
    (
        "zstd-shuffle/1",
        "01020200"
        "011300000000000000"
        "011300000000000000"
        "28b52ffd20405500002080c00000010059724428b52ffd2040550000203f3fc0000100597244",
        _PATTERN,
        0xBD313C29,
    ),
    (
        "zstd/1",
        "28b52ffd20807d000040803fc03f00c0000001007569e102",
        _PATTERN,
        0x0312D37B,
    ),
]


@pytest.mark.parametrize(("descriptor", "payload_hex", "tensor", "crc"), GOLDEN)
def test_golden_payload_decodes(
    descriptor: str, payload_hex: str, tensor: torch.Tensor, crc: int | None
) -> None:
    payload = bytes.fromhex(payload_hex)
    if crc is not None:
        assert checksum(payload) == crc
    expected = tensor.view(torch.uint8).numpy()
    out = np.empty(expected.size, np.uint8)
    decode_chunk(descriptor, payload, raw_length=expected.size, itemsize=2, out=out)
    assert np.array_equal(out, expected)
