"""Honest benchmark data: the weights and Adam moments of a model the benchmark trains itself.

Why train: compression (and so every throughput figure with a codec) depends on the bytes.
Random normal numbers have a different exponent spread from trained weights, and tiles of
one small tensor let a long-range matcher win what it never wins on real checkpoints. So the
benchmark trains a byte-level GPT (pre-LayerNorm transformer blocks, width 1024) on real
text -- the Python standard library's own source files, read as bytes -- with AdamW for a
few dozen steps, and checkpoints what such a training job holds: the fp32 weights and
AdamW's ``exp_avg`` / ``exp_avg_sq`` of every parameter.

Scale: the state must be >= 1 GiB, so the model is *wide* (as many blocks as the requested
size needs, ~12.6 M parameters each), not a small model tiled. Training it is the cost of
honesty: about 32 tokens per step (forward + backward ~ 6 x params x tokens FLOPs) and a
fused AdamW update. It is done once and cached (``--cache-dir``, by default
``~/.cache/shardsave-bench``); a larger request trains a larger model. A smaller request
takes a prefix of the cached tensors (whole blocks, in model order), which are still the
weights of a real training run.

``--dtype bf16`` casts every tensor of the state to bf16 (a bf16 model with bf16 optimizer
state), so the bf16 figures are about bf16 bytes only. The trained tensors are the same.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

D_MODEL = 1024
HEAD_DIM = 64
VOCAB = 256  # bytes
SEQ = 32
LR = 1e-3
WARMUP = 5

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SHARDSAVE_BENCH_CACHE", Path.home() / ".cache" / "shardsave-bench"))


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)
        self.heads = max(1, d // HEAD_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyGPT(torch.nn.Module):
    def __init__(self, d: int, blocks: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.blocks = torch.nn.ModuleList(_Block(d) for _ in range(blocks))
        self.ln_f = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def block_params(d: int) -> int:
    return 12 * d * d + 13 * d  # qkv, proj, fc1, fc2 (+ biases), two LayerNorms


def _corpus() -> torch.Tensor:
    """Real text: the standard library's Python sources, as bytes (a few MB is plenty)."""
    root = Path(os.__file__).parent
    parts: list[bytes] = []
    total = 0
    for p in sorted(root.glob("*.py")):
        data = p.read_bytes()
        parts.append(data)
        total += len(data)
        if total > 8 << 20:
            break
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def train(d: int, blocks: int, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train TinyGPT(d, blocks) for ``steps`` AdamW steps; weights and moments, by name (fp32)."""
    torch.manual_seed(seed)
    model = TinyGPT(d, blocks)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    text = _corpus()
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    _log(f"training a {blocks}-block width-{d} byte-level GPT ({n_params / 1e6:.1f} M params) "
         f"for {steps} AdamW steps on {len(text) / 1e6:.1f} MB of Python source ...")
    loss_v = float("nan")
    for step in range(steps):
        starts = torch.randint(0, len(text) - SEQ - 1, (1,), generator=g)
        batch = torch.stack([text[s : s + SEQ + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if step in (0, steps - 1) or (step + 1) % 10 == 0:
            _log(f"  step {step + 1}/{steps}: loss {loss_v:.3f} ({time.perf_counter() - t0:.0f} s)")
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        out[f"model.{name}"] = p.detach()
        out[f"optim.{name}.exp_avg"] = st["exp_avg"]
        out[f"optim.{name}.exp_avg_sq"] = st["exp_avg_sq"]
    return out


def _ordered(names: list[str]) -> list[str]:
    """Model order (block by block), so that a prefix is whole blocks with their moments."""
    def key(n: str) -> tuple[int, str]:
        parts = n.split(".")
        if "blocks" in parts:
            return (int(parts[parts.index("blocks") + 1]) + 1, n)
        return (0 if "embed" in n else 10**9, n)
    return sorted(names, key=key)


def trained_state(total_bytes: int, dtype: str, *, cache_dir: Path | None = None, steps: int = 40,
                  tiny: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of a trained model + AdamW state holding >= ``total_bytes`` in ``dtype``.

    Tiny mode trains a width-64 model for 5 steps in about a second (smoke tests).
    """
    itemsize = DTYPES[dtype].itemsize
    d = 64 if tiny else D_MODEL
    need_params = math.ceil(total_bytes / (3 * itemsize))
    blocks = max(1, math.ceil(need_params / block_params(d)))
    full = _cached(d, blocks, min(steps, 5) if tiny else steps, cache_dir or default_cache_dir())
    # A prefix of whole tensors, in model order, with at least total_bytes.
    out: dict[str, torch.Tensor] = {}
    size = 0
    names = _ordered(list(full))
    by_block: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        group = parts[parts.index("blocks") + 1] if "blocks" in parts else n.split(".", 1)[1].split(".")[0]
        by_block.setdefault(group, []).append(n)
    for group in dict.fromkeys(_group_order(names)):
        for n in by_block[group]:
            out[n] = full[n].to(DTYPES[dtype])
            size += out[n].numel() * itemsize
        if size >= total_bytes:
            break
    return out


def _group_order(names: list[str]) -> Iterator[str]:
    for n in names:
        parts = n.split(".")
        yield parts[parts.index("blocks") + 1] if "blocks" in parts else n.split(".", 1)[1].split(".")[0]


def _cached(d: int, blocks: int, steps: int, cache_dir: Path) -> dict[str, torch.Tensor]:
    """The largest cached training run with >= ``blocks`` blocks, or a new one."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    best: tuple[int, Path] | None = None
    for p in cache_dir.glob(f"gpt-d{d}-b*-s{steps}.pt"):
        try:
            b = int(p.name.split("-b")[1].split("-")[0])
        except ValueError:
            continue
        if b >= blocks and (best is None or b < best[0]):
            best = (b, p)
    if best is not None:
        _log(f"using cached trained state {best[1]}")
        return torch.load(best[1], mmap=True, weights_only=True)
    state = train(d, blocks, steps)
    path = cache_dir / f"gpt-d{d}-b{blocks}-s{steps}.pt"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    _log(f"cached trained state at {path}")
    del state
    return torch.load(path, mmap=True, weights_only=True)


def nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
