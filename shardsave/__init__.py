"""shardsave: a distributed sharded checkpoint engine for PyTorch.

Every rank writes its own compressed shards in parallel through fsspec; a coordinator
commits one index last, atomically; loading reads only the byte ranges each rank needs
and reshards onto any world size or layout. Nothing is ever unpickled.
"""

from shardsave.asyncsave import AsyncSaveHandle, async_save
from shardsave.errors import (
    AuthenticationError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptionError,
    EncryptionError,
    KeyRequiredError,
    LimitExceededError,
    ShardsaveError,
    StateDictMismatchError,
    UnsupportedValueError,
    WrongKeyError,
)
from shardsave.format.index import CheckpointInfo
from shardsave.load import LoadResult, info, load, load_full
from shardsave.manager import CheckpointManager
from shardsave.plan.flatten import PerRank
from shardsave.plan.rename import strip_wrappers
from shardsave.save import save
from shardsave.tiered import TieredSaveHandle, tiered_save, upload
from shardsave.verify import VerifyReport, verify

__version__ = "0.1.0"

_LAZY = {"DCPReader": "shardsave.dcp", "DCPWriter": "shardsave.dcp"}
"""Public names imported on first use: the DCP adapter pulls in torch.distributed.checkpoint."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shardsave' has no attribute {name!r}")

__all__ = [
    "AsyncSaveHandle",
    "AuthenticationError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptionError",
    "DCPReader",
    "DCPWriter",
    "EncryptionError",
    "KeyRequiredError",
    "LimitExceededError",
    "LoadResult",
    "PerRank",
    "ShardsaveError",
    "StateDictMismatchError",
    "TieredSaveHandle",
    "UnsupportedValueError",
    "VerifyReport",
    "WrongKeyError",
    "__version__",
    "async_save",
    "info",
    "load",
    "load_full",
    "save",
    "strip_wrappers",
    "tiered_save",
    "upload",
    "verify",
]
