"""Commit claims: of two saves racing to one path, exactly one commits; the other fails clearly.

Why: the commit is a rename (or one PUT), and both replace whatever is there. Two jobs
saving to the same path at once would otherwise both "succeed": the later index silently
replaces the earlier one, whose caller believes in a checkpoint that is gone. So the
coordinator commits conditionally (``shardsave.save`` steps 2 and 6):

1. (at planning) remember the *base*: the save id the index names, or ``none``;
2. (at commit) create the claim ``<path>/.commit-claim-<base>`` exclusively -- ``O_EXCL``
   locally, a conditional PUT (If-None-Match) on object stores that support it;
3. read the index again: it must still name the base, else another save committed
   meanwhile;
4. write the index (the commit point); 5. remove the claim.

Two saves with the same base cannot both pass (2) while the claim exists; one that passes
(2) after the other removed its claim fails (3), because the index names the other save by
then. Either way the loser has written only its own data files (new save id), which it
removes, and raises naming the winner. The claim exists only between (2) and (5), a few
milliseconds, so a crash leaves one behind only in that instant: it then blocks saves based
on the same index until it is older than ``knobs.claim_stale_s()`` (2 minutes) or is
removed by hand (the error says which file). A claim left by a crash after (4) is harmless:
no save is based on the replaced index any more.

Object stores without conditional writes: fsspec's fallback for (2) is an exists check and
then a PUT, so two commits within one round trip of each other can both pass it; (3) still
catches most of those races, not all (see the README's SECURITY section).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import time
from collections.abc import Iterator

from shardsave import knobs
from shardsave.errors import CheckpointExistsError, MissingFileError, ShardsaveError
from shardsave.format.names import INDEX_NAME, claim_name
from shardsave.storage import Storage

__all__ = ["ConcurrentSaveError", "commit_claim", "index_base"]

NO_INDEX = "none"
_SAVE_ID_RE = re.compile(rb'"save_id":"([0-9A-Za-z_-]{1,64})"')


class ConcurrentSaveError(CheckpointExistsError):
    """Another save committed to the same path while this one ran (this one committed nothing)."""


def index_base(storage: Storage) -> str:
    """The save id the committed index names (``none`` without an index; a digest of the
    bytes for an index whose save id cannot be found)."""
    try:
        data = storage.read_bytes(INDEX_NAME, max_bytes=knobs.max_index_bytes())
    except MissingFileError:
        return NO_INDEX
    # The writer puts save_id among the first members, before any user metadata.
    m = _SAVE_ID_RE.search(data, 0, 4096)
    return m.group(1).decode("ascii") if m else "x" + hashlib.sha256(data).hexdigest()[:32]


@contextlib.contextmanager
def commit_claim(storage: Storage, base: str, save_id: str) -> Iterator[None]:
    """(coordinator) Hold the commit claim on ``base`` while the block writes the index.

    Raises :class:`ConcurrentSaveError` if another save holds it or has committed since
    ``base`` was read; the block then does not run.
    """
    name = claim_name(base)
    record = json.dumps({"save_id": save_id, "host": socket.gethostname(), "created": time.time()}).encode()
    if not storage.write_exclusive(name, record) and _read_claim(storage, name).get("save_id") != save_id:
        # (A claim naming this save is ours: a retried conditional PUT whose first attempt
        # landed although its answer was lost.)
        if not _break_if_stale(storage, name):
            raise ConcurrentSaveError(_holder_message(storage, name))
        if not storage.write_exclusive(name, record):
            raise ConcurrentSaveError(_holder_message(storage, name))
    try:
        now = index_base(storage)
        if now != base:
            raise ConcurrentSaveError(
                f"another save (save id {now}) committed to {storage.url} while this save ran; this save "
                "committed nothing -- two jobs were saving to the same path at once"
            )
        yield
    finally:
        with contextlib.suppress(ShardsaveError):  # a leftover claim only delays a later racer
            storage.remove([name])


def _read_claim(storage: Storage, name: str) -> dict[str, object]:
    try:
        doc = json.loads(storage.read_bytes(name, max_bytes=4096))
    except (ShardsaveError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _break_if_stale(storage: Storage, name: str) -> bool:
    created = _read_claim(storage, name).get("created")
    # A claim being written right now may not have its content yet: not stale.
    if not isinstance(created, (int, float)) or time.time() - created < knobs.claim_stale_s():
        return False
    with contextlib.suppress(ShardsaveError):
        storage.remove([name])
        return True
    return False


def _holder_message(storage: Storage, name: str) -> str:
    doc = _read_claim(storage, name)
    created = doc.get("created")
    age = f", {time.time() - created:.0f} s ago" if isinstance(created, (int, float)) else ""
    return (
        f"another save (save id {doc.get('save_id', '?')} on {doc.get('host', '?')}{age}) is committing to "
        f"{storage.url}; this save committed nothing. If no other job is saving there (a crash during a "
        f"commit), remove {storage.full_path(name)} or wait {knobs.claim_stale_s():.0f} s"
    )
