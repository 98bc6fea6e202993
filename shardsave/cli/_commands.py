"""``shardsave gc``, ``convert`` and ``import``: the commands that write or delete."""

from __future__ import annotations

import argparse
import sys
import time

from shardsave.cli._output import Progress, human_age, human_bytes, print_json
from shardsave.convert import export_checkpoint, import_checkpoint
from shardsave.gc import GcAction, execute_gc, plan_gc


def _gc_line(a: GcAction) -> str:
    where = a.url if a.what == "directory" else ", ".join(f"{a.url.rstrip('/')}/{n}" for n in a.names[:3]) + (
        f" and {len(a.names) - 3} more" if len(a.names) > 3 else "")
    return f"{human_bytes(a.size):>10}  {where}: {a.reason}"


def cmd_gc(args: argparse.Namespace) -> int:
    actions = plan_gc(args.root, min_age_s=args.min_age, storage_options=args.storage_options)
    todo = [a for a in actions if a.skipped is None]
    kept = [a for a in actions if a.skipped is not None]
    done: list[GcAction] = []
    problems: list[str] = []
    if args.yes:
        done, problems = execute_gc(args.root, todo, storage_options=args.storage_options)
    if args.json:
        def rec(a: GcAction) -> dict[str, object]:
            return {"checkpoint": a.checkpoint or ".", "path": a.url, "what": a.what, "names": list(a.names),
                    "size": a.size, "reason": a.reason, "skipped": a.skipped,
                    "age_s": None if a.newest_mtime is None else round(time.time() - a.newest_mtime, 3)}
        print_json({"dry_run": not args.yes, "remove": [rec(a) for a in (done if args.yes else todo)],
                    "kept": [rec(a) for a in kept], "problems": problems})
        return 1 if problems else 0
    verb = "removed" if args.yes else "would remove"
    for a in done if args.yes else todo:
        print(f"{verb}  {_gc_line(a)}")
    for a in kept:
        print(f"keeping       {_gc_line(a)}; {a.skipped}")
    for p in problems:
        print(f"shardsave gc: {p}", file=sys.stderr)
    freed = sum(a.size for a in (done if args.yes else todo))
    n = len(done if args.yes else todo)
    if not actions:
        print(f"nothing to remove under {args.root}")
    elif args.yes:
        print(f"removed {n} item(s), {human_bytes(freed)} freed" + (f"; kept {len(kept)} younger than "
                                                                     f"{human_age(args.min_age)}" if kept else ""))
    else:
        print(f"dry run: {n} item(s), {human_bytes(freed)} would be freed; rerun with --yes to remove them")
    return 1 if problems else 0


def cmd_convert(args: argparse.Namespace) -> int:
    with Progress(f"convert -> {args.to or 'file'}") as p:
        ckpt, n = export_checkpoint(args.checkpoint, args.out, args.to, keys=args.keys, overwrite=args.overwrite,
                                    max_json_bytes=args.max_json_bytes, storage_options=args.storage_options,
                                    progress=p.start)
    import os

    print(f"wrote {args.out}: {n} key(s) from {ckpt.path}, {human_bytes(os.path.getsize(args.out))}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    info, fmt = import_checkpoint(args.source, args.checkpoint, fmt=args.format, codec=args.codec,
                                  overwrite=args.overwrite, storage_options=args.storage_options)
    print(f"imported {args.source} ({fmt}) into {args.checkpoint}: {len(info.entries)} key(s), "
          f"{human_bytes(info.raw_bytes)} raw, {human_bytes(info.stored_bytes)} stored")
    return 0
