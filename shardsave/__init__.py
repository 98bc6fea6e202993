"""shardsave: a distributed sharded checkpoint engine for PyTorch.

Every rank writes its own compressed shards in parallel through fsspec; a coordinator
commits one index last, atomically; loading reads only the byte ranges each rank needs
and reshards onto any world size or layout. Nothing is ever unpickled.
"""

from shardsave.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptionError,
    ShardsaveError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from shardsave.format.index import CheckpointInfo
from shardsave.load import LoadResult, info, load, load_full
from shardsave.plan.flatten import PerRank
from shardsave.save import save
from shardsave.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CorruptionError",
    "LoadResult",
    "PerRank",
    "ShardsaveError",
    "StateDictMismatchError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "info",
    "load",
    "load_full",
    "save",
    "verify",
]
