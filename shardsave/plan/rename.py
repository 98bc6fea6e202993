"""Key selection and renaming for partial and adapted loads (pure; no torch.distributed).

Checkpoints outlive the code that wrote them: a model saved under DDP has keys
``model.module.layer.weight``, one saved after ``torch.compile`` has
``model._orig_mod.layer.weight``, and the code that loads it may wrap the model
differently or not at all. Renaming maps each *checkpoint* key to the key the caller
wants (the target's key for ``ss.load``, the output's key for ``ss.load_full``):

* a callable ``f(key) -> new key | None`` (None leaves the entry out);
* a mapping of key prefixes ``{"model.module": "model"}``, matched at '.' boundaries
  (``"model"`` matches ``model`` and ``model.x``, never ``models.x``); the longest
  matching prefix wins; an empty new prefix strips it;
* :func:`strip_wrappers`, the ready-made callable for the usual wrapper prefixes.

Key filters (``keys=``) select by key or key prefix at '.' boundaries and apply to the
renamed keys, i.e. to the names the caller sees.

``load_full`` rebuilds nested containers from each entry's *path*, so a renamed key needs
a path too: :func:`renamed_path` keeps the part of the old path that survived the
rename (its components and their types: list indices stay list indices) and splits only
what is new.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

from shardsave.format.index import PathComponent

Rename = Union[Callable[[str], Union[str, None]], Mapping[str, str], None]  # noqa: UP007 - runtime alias on 3.10
"""What ``rename=`` accepts (see the module docstring)."""

WRAPPER_SEGMENTS = ("module", "_orig_mod")
"""Key segments added by wrappers: DDP / DataParallel (``module``) and torch.compile
(``_orig_mod``)."""


def strip_wrappers(key: str) -> str:
    """``key`` without the segments wrappers add (``module.``, ``_orig_mod.``), wherever
    they occur: ``model.module._orig_mod.fc.weight`` -> ``model.fc.weight``.

    A model with a genuine submodule named ``module`` loses that segment too; use a prefix
    mapping for such models.
    """
    parts = [p for p in key.split(".") if p not in WRAPPER_SEGMENTS]
    return ".".join(parts) if parts else key


def _prefix_renamer(mapping: Mapping[str, str]) -> Callable[[str], str | None]:
    for old, new in mapping.items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise TypeError(f"a rename mapping maps str key prefixes to str, got {old!r}: {new!r}")
        if old.startswith(".") or old.endswith(".") or new.startswith(".") or new.endswith("."):
            raise ValueError(
                f"rename prefix {old!r} -> {new!r}: give prefixes without leading or trailing '.' "
                "(they match at '.' boundaries)"
            )
    ordered = sorted(mapping.items(), key=lambda kv: len(kv[0]), reverse=True)

    def rename(key: str) -> str:
        for old, new in ordered:
            if old == "":
                return f"{new}.{key}" if new else key
            if key == old:
                return new or key
            if key.startswith(old + "."):
                rest = key[len(old) + 1 :]
                return f"{new}.{rest}" if new else rest
        return key

    return rename


def key_renamer(rename: Rename) -> Callable[[str], str | None] | None:
    """The ``rename=`` argument as a function (None: keys stay as they are)."""
    if rename is None:
        return None
    if isinstance(rename, Mapping):
        return _prefix_renamer(rename)
    if callable(rename):
        return rename
    raise TypeError(
        f"rename must be a callable (key -> new key or None), a dict of key prefixes or None, "
        f"got {type(rename).__name__}"
    )


def rename_keys(keys: Sequence[str], rename: Rename) -> dict[str, int]:
    """New key -> position in ``keys`` for every key the rename keeps.

    Raises ValueError when two keys get the same new name (naming both), or when the
    rename returns something other than a non-empty str or None.
    """
    fn = key_renamer(rename)
    out: dict[str, int] = {}
    for i, key in enumerate(keys):
        new = key if fn is None else fn(key)
        if new is None:
            continue
        if not isinstance(new, str) or not new:
            raise ValueError(f"rename returned {new!r} for key {key!r}; return a non-empty str, or None to skip it")
        other = out.setdefault(new, i)
        if other != i:
            raise ValueError(
                f"rename maps both {keys[other]!r} and {key!r} to {new!r}; keys must stay unique "
                "(return None for the one to leave out)"
            )
    return out


def matches(key: str, selection: Iterable[str] | None) -> bool:
    """Whether ``key`` is selected: equal to an item, or under it at a '.' boundary."""
    if selection is None:
        return True
    return any(key == k or key.startswith(k + ".") for k in selection)


def _display(c: PathComponent) -> str:
    return str(c[1]) if isinstance(c, tuple) else str(c)


def renamed_path(path: Sequence[PathComponent], new_key: str) -> tuple[PathComponent, ...]:
    """A path for ``new_key`` that keeps what the rename left of ``path``.

    The longest tail of the old key (whole components, or the end of a component at a
    '.' boundary) that ends the new key keeps its components; the new head reuses old
    leading components when it spells them, and is split at '.' otherwise.
    """
    strs = [_display(c) for c in path]
    if ".".join(strs) == new_key:
        return tuple(path)
    for k in range(len(path)):
        rest = strs[k + 1 :]
        candidates: list[tuple[PathComponent, ...]] = [(path[k],)]
        if isinstance(path[k], str):
            segs = strs[k].split(".")
            candidates += [(".".join(segs[j:]),) for j in range(1, len(segs))]
        for first in candidates:
            tail = ".".join([_display(first[0]), *rest])
            if new_key == tail:
                return (*first, *path[k + 1 :])
            if new_key.endswith("." + tail):
                head = new_key[: -len(tail) - 1]
                return (*_head_components(path, strs, head), *first, *path[k + 1 :])
    return tuple(new_key.split("."))


def _head_components(path: Sequence[PathComponent], strs: list[str], head: str) -> tuple[PathComponent, ...]:
    for j in range(len(path), 0, -1):
        if ".".join(strs[:j]) == head:
            return tuple(path[:j])
    return tuple(head.split("."))


def renamed_root(path: Sequence[PathComponent], new_path: Sequence[PathComponent], root: int) -> int:
    """Where a per-rank wrapper sits in ``new_path`` (it sat ``root`` components into ``path``)."""
    kept_tail = 0
    for a, b in zip(reversed(path), reversed(new_path)):
        if a != b:
            break
        kept_tail += 1
    if len(path) - root <= kept_tail:
        return len(new_path) - (len(path) - root)
    return min(root, len(new_path))
