"""``ss.save``: every rank writes its own shards in parallel; the coordinator commits last.

Protocol (each step says which ranks run it):

1. (all ranks) flatten the state dict and describe every leaf -- no data moves. A bad
   value is caught here, before one byte is written.
2. (all ranks -> coordinator) gather the descriptions; the coordinator checks that ranks
   agree, deduplicates replicated values, balances their writes, refuses to replace a
   committed checkpoint unless ``overwrite``, and picks a fresh save id.
3. (coordinator -> all ranks) broadcast the plan, or everyone's failures: then every rank
   raises the same CheckpointError and nothing was written.
4. (all ranks) write their own data file: chunks, table of contents, fsync.
5. (all ranks -> coordinator) gather the file records or failures.
6. (coordinator) only if every rank succeeded: write ``index.json`` atomically (temporary
   name + rename locally, one PUT on object stores), under a commit claim so that of two
   jobs saving to the same path at once one commits and the other fails
   (``shardsave.claim``). Then, for an overwrite, delete the old save's data files --
   never before, so some complete checkpoint loads at every moment.
7. (coordinator -> all ranks) broadcast the outcome; all return the CheckpointInfo or all
   raise CheckpointError carrying every rank's failure.

Encryption (``encryption_key``): ranks check in step 2 that they hold the same key (by its
key id); the coordinator draws the save's salt in step 2; every rank derives the save's
keys in step 4 and encrypts its chunks; the index is MACed in step 6 (``shardsave.crypto``).

Fault points (``shardsave.faults``) mark the moments crash tests kill a rank at:
``after-plan``, ``mid-data-write``, ``after-data``, ``mid-index-write``, ``after-rename``,
``mid-cleanup``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from shardsave import knobs
from shardsave.claim import commit_claim, index_base
from shardsave.codec import CODEC_DESCRIPTORS, checksum, validate_codec_name
from shardsave.crypto import SaveCipher, check_key, key_id, new_salt
from shardsave.dist.comm import Comm, describe_error, hostname
from shardsave.dist.values import DTensorInfo, describe, plain_tensor
from shardsave.errors import (
    CheckpointError,
    CheckpointExistsError,
    ShardsaveError,
    UnsupportedValueError,
)
from shardsave.faults import fault_point
from shardsave.format.index import FORMAT_VERSION, CheckpointInfo, FileInfo, index_to_json
from shardsave.format.names import INDEX_NAME, data_file_name, new_save_id
from shardsave.pipeline.write import PieceWrite, write_rank_file
from shardsave.plan.flatten import Leaf, flatten
from shardsave.plan.layout import resolve
from shardsave.plan.save_plan import GlobalPlan, LeafMeta, RankPlan, make_rank_plan, merge_plans
from shardsave.storage import Storage


@dataclass(frozen=True)
class _Decision:
    plan: GlobalPlan | None
    save_id: str
    failures: dict[int, str]
    old_files: tuple[str, ...] = ()
    created_at: str = ""
    environment: dict[str, Any] | None = None
    exists: str | None = None
    """Set when the only problem is a committed checkpoint at the path (no overwrite)."""
    base: str = "none"
    """The save id the index named at planning (``none``): the commit claim's base."""
    salt: bytes | None = None
    """Encrypted saves: the random salt of this save's key derivation."""


def _environment(hostnames: list[str], world_size: int) -> dict[str, Any]:
    import torch

    from shardsave import __version__

    return {
        "shardsave": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": sys.platform,
        "world_size": world_size,
        "hostnames": sorted(set(hostnames)),
    }


def _check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedValueError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(
            f"metadata is not JSON-serialisable ({exc}); pass only dicts, lists, str, int, finite floats, bool, None"
        ) from exc
    return metadata


def prepare(state_dict: Any, comm: Comm) -> tuple[list[Leaf], list[LeafMeta], dict[str, DTensorInfo]]:
    """Step 1 on this rank: flatten and describe (raises UnsupportedValueError naming the key)."""
    leaves = flatten(state_dict)
    crc = checksum if comm.world_size > 1 else None
    metas: list[LeafMeta] = []
    dinfos: dict[str, DTensorInfo] = {}
    specs: dict[Any, Any] = {}
    for leaf in leaves:
        meta, dinfo = describe(leaf, checksum=crc, to_group_rank=comm.to_group_rank, specs=specs)
        metas.append(meta)
        if dinfo is not None:
            dinfos[leaf.key] = dinfo
    return leaves, metas, dinfos


