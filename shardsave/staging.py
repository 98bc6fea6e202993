"""Staging: a private host-memory copy of a state dict, so training can go on while it is saved.

``ss.async_save`` must return as soon as the state can no longer change under the save.
The only way to guarantee that is a copy: after staging, the training loop may update
parameters and optimizer state in place while a background thread encodes and writes the
copy. (The alternative, copy-on-write or blocking the optimizer until the write ends,
needs hooks into every optimizer and still stalls the step that touches a tensor first.)

Copies are what a save of N bytes pays for up front, so they are made cheap:

* Buffers are **reused across saves**, keyed by (key, kind, shape, dtype, device). Copying
  into already-touched memory runs at memory bandwidth (~11 GB/s here); a fresh allocation
  page-faults at ~0.5 GB/s (docs/MEASUREMENTS.md). A key whose shape or dtype changed gets a
  new buffer; buffers not used by the latest save are dropped.
* CUDA tensors go to **pinned** host buffers with non-blocking copies on a side stream (so
  the copies overlap each other and do not queue behind training kernels launched later);
  the side stream first waits for the current stream, so the copy sees every update already
  queued, and it is synchronised before :meth:`Stager.stage` returns -- after that the
  device memory may change freely.
* DTensors: only the local shard is copied; the DTensor is rebuilt around the copy with
  ``DTensor.from_local(..., run_check=False, shape=, stride=)``, so the save plans the same
  global layout. A DTensor on a CUDA mesh is rebuilt on a CPU twin of its mesh (same ranks,
  no process groups): ``from_local`` would otherwise move the copy back to the device.
* Immutable leaves (None, bool, int, float, str, bytes, numpy scalars) are shared; mutable
  ones (bytearray, memoryview, empty containers) are copied; containers are rebuilt.

A stager's buffers may be reused only once the save that read them has finished; the
async-save machinery guarantees that by allowing one save in flight.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shardsave.plan.flatten import PerRank, display_key, flatten

__all__ = ["Stager", "StagingStats"]


@dataclass(frozen=True)
class StagingStats:
    """What one :meth:`Stager.stage` call did."""

    bytes_copied: int
    """Bytes copied into host buffers (tensors and arrays)."""
    bytes_allocated: int
    """Bytes of buffers that had to be allocated (not reused) for this call."""
    seconds: float
    """Wall time of the call, device synchronisation included."""


_BufferKey = tuple[str, str, tuple[int, ...], str, str]


class Stager:
    """Copies state dicts into host buffers it keeps and reuses (see the module docstring).

    Not thread-safe by design: one stager stages one state dict at a time, on the thread
    that owns the tensors (the training thread).
    """

    def __init__(self) -> None:
        self._buffers: dict[_BufferKey, Any] = {}
        self._used: dict[_BufferKey, Any] = {}
        self._cpu_meshes: dict[int, Any] = {}
        self._stream: Any = None
        self._allocated = 0
        self._copied = 0
        self._lock = threading.Lock()

    @property
    def buffer_bytes(self) -> int:
        """Host memory held for reuse."""
        return sum(_nbytes(b) for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (the next stage allocates afresh)."""
        with self._lock:
            self._buffers.clear()
            self._cpu_meshes.clear()

    def stage(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], StagingStats]:
        """A copy of ``state_dict`` whose tensors and arrays live in this stager's host buffers.

        Raises UnsupportedValueError (naming the key) for a value shardsave cannot save,
        before anything is copied.
        """
        import time

        start = time.perf_counter()
        flatten(state_dict)  # validation only: names the key of any unsupported value
        with self._lock, torch.no_grad():
            self._used = {}
            self._allocated = 0
            self._copied = 0
            try:
                out = self._copy(state_dict, ())
            finally:
                if self._stream is not None:
                    # Every non-blocking device-to-host copy must have landed before the
                    # caller may touch the device tensors again.
                    self._stream.synchronize()
                # Keep only what this save used: a key that disappeared must not pin memory.
                self._buffers = self._used
                self._used = {}
        stats = StagingStats(self._copied, self._allocated, time.perf_counter() - start)
        return out, stats

    # ------------------------------------------------------------------ the walk

    def _copy(self, node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, PerRank):
            return PerRank(self._copy(node.value, path))
        if isinstance(node, dict):
            return {k: self._copy(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            items = [self._copy(v, (*path, i)) for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        key = display_key(path)
        if isinstance(node, torch.Tensor):
            return self._tensor(node, key)
        if isinstance(node, np.ndarray):
            buf = self._buffer(key, "numpy", node.shape, str(node.dtype), "cpu",
                               lambda: np.empty(node.shape, dtype=node.dtype))
            np.copyto(buf, node)
            self._copied += node.nbytes
            return buf
        if isinstance(node, (bytearray, memoryview)):
            return bytes(node)
        if node is None or isinstance(node, (bool, int, float, str, bytes, np.generic)):
            return node  # immutable
        return copy.deepcopy(node)

    def _tensor(self, t: torch.Tensor, key: str) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            local = self._plain(t.to_local(), key)
            mesh = t.device_mesh
            if mesh.device_type != "cpu":
                mesh = self._cpu_twin(mesh)
            return _rebuild(t, local, mesh)
        return self._plain(t, key)

    def _plain(self, t: torch.Tensor, key: str) -> torch.Tensor:
        t = t.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        shape = tuple(t.shape)
        if t.device.type == "cuda":
            buf = self._buffer(key, "tensor", shape, str(t.dtype), "pinned",
                               lambda: torch.empty(shape, dtype=t.dtype, pin_memory=True))
            stream = self._side_stream(t.device)
            # The side stream must see every kernel already queued on the current stream
            # (the last optimizer step), and the source must not be freed before the copy ran.
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                buf.copy_(t, non_blocking=True)
            t.record_stream(stream)
        else:
            if t.device.type != "cpu":
                t = t.to("cpu")  # other accelerators: a blocking copy (no pinned-memory path)
            buf = self._buffer(key, "tensor", shape, str(t.dtype), "cpu",
                               lambda: torch.empty(shape, dtype=t.dtype))
            buf.copy_(t)
        self._copied += t.numel() * t.element_size()
        return buf

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None or self._stream.device != device:
            if self._stream is not None:
                self._stream.synchronize()
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _cpu_twin(self, mesh: Any) -> Any:
        """The same ranks as a CPU mesh without process groups (so from_local stays on the host)."""
        twin = self._cpu_meshes.get(id(mesh))
        if twin is None or twin[0] is not mesh:
            from torch.distributed.device_mesh import DeviceMesh

            twin = (mesh, DeviceMesh("cpu", mesh.mesh, mesh_dim_names=mesh.mesh_dim_names, _init_backend=False))
            self._cpu_meshes[id(mesh)] = twin
        return twin[1]

    def _buffer(self, key: str, kind: str, shape: tuple[int, ...], dtype: str, device: str, make: Any) -> Any:
        bkey: _BufferKey = (key, kind, shape, dtype, device)
        buf = self._buffers.get(bkey)
        if buf is None:
            buf = make()
            self._allocated += _nbytes(buf)
        self._used[bkey] = buf
        return buf

    def buffers(self) -> Iterator[tuple[_BufferKey, Any]]:
        """(key, buffer) pairs held for reuse (for tests and memory accounting)."""
        return iter(list(self._buffers.items()))


def _rebuild(dt: Any, local: torch.Tensor, mesh: Any) -> Any:
    """A DTensor with ``dt``'s global shape, stride and placements around ``local`` on ``mesh``.

    ``DTensor.from_local(..., run_check=False, shape=, stride=)`` is the public way and the
    fallback; it goes through autograd and spec validation, ~250 us per tensor, which is
    most of the stall of a save of a model with thousands of parameters and optimizer
    states. The DTensor constructor with a copy of the source's spec does the same in a
    few microseconds.
    """
    from torch.distributed.tensor import DTensor

    try:
        spec = dt._spec
        if spec.mesh is not mesh:
            spec = copy.copy(spec)
            spec.mesh = mesh
        out = DTensor(local, spec, requires_grad=False)
        if out.shape == dt.shape and out.placements == dt.placements:
            return out
    except Exception:
        pass
    return DTensor.from_local(local, mesh, dt.placements, run_check=False, shape=dt.shape, stride=dt.stride())


def _nbytes(buf: Any) -> int:
    if isinstance(buf, torch.Tensor):
        return buf.numel() * buf.element_size()
    return int(buf.nbytes)
