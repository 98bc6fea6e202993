"""The shardsave exception hierarchy.

Every error raised on purpose by shardsave derives from :class:`ShardsaveError`. Where a
standard library type fits, the subclass inherits it too, so ``except FileNotFoundError``
keeps working for code that does not know about shardsave (zarr-python does the same).

Messages name the key, the file, the value received and what to do about it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class ShardsaveError(Exception):
    """Base class of every error shardsave raises on purpose."""


class UnsupportedValueError(ShardsaveError, TypeError):
    """A state-dict value shardsave cannot store, named by its key path and type."""


class CheckpointNotFoundError(ShardsaveError, FileNotFoundError):
    """No committed checkpoint at a path (no index: never saved, or an interrupted save)."""


class CheckpointExistsError(ShardsaveError, FileExistsError):
    """A save would replace a committed checkpoint and ``overwrite`` was not set."""


class CorruptionError(ShardsaveError, ValueError):
    """Stored bytes do not match their checksum, size or declared structure."""


class FormatError(CorruptionError):
    """The index or a table of contents is malformed, or of a format version we cannot read."""


class LimitExceededError(ShardsaveError, ValueError):
    """A checkpoint declares more than a safety limit allows (bytes to allocate, table rows).

    Untrusted checkpoints must not be able to exhaust memory or CPU by what they declare,
    so readers refuse before allocating; a genuine checkpoint over a limit loads once the
    knob the message names is raised.
    """


class EncryptionError(ShardsaveError, ValueError):
    """Encryption at rest: a bad key, a key that does not fit the checkpoint, or a
    checkpoint that is not encrypted although a key was given."""


class KeyRequiredError(EncryptionError):
    """The checkpoint is encrypted and no ``encryption_key`` was given."""


class WrongKeyError(EncryptionError):
    """The given key is not the one the checkpoint was saved with (its key id differs)."""


class AuthenticationError(EncryptionError, CorruptionError):
    """Authenticated data (the index, a table of contents, a chunk) fails its MAC or tag:
    the checkpoint was tampered with, or corrupted in a way a checksum did not catch."""


class FaultInjectedError(ShardsaveError, OSError):
    """A failure injected on purpose by :mod:`shardsave.faults` (tests and CI only)."""


class CodecError(ShardsaveError, ValueError):
    """An unknown codec descriptor, or a chunk its codec cannot decode."""


class StorageError(ShardsaveError, OSError):
    """A storage operation failed (after retries, for transient failures)."""


class MissingFileError(StorageError, FileNotFoundError):
    """A file the checkpoint needs is not on storage."""


class StateDictMismatchError(ShardsaveError, KeyError):
    """The target state dict does not match the checkpoint (keys, shapes or dtypes)."""

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class UnsupportedModeError(ShardsaveError, ValueError):
    """An option or mode of a caller (e.g. a DCP planner setting) that shardsave does not offer."""


class UnsafePickleError(ShardsaveError, ValueError):
    """A foreign pickle (import only) names something outside the allow-list; it was not run."""


class CheckpointError(ShardsaveError, RuntimeError):
    """A distributed save or load failed; carries every rank's failure.

    ``failures`` maps a rank to the one-line description of what went wrong there. A rank
    that stopped answering (crashed, killed, network gone) is reported as lost.
    """

    def __init__(self, message: str, failures: Mapping[int, str] | None = None) -> None:
        self.failures: dict[int, str] = dict(failures or {})
        lines = [message]
        for rank in sorted(self.failures):
            lines.append(f"  rank {rank}: {self.failures[rank]}")
        super().__init__("\n".join(lines))
