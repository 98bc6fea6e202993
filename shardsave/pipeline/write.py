"""One rank's write path: cut pieces into chunks, encode them in a thread pool, append them
to the rank's data file in order, then append the table of contents and make it durable.

Encoding (zstandard, numpy byte grouping) releases the GIL, so the pool really runs in
parallel, and the main thread writes chunk k while the pool encodes k+1..k+w. At most
``knobs.max_inflight_chunks()`` encoded chunks wait at once, which bounds the extra host
memory of a save to about that many chunks -- never a copy of the whole state.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from shardsave import knobs
from shardsave.codec import EncodedChunk, checksum, encode_chunk
from shardsave.codec.base import box_slices
from shardsave.faults import fault_point
from shardsave.format.index import FileInfo
from shardsave.format.toc import TOC_DTYPE, encode_toc
from shardsave.plan.chunking import chunks_of
from shardsave.storage import Storage

if TYPE_CHECKING:
    from shardsave.crypto import SaveCipher


@dataclass(frozen=True)
class PieceWrite:
    """A piece this rank writes: entry index, piece id and the tensor view holding it."""

    entry: int
    piece: int
    data: torch.Tensor


@dataclass(frozen=True)
class _Job:
    entry: int
    piece: int
    chunk: int
    data: torch.Tensor


def _jobs(pieces: Iterable[PieceWrite], chunk_bytes: int) -> Iterator[_Job]:
    for p in pieces:
        itemsize = p.data.element_size()
        for cid, box in chunks_of(tuple(p.data.shape), itemsize, chunk_bytes):
            yield _Job(p.entry, p.piece, cid, p.data[box_slices(box)] if box[0] else p.data)


def _chunk_bytes_of(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def _encode(job: _Job, codec: str, cipher: SaveCipher | None = None, codec_ids: dict[str, int] | None = None
            ) -> EncodedChunk:
    raw = _chunk_bytes_of(job.data)
    dt = job.data.dtype
    enc = encode_chunk(raw, itemsize=job.data.element_size(), is_float=dt.is_floating_point or dt.is_complex,
                       codec=codec)
    if cipher is None:
        return enc
    # Encrypt after compressing (ciphertext does not compress); the checksum covers the
    # stored (encrypted) bytes, so `verify` without the key still finds storage corruption.
    assert codec_ids is not None
    sealed = cipher.encrypt_chunk(enc.payload, entry=job.entry, chunk=job.chunk, piece=job.piece,
                                  raw_length=enc.raw_length, codec=codec_ids[enc.descriptor])
    return replace(enc, payload=sealed, checksum=checksum(sealed))


def write_rank_file(
    storage: Storage,
    name: str,
    rank: int,
    pieces: Iterable[PieceWrite],
    *,
    codec: str,
    codec_ids: dict[str, int],
    chunk_bytes: int,
    durable: bool = True,
    cipher: SaveCipher | None = None,
) -> tuple[FileInfo, int]:
    """Write one data file; returns its FileInfo and the raw (logical) bytes it holds.

    With ``cipher`` (an encrypted save) every chunk is encrypted after encoding and the
    table of contents is MACed (``FileInfo.toc_mac``); see :mod:`shardsave.crypto`.
    """
    rows: list[tuple[int, int, int, int, int, int, int, int, int]] = []
    raw_total = 0
    window = max(knobs.max_inflight_chunks(), knobs.io_threads() + 1)
    with storage.open_writer(name) as writer, cf.ThreadPoolExecutor(
        knobs.io_threads(), thread_name_prefix="shardsave-encode"
    ) as pool:
        pending: collections.deque[tuple[_Job, cf.Future[EncodedChunk]]] = collections.deque()
        # Durable files are flushed to the device in the background while later chunks are
        # still being encoded, instead of all at once by the fsync in close(): on a disk of
        # ~0.3-0.9 GB/s that fsync was a third of a compressed save (see benchmarks/README.md).
        writeback = getattr(writer, "start_writeback", None) if durable and knobs.early_writeback() else None

        def drain_one() -> None:
            nonlocal raw_total
            job, fut = pending.popleft()
            enc = fut.result()
            offset = writer.write(enc.payload)
            length = writer.tell() - offset
            if writeback is not None:
                writeback(offset, offset + length)
            rows.append((job.entry, job.chunk, job.piece, offset, length, enc.raw_length, enc.checksum,
                         codec_ids[enc.descriptor], 0))
            raw_total += enc.raw_length
            fault_point("mid-data-write")  # tests: a crash with the file partly written

        try:
            for job in _jobs(pieces, chunk_bytes):
                pending.append((job, pool.submit(_encode, job, codec, cipher, codec_ids)))
                if len(pending) >= window:
                    drain_one()
            while pending:
                drain_one()
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            raise
        table = np.array(rows, dtype=TOC_DTYPE) if rows else np.empty(0, dtype=TOC_DTYPE)
        toc = encode_toc(table)
        toc_offset = writer.write(toc)
        size = writer.close(durable=durable)
    return (
        FileInfo(name=name, rank=rank, size=size, toc_offset=toc_offset, toc_length=len(toc),
                 toc_checksum=checksum(toc), chunks=len(rows),
                 toc_mac=cipher.toc_mac(rank, toc) if cipher is not None else None),
        raw_total,
    )
