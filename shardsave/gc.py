"""Finding the checkpoints under a root, and removing what no committed checkpoint needs.

``shardsave ls`` and ``shardsave gc`` need the same picture of a directory: which
checkpoints it holds (one, or a root of ``CheckpointManager`` step directories), which of
them are committed, and the files, sizes and modification times of each. :func:`scan`
builds that picture with one recursive listing per checkpoint; step-directory names come
from :mod:`shardsave.manager`, so the manager and the tools cannot disagree about them.

What is garbage (docs/FORMAT.md, section 1):

* a step directory without ``index.json``: an interrupted or failed save;
* in a committed checkpoint, data files whose save id the index does not name: left by a
  failed overwrite, or by an overwrite that stopped between its commit and the deletion
  of the old files;
* temporary files (``<name>.tmp-<hex>``) of a commit that never finished;
* commit claims (``.commit-claim-<base>``, see ``shardsave.claim``) left by a crash in the
  instant of a commit.

Why a minimum age: a save in progress looks exactly like a dead one. Its directory has no
index yet, and during an overwrite its new data files carry a save id that the (old)
index does not name. Deleting them under a running save makes it fail, or worse, lets its
coordinator commit an index naming files that are already gone. Nothing on storage tells
a live save from a dead one, so gc leaves alone anything modified within ``min_age_s``
(one hour by default; a save keeps touching its files until it commits) and checks the
index again just before each deletion.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from shardsave.errors import ShardsaveError, StorageError
from shardsave.format.index import CheckpointInfo
from shardsave.format.names import (
    CLAIM_PREFIX,
    DATA_DIR,
    INDEX_NAME,
    TMP_INFIX,
    parse_data_file_name,
)
from shardsave.load import read_index
from shardsave.manager import parse_step_dir
from shardsave.storage import Storage

__all__ = [
    "DEFAULT_MIN_AGE_S",
    "CheckpointDir",
    "FileStat",
    "GcAction",
    "execute_gc",
    "plan_gc",
    "scan",
]

DEFAULT_MIN_AGE_S = 3600.0
"""gc leaves alone anything modified more recently than this (see the module docstring)."""


@dataclass(frozen=True)
class FileStat:
    """One file of a checkpoint directory."""

    name: str
    """Relative to the checkpoint directory, '/'-separated."""
    size: int
    mtime: float | None
    """Seconds since the epoch; None where the filesystem does not say."""


@dataclass
class CheckpointDir:
    """One checkpoint directory found by :func:`scan`, committed or not."""

    name: str
    """Relative to the scanned root; ``""`` when the root itself is the checkpoint."""
    url: str
    step: int | None
    """The step of a ``CheckpointManager`` step directory, else None."""
    committed: bool
    """Whether ``index.json`` exists."""
    files: list[FileStat] = field(default_factory=list)
    info: CheckpointInfo | None = None
    """The parsed index (None if uncommitted or unreadable)."""
    error: str | None = None
    """Why a committed index could not be read."""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def newest_mtime(self) -> float | None:
        times = [f.mtime for f in self.files if f.mtime is not None]
        return max(times) if times else None


def _mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time from an fsspec info dict (local: mtime; memory: created; S3:
    LastModified; GCS: updated)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, datetime.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=datetime.timezone.utc)
            return v.timestamp()
        if isinstance(v, str):
            try:
                return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def list_files(storage: Storage) -> list[FileStat]:
    """Every file under ``storage``'s directory with its size and modification time."""
    fs, root = storage.fs, storage.root

    def find() -> dict[str, Any]:
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        return dict(found) if isinstance(found, Mapping) else {}

    try:
        found = find()
    except OSError as exc:
        raise StorageError(f"list {storage.url}: {exc}") from exc
    prefix = root.rstrip("/") + "/"
    out: list[FileStat] = []
    for path, info in found.items():
        path = str(path)
        if info.get("type") == "directory" or not path.startswith(prefix):
            continue
        out.append(FileStat(path[len(prefix):], int(info.get("size") or 0), _mtime(info)))
    return sorted(out, key=lambda f: f.name)