def pieces_for_rank(
    plan: GlobalPlan, rank: int, leaves: list[Leaf], dinfos: dict[str, DTensorInfo]
) -> list[PieceWrite]:
    """The pieces the plan assigns to ``rank``, as views of its tensors (no copies)."""
    by_key = {leaf.key: leaf for leaf in leaves}
    out: list[PieceWrite] = []
    for idx, entry in enumerate(plan.entries):
        leaf = by_key.get(entry.key)
        if leaf is None or entry.kind == "json" or entry.layout is None:
            continue
        lt = entry.layout.type
        if lt == "per_rank" or (lt == "replicated" and entry.layout.writer == rank):
            t = plain_tensor(leaf.value)
            if t.numel():
                out.append(PieceWrite(idx, 0, t))
        elif lt == "sharded":
            dinfo = dinfos[entry.key]
            if dinfo.coord is None:
                continue
            assert entry.shape is not None
            layout = resolve(entry.layout, entry.shape, plan.meshes)
            for slots, box, local in layout.local_pieces(dinfo.coord):
                if layout.writer_rank(idx, slots) != rank or 0 in box[1]:
                    continue
                view = dinfo.local[tuple(slice(o, o + n) for o, n in zip(local, box[1]))] if local else dinfo.local
                out.append(PieceWrite(idx, layout.piece_id(slots), view.detach()))
    return out


def save(
    state_dict: dict[str, Any],
    path: str,
    *,
    process_group: Any = None,
    codec: str = "auto",
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    encryption_key: bytes | None = None,
) -> CheckpointInfo:
    """Save ``state_dict`` to ``path`` (any fsspec URL) from every rank of the group.

    Collective: every rank of ``process_group`` (default: the default group, or a single
    process without torch.distributed) must call it with the same ``path`` and options.
    Returns the committed CheckpointInfo on every rank; raises CheckpointError on every
    rank if any rank failed, in which case no index was written.

    ``encryption_key`` (32 bytes, the same on every rank) encrypts every chunk with
    AES-256-GCM and authenticates the index and tables of contents (``shardsave.crypto``);
    loading then needs the same key.
    """
    from shardsave.asyncsave import wait_for_pending_save

    # At most one save in flight per process: an async save still running finishes first
    # (and its unseen failure is raised here instead of starting this save).
    wait_for_pending_save()
    codec = validate_codec_name(codec)
    metadata = _check_metadata(metadata)
    comm = Comm(process_group)
    storage = Storage.from_url(path, storage_options)
    return _save(state_dict, storage, comm, codec=codec, metadata=metadata, overwrite=overwrite,
                 encryption_key=encryption_key)


def _save(
    state_dict: dict[str, Any],
    storage: Storage,
    comm: Comm,
    *,
    codec: str,
    metadata: dict[str, Any],
    overwrite: bool,
    encryption_key: bytes | None = None,
) -> CheckpointInfo:
    chunk_bytes = knobs.chunk_bytes()

    # 1. (all ranks) describe.
    error: str | None = None
    leaves: list[Leaf] = []
    dinfos: dict[str, DTensorInfo] = {}
    rank_plan = RankPlan("", None, ())
    key: bytes | None = None
    kid: str | None = None
    try:
        if encryption_key is not None:
            key = check_key(encryption_key)
            kid = key_id(key)
        leaves, metas, dinfos = prepare(state_dict, comm)
        rank_plan = make_rank_plan(metas)
    except Exception as exc:
        error = describe_error(exc)

    # 2. (all ranks) ranks whose leaf descriptions hash like the coordinator's send only
    # their checksums and per-rank values; the coordinator decides. The coordinator's key id
    # rides along: a rank holding another key would write chunks nobody could decrypt.
    coordinator_sig, coordinator_kid = comm.broadcast(
        (rank_plan.signature, kid) if comm.is_coordinator else None, "broadcast signature")
    if comm.rank != comm.coordinator and rank_plan.signature == coordinator_sig:
        rank_plan = replace(rank_plan, shared=None)
    if error is None and kid != coordinator_kid:
        error = (f"encryption key differs from the coordinator's (key id {kid}, coordinator's {coordinator_kid}); "
                 "pass the same encryption_key on every rank")
    gathered = comm.gather((rank_plan, error, hostname()), "gather save plans")
    decision: _Decision | None = None
    if comm.is_coordinator:
        assert gathered is not None
        decision = _decide(gathered, storage, overwrite, encrypted=key is not None)
    # 3. (coordinator -> all ranks)
    decision = comm.broadcast(decision, "broadcast save plan")
    if decision.exists is not None:
        raise CheckpointExistsError(decision.exists)
    if decision.failures or decision.plan is None:
        raise CheckpointError(
            f"save to {storage.url} failed before writing anything (nothing was written):", decision.failures
        )
    plan = decision.plan

    # 4. (all ranks) write this rank's data file.
    file_info: FileInfo | None = None
    error = None
    name = data_file_name(decision.save_id, comm.rank)
    cipher: SaveCipher | None = None
    try:
        fault_point("after-plan")
        if key is not None:
            assert decision.salt is not None
            cipher = SaveCipher(key, decision.save_id, decision.salt)
        pieces = pieces_for_rank(plan, comm.rank, leaves, dinfos)
        codec_ids = {d: i for i, d in enumerate(CODEC_DESCRIPTORS)}
        file_info, _raw = write_rank_file(storage, name, comm.rank, pieces, codec=codec, codec_ids=codec_ids,
                                          chunk_bytes=chunk_bytes, cipher=cipher)
        fault_point("after-data")
    except Exception as exc:
        error = describe_error(exc)

    # 5. (all ranks -> coordinator) results.
    results = comm.gather((file_info, error), "gather written files")

    # 6. (coordinator) commit only if every rank succeeded.
    outcome: tuple[CheckpointInfo | None, dict[int, str]] | None = None
    if comm.is_coordinator:
        assert results is not None
        outcome = _commit(storage, decision, plan, results, comm.world_size, metadata, chunk_bytes, cipher)
    # 7. (coordinator -> all ranks)
    outcome = comm.broadcast(outcome, "broadcast commit outcome")
    info, failures = outcome
    if info is None:
        raise CheckpointError(f"save to {storage.url} failed; no index was written, nothing was committed:", failures)
    return replace(info, path=storage.url)


