"""One retry policy for every storage operation.

Object stores and network filesystems fail transiently all the time (throttling, dropped
connections, timeouts); at a few thousand ranks writing at once, some request *will* fail.
Retrying each operation in place is far cheaper than failing the whole save, so every
:class:`~shardsave.storage.Storage` method runs its I/O through :func:`call_with_retry`.

What is retried: only operations that are safe to repeat. Reads, whole-file PUTs, deletes,
positional local writes and "create a fresh temporary file, then rename" sequences give the
same result however many times they run. An append to a remote file that is being streamed
is *not* retried (``idempotent=False``): fsspec's buffered files upload parts as the buffer
fills, so after a failure we cannot know which bytes reached the store, and writing the data
again could duplicate or skip bytes. Nor is a failed ``fsync`` repeated on the same file:
after a writeback error Linux may drop the dirty pages and let the next fsync succeed
("fsyncgate"). In both cases the caller writes the whole file again.

Classification: the exception and its ``__cause__`` chain are checked. Permanent errors
(missing file, permission, is-a-directory, bad argument) fail at once; transient ones are
retried. botocore and aiohttp errors are recognised by class name so that this module does
not import them (they are optional dependencies of s3fs/gcsfs, not of shardsave).
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from shardsave import knobs
from shardsave.errors import MissingFileError, ShardsaveError, StorageError

__all__ = ["call_with_retry", "describe", "is_transient"]

logger = logging.getLogger("shardsave.storage")

T = TypeVar("T")

# No single wait is longer than this, however many retries the knobs allow.
MAX_BACKOFF_S = 20.0

_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EINTR",
        "EIO",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNABORTED",
        "ECONNREFUSED",
        "EPIPE",
        "EBUSY",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "EHOSTUNREACH",
    )
    if hasattr(errno, name)
)

# Exception class names (anywhere in the MRO) of botocore / aiohttp / urllib3 failures that
# are worth another attempt. Matched by name so that none of them has to be importable.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        # botocore
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProxyConnectionError",
        "HTTPClientError",
        # aiohttp
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientOSError",
        # urllib3 / requests
        "ProtocolError",
        "NewConnectionError",
    }
)

# Error codes in an S3-style ``exc.response["Error"]["Code"]`` (botocore ClientError) that
# mean "try again later".
_TRANSIENT_SERVICE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)

# Permanent: repeating cannot help, and waiting would only delay a clear error.
_PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    NotImplementedError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (explicit ``raise from`` first), without cycles."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen) and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ if cur.__cause__ is not None else cur.__context__
    return seen


def _service_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error")
        if isinstance(error, dict) and error.get("Code") is not None:
            return str(error["Code"])
    return None


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):  # BrokenPipeError, ConnectionReset…
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    return _service_code(exc) in _TRANSIENT_SERVICE_CODES


def is_transient(exc: BaseException) -> bool:
    """Whether repeating the operation that raised ``exc`` may succeed."""
    if isinstance(exc, (ShardsaveError, *_PERMANENT_TYPES)):
        return False
    return any(_is_transient_one(e) for e in _chain(exc))


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, for error messages."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def backoff_s(retry_number: int) -> float:
    """Seconds to wait before retry ``retry_number`` (0-based): exponential, jittered, capped.

    Half of the delay is fixed and half random, so that thousands of ranks throttled at the
    same moment do not all come back at the same moment.
    """
    delay = min(MAX_BACKOFF_S, knobs.storage_retry_base_s() * (2.0**retry_number))
    return delay / 2 + random.uniform(0.0, delay / 2)


def _final_error(
    exc: BaseException, *, op: str, path: str, attempts: int, transient: bool
) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return MissingFileError(
            f"{op} {path}: file does not exist (attempt {attempts}: {describe(exc)})"
        )
    if transient:
        return StorageError(
            f"{op} {path} failed after {attempts} attempt(s); last error: {describe(exc)}"
        )
    return StorageError(
        f"{op} {path} failed on attempt {attempts} with a permanent error (not retried): "
        f"{describe(exc)}"
    )


def call_with_retry(
    fn: Callable[[], T],
    *,
    op: str,
    path: str | Callable[[], str],
    idempotent: bool = True,
) -> T:
    """Run ``fn()``; retry transient failures with backoff; translate the final failure.

    ``op`` names the operation and ``path`` the full path, for the messages (a callable is
    asked for it only when a message is written, for batches whose failing file is known
    only then). Errors that are
    already shardsave errors pass through unchanged. A ``FileNotFoundError`` becomes
    :class:`MissingFileError`; every other failure becomes :class:`StorageError`, raised
    ``from`` the original. With ``idempotent=False`` nothing is retried (see module doc).
    """
    retries = max(0, knobs.storage_retries()) if idempotent else 0
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except ShardsaveError:
            raise
        except Exception as exc:
            transient = is_transient(exc)
            where = path() if callable(path) else path
            if transient and attempt <= retries:
                wait = backoff_s(attempt - 1)
                logger.warning(
                    "%s %s: transient failure on attempt %d of %d (%s); retrying in %.3fs",
                    op,
                    where,
                    attempt,
                    retries + 1,
                    describe(exc),
                    wait,
                )
                time.sleep(wait)
                continue
            if transient and not idempotent:
                raise StorageError(
                    f"{op} {where} failed with {describe(exc)}; not retried, because "
                    "repeating it cannot be trusted (a partly streamed upload, or an fsync "
                    "after a writeback error): write the whole file again"
                ) from exc
            raise _final_error(
                exc, op=op, path=where, attempts=attempt, transient=transient
            ) from exc