def _looks_like_checkpoint(files: list[FileStat]) -> bool:
    return any(f.name == INDEX_NAME or f.name.startswith(DATA_DIR + "/") for f in files)


def _describe(storage: Storage, name: str, files: list[FileStat]) -> CheckpointDir:
    committed = any(f.name == INDEX_NAME for f in files)
    ckpt = CheckpointDir(name, storage.url, parse_step_dir(name) if name else None, committed, files)
    if committed:
        try:
            ckpt.info = read_index(storage)
        except ShardsaveError as exc:
            ckpt.error = str(exc)
    return ckpt


def scan(root: str, *, storage_options: dict[str, Any] | None = None) -> list[CheckpointDir]:
    """The checkpoints at ``root``: the root itself if it is one (it holds ``index.json``
    or ``data/``), else every step directory and every other sub-directory that looks like
    a checkpoint, steps first in step order. Raises StorageError if ``root`` does not exist."""
    storage = Storage.from_url(root, storage_options)
    files = list_files(storage)
    if _looks_like_checkpoint(files):
        return [_describe(storage, "", files)]
    if not files and not storage.fs.exists(storage.root):
        raise StorageError(f"{storage.url} does not exist")
    children: dict[str, list[FileStat]] = {}
    for f in files:
        if "/" in f.name:
            head, rest = f.name.split("/", 1)
            children.setdefault(head, []).append(FileStat(rest, f.size, f.mtime))
    # Empty step directories have no files to list; ask for the directories themselves.
    try:
        for entry in storage.fs.ls(storage.root, detail=True):
            if entry.get("type") == "directory":
                children.setdefault(str(entry["name"]).rstrip("/").rsplit("/", 1)[-1], [])
    except (FileNotFoundError, NotImplementedError):
        pass
    out = [
        _describe(storage.child(name), name, child_files)
        for name, child_files in children.items()
        if parse_step_dir(name) is not None or _looks_like_checkpoint(child_files)
    ]
    return sorted(out, key=lambda c: (c.step is None, c.step or 0, c.name))


# --------------------------------------------------------------------------- gc


@dataclass(frozen=True)
class GcAction:
    """One removal gc would make (or has made)."""

    checkpoint: str
    """The checkpoint directory, relative to the root (``""``: the root itself)."""
    url: str
    what: Literal["directory", "files"]
    """``directory``: remove the whole step directory; ``files``: remove ``names``."""
    names: tuple[str, ...]
    """Files relative to the checkpoint directory (every file, for ``directory``)."""
    size: int
    reason: str
    newest_mtime: float | None
    skipped: str | None = None
    """Why gc leaves it alone (too young), or None."""
    save_id: str | None = None
    """For ``files`` in a committed checkpoint: the index's save id when planned."""


def _age_note(newest: float | None, now: float, min_age_s: float) -> str | None:
    if newest is None or now - newest >= min_age_s:
        return None
    return (f"modified {_human_age(now - newest)} ago, within the minimum age of {_human_age(min_age_s)} "
            "(a save may still be writing it; pass a smaller --min-age to remove it anyway)")


def _human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}".replace(".0 ", " ")
    return f"{seconds:.0f} s"


def _is_temporary(name: str) -> bool:
    return TMP_INFIX in name.rsplit("/", 1)[-1]


def _is_claim(name: str) -> bool:
    return "/" not in name and name.startswith(CLAIM_PREFIX)