def _decide(
    gathered: list[tuple[RankPlan, str | None, str]], storage: Storage, overwrite: bool, *, encrypted: bool = False
) -> _Decision:
    failures = {r: err for r, (_, err, _) in enumerate(gathered) if err}
    save_id = new_save_id()
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if failures:
        return _Decision(None, save_id, failures)
    plan, failures = merge_plans([m for m, _, _ in gathered])
    if failures:
        return _Decision(None, save_id, failures)
    old_files: tuple[str, ...] = ()
    try:
        base = index_base(storage)
        if base != "none":
            if not overwrite:
                return _Decision(None, save_id, {}, exists=(
                    f"{storage.full_path(INDEX_NAME)} already holds a committed checkpoint; "
                    "pass overwrite=True to replace it, or save to another path (nothing was written)"
                ))
            from shardsave.load import read_index

            try:
                old = read_index(storage)
                old_files = tuple(f.name for f in old.files)
            except ShardsaveError:
                old_files = ()  # an unreadable old index: leave its files for `gc`
        storage.makedirs("data")
    except Exception as exc:
        return _Decision(None, save_id, {0: describe_error(exc)})
    environment = _environment([h for _, _, h in gathered], len(gathered))
    return _Decision(plan, save_id, {}, old_files, created, environment, base=base,
                     salt=new_salt() if encrypted else None)


def _index_names(storage: Storage, save_id: str) -> bool | None:
    """Whether the index names ``save_id`` (after writing it raised); None if unknown."""
    try:
        return index_base(storage) == save_id
    except Exception:
        return None


def _commit(
    storage: Storage,
    decision: _Decision,
    plan: GlobalPlan,
    results: list[tuple[FileInfo | None, str | None]],
    world_size: int,
    metadata: dict[str, Any],
    chunk_bytes: int,
    cipher: SaveCipher | None = None,
) -> tuple[CheckpointInfo | None, dict[int, str]]:
    failures = {r: err for r, (_, err) in enumerate(results) if err}
    files = [f for f, _ in results if f is not None]
    if failures or len(files) != world_size:
        # Best effort: the files of a failed save are garbage; `gc` removes any left over.
        storage.remove([data_file_name(decision.save_id, r) for r in range(world_size)])
        return None, failures or {0: "a rank returned no file record"}
    info = CheckpointInfo(
        save_id=decision.save_id,
        world_size=world_size,
        created_at=decision.created_at,
        chunk_bytes=chunk_bytes,
        codecs=tuple(CODEC_DESCRIPTORS),
        meshes=plan.meshes,
        files=tuple(files),
        entries=plan.entries,
        metadata=metadata,
        environment=decision.environment or {},
        format_version=FORMAT_VERSION,
        encryption=cipher.record() if cipher is not None else None,
    )
    try:
        blob = index_to_json(info, mac=cipher.index_mac if cipher is not None else None)
        # Conditional on the index still being the one planned against (shardsave.claim).
        with commit_claim(storage, decision.base, decision.save_id):
            # The commit point: before this line nothing is visible, after it everything is.
            storage.write_atomic(INDEX_NAME, blob)
    except Exception as exc:
        committed = _index_names(storage, decision.save_id)
        if committed:
            # The failure came after the rename (fsync of the directory, say): the new index
            # is in place and names these files, so they must stay. Report the commit.
            return info, {}
        if committed is False:  # surely not committed: the files are garbage (unknown: keep them)
            with contextlib.suppress(Exception):  # best effort, as above
                storage.remove([f.name for f in files])
        return None, {0: describe_error(exc)}
    # Only now may the replaced checkpoint's data go: the new index no longer names it.
    stale = [n for n in decision.old_files if n not in {f.name for f in files}]
    if stale:
        with contextlib.suppress(Exception):  # leftovers are harmless; `gc` removes them
            storage.remove(stale[:1])
            fault_point("mid-cleanup")
            storage.remove(stale[1:])
    return info, {}
