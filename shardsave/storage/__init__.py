"""fsspec-backed checkpoint storage: parallel data-file writes, ranged reads, atomic commit.

Every rank opens the checkpoint directory as a :class:`Storage` and writes its own data
files through :meth:`Storage.open_writer`; the coordinator commits ``index.json`` last with
:meth:`Storage.write_atomic` (temporary file + fsync + rename locally, one PUT on object
stores). Loading reads only the byte ranges it needs with :meth:`Storage.read_ranges`.

Modules: :mod:`.base` (the generic fsspec implementation), :mod:`.local` (the os-level
fast path with fsync for local paths), :mod:`.writer` (append-only data-file writers),
:mod:`.retry` (the one retry policy every operation goes through).
"""

from shardsave.storage.base import Storage
from shardsave.storage.writer import DataWriter

__all__ = ["DataWriter", "Storage"]