def _plan_one(ckpt: CheckpointDir, now: float, min_age_s: float) -> list[GcAction]:
    def action(what: Literal["directory", "files"], files: list[FileStat], reason: str,
               save_id: str | None = None) -> GcAction:
        newest = max((f.mtime for f in files if f.mtime is not None), default=None)
        return GcAction(ckpt.name, ckpt.url, what, tuple(f.name for f in files), sum(f.size for f in files),
                        reason, newest, _age_note(newest, now, min_age_s), save_id)

    if not ckpt.committed:
        if ckpt.step is not None:
            return [action("directory", ckpt.files, "uncommitted step directory (no index.json): "
                                                    "an interrupted or failed save")]
        # Not a step directory: remove only the files shardsave itself names, never a
        # directory that might hold something else.
        ours = [f for f in ckpt.files if parse_data_file_name(f.name) or _is_temporary(f.name) or _is_claim(f.name)]
        return [action("files", ours, "uncommitted checkpoint (no index.json): data files of an "
                                      "interrupted or failed save")] if ours else []
    if ckpt.info is None:
        return []  # an unreadable index: nothing can be called orphaned with confidence
    actions: list[GcAction] = []
    by_save: dict[str, list[FileStat]] = {}
    for f in ckpt.files:
        parsed = parse_data_file_name(f.name)
        if parsed is not None and parsed[0] != ckpt.info.save_id:
            by_save.setdefault(parsed[0], []).append(f)
    for save_id, files in sorted(by_save.items()):
        actions.append(action("files", files, f"orphaned data files of save {save_id} (the index names save "
                                              f"{ckpt.info.save_id})", ckpt.info.save_id))
    tmp = [f for f in ckpt.files if _is_temporary(f.name)]
    if tmp:
        actions.append(action("files", tmp, "temporary files of an unfinished write", ckpt.info.save_id))
    claims = [f for f in ckpt.files if _is_claim(f.name)]
    if claims:
        actions.append(action("files", claims, "commit claims left by a crash during a commit (they block saves "
                                               "based on this index until stale)", ckpt.info.save_id))
    return actions


def plan_gc(
    root: str,
    *,
    min_age_s: float = DEFAULT_MIN_AGE_S,
    now: float | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[GcAction]:
    """What gc would remove under ``root`` (a checkpoint or a root of step directories).

    Nothing is deleted here. Actions younger than ``min_age_s`` come back with ``skipped``
    set; :func:`execute_gc` ignores those.
    """
    if min_age_s < 0:
        raise ValueError(f"min_age_s must be >= 0 seconds, got {min_age_s}")
    now = time.time() if now is None else now
    actions: list[GcAction] = []
    for ckpt in scan(root, storage_options=storage_options):
        actions.extend(_plan_one(ckpt, now, min_age_s))
    return actions


def execute_gc(
    root: str, actions: list[GcAction], *, storage_options: dict[str, Any] | None = None
) -> tuple[list[GcAction], list[str]]:
    """Carry out the actions that are not ``skipped``; returns (done, problems).

    Just before each deletion the checkpoint is checked again: a step directory that has
    been committed meanwhile, or a checkpoint whose index now names another save, is left
    alone and reported as a problem.
    """
    storage = Storage.from_url(root, storage_options)
    done: list[GcAction] = []
    problems: list[str] = []
    for a in actions:
        if a.skipped is not None:
            continue
        target = storage.child(a.checkpoint) if a.checkpoint else storage
        try:
            if a.what == "directory":
                if target.exists(INDEX_NAME):
                    problems.append(f"{a.url}: committed since it was listed; left alone")
                    continue
                storage.remove_tree(a.checkpoint)
            else:
                if a.save_id is not None and read_index(target).save_id != a.save_id:
                    problems.append(f"{a.url}: overwritten since it was listed; left alone")
                    continue
                if a.save_id is None and target.exists(INDEX_NAME):
                    problems.append(f"{a.url}: committed since it was listed; left alone")
                    continue
                target.remove(list(a.names))
        except ShardsaveError as exc:
            problems.append(f"{a.url}: {exc}")
            continue
        done.append(a)
    return done, problems
