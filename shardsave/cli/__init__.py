"""The ``shardsave`` command: look at, check, compare, convert and clean up checkpoints.

People live with checkpoints outside training -- listing them, checking them, handing a
model to someone as one file, comparing two runs, cleaning up after crashes -- and want
to do it without writing Python. Every subcommand is a thin layer over library calls
(``ss.info``/``ss.verify``/``ss.load_full``, :mod:`shardsave.convert`, :mod:`shardsave.gc`),
so what the tool does, a program can do too.

Conventions: results go to stdout (``--json`` for machines), everything else to stderr;
an error is one line on stderr and exit status 2; ``verify`` and ``diff`` exit 1 when
they find a problem or a difference (like ``diff(1)``); nothing is deleted without
``--yes``. Progress bars appear only on a terminal with tqdm installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from shardsave.convert import EXPORT_FORMATS, IMPORT_FORMATS, JSON_MAX_BYTES
from shardsave.gc import DEFAULT_MIN_AGE_S

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FOUND = 1
"""verify found a problem / diff found a difference / gc could not remove something."""
EXIT_ERROR = 2
"""Bad usage or a failure (one line on stderr says which)."""

_EPILOG = """\
examples:
  shardsave ls /ckpt/run1                      list the steps of a CheckpointManager root
  shardsave info /ckpt/run1/step-000001000     keys, dtypes, shapes, compression, metadata
  shardsave verify s3://bucket/run1/step-000001000
  shardsave convert CKPT model.safetensors --keys model
  shardsave import dcp_checkpoint/ CKPT        from DCP, torch.save or safetensors
  shardsave diff CKPT_A CKPT_B
  shardsave gc /ckpt/run1                      dry run; add --yes to delete

exit status: 0 success; 1 verify/diff found a problem or difference; 2 error.
Run `shardsave COMMAND --help` for the options of one command.
"""


def _storage_options(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
    t = text.strip().lower()
    digits = t.rstrip("kmgib")
    try:
        return int(float(digits) * units[t[len(digits):]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 500000, 64MiB or 1GiB") from None


def build_parser() -> argparse.ArgumentParser:
    from shardsave import __version__
    from shardsave.cli._output import parse_duration

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-options", type=_storage_options, default=None, metavar="JSON",
                        help="fsspec options for remote checkpoints, as a JSON object "
                             "(e.g. '{\"endpoint_url\": \"http://localhost:9000\"}')")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument("--key-file", metavar="FILE", default=None,
                        help="the 32-byte key (raw, or 64 hex digits) of encrypted checkpoints; default: "
                             "$SHARDSAVE_KEY_FILE")

    parser = argparse.ArgumentParser(
        prog="shardsave",
        description="Inspect, verify, compare, convert and clean up shardsave checkpoints. A checkpoint is a "
                    "directory (local path or fsspec URL such as s3://bucket/run/step-000001000) holding "
                    "index.json and data/; a ROOT is a directory of such checkpoints, as CheckpointManager "
                    "writes them (step-000001000, step-000002000, ...).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"shardsave {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ls", parents=[common], help="list the checkpoints under a root (or one checkpoint)",
                       description="List checkpoints: committed or partial (an interrupted save), size on storage, "
                                   "age, and the metrics saved with them.")
    p.add_argument("root", metavar="ROOT", help="a root of step directories, or a single checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("info", parents=[common], help="keys, dtypes, shapes, sizes and compression of a checkpoint",
                       description="Describe a committed checkpoint: every key with its dtype, shape, layout, raw "
                                   "and stored size, compression ratio and codecs (from the data files' tables of "
                                   "contents), plus the metadata and the environment that saved it.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("verify", parents=[common], help="check every file and checksum; exit 0 only if all is well",
                       description="Read every chunk of a checkpoint and check its checksum and size, and look for "
                                   "missing data files and extra ones the index does not name. Exit status 0 only "
                                   "when nothing is wrong, 1 otherwise.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--allow-extra", action="store_true",
                   help="do not fail because of data files the index does not name (garbage for `gc`)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("convert", parents=[common], help="export full tensors to safetensors, torch, HDF5 or JSON",
                       description="Write a checkpoint (or the keys you pick) as one file of consolidated full "
                                   "tensors, whatever world size and layout saved it. Values are bit-exact in "
                                   "every format. bfloat16/float8 have no HDF5 type: they are stored as their "
                                   "bit patterns (uint16/uint8) with 'dtype' and 'shape' attributes.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("out", metavar="OUT", help="the file to write (a local path)")
    p.add_argument("--to", choices=EXPORT_FORMATS, help="output format (default: from OUT's suffix: .safetensors, "
                                                        ".pt/.pth/.bin, .h5/.hdf5, .json)")
    p.add_argument("--keys", nargs="+", metavar="K", help="only these keys or key prefixes (e.g. --keys model)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-json-bytes", type=_size, default=JSON_MAX_BYTES, metavar="SIZE",
                   help=f"largest tensor data a JSON export accepts (default {JSON_MAX_BYTES >> 20}MiB)")

    p = sub.add_parser("import", parents=[common], help="make a shardsave checkpoint from DCP, torch.save or safetensors",
                       description="Read a foreign checkpoint and save it as a shardsave checkpoint. DCP "
                                   "checkpoints and torch.save files are pickles: they are read only through "
                                   "torch's weights_only unpickler, so a file that names anything outside its "
                                   "allow-list is refused instead of run. HDF5 and JSON files written by "
                                   "`shardsave convert` import too.")
    p.add_argument("source", metavar="SRC", help="a DCP checkpoint directory or a file (local)")
    p.add_argument("checkpoint", metavar="CKPT", help="where to write the shardsave checkpoint")
    p.add_argument("--format", choices=IMPORT_FORMATS, help="format of SRC (default: detected from its content)")
    p.add_argument("--codec", default="auto", help="codec for the new checkpoint (auto, raw, zstd, zstd-shuffle)")
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at CKPT")

    p = sub.add_parser("diff", parents=[common], help="compare two checkpoints key by key",
                       description="Compare two checkpoints: keys added and removed, dtype/shape/kind changes, "
                                   "changed values, and for tensors the number of differing elements and the "
                                   "largest absolute difference. Exit status 0 when identical, 1 when not.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--keys", nargs="+", metavar="K", help="only these keys or key prefixes")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("gc", parents=[common], help="remove interrupted saves and orphaned files (dry run by default)",
                       description="Find garbage under a root or in one checkpoint: step directories without an "
                                   "index (interrupted saves), data files of other save ids than the committed "
                                   "index names, and temporary files. Prints what it would remove; --yes removes "
                                   "it. Anything modified within --min-age is kept, because a save still running "
                                   "looks exactly like a dead one.")
    p.add_argument("root", metavar="ROOT", help="a root of step directories, or a single checkpoint")
    p.add_argument("--yes", action="store_true", help="really delete (default: only print what would go)")
    p.add_argument("--min-age", type=parse_duration, default=DEFAULT_MIN_AGE_S, metavar="AGE",
                   help="keep anything modified more recently than this (default 1h; e.g. 0, 90s, 10m, 2h, 1d)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) and exc.filename and \
            str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "key_file", None):
        # Readers take the key of an encrypted checkpoint from here (shardsave.crypto).
        import os

        os.environ["SHARDSAVE_KEY_FILE"] = args.key_file
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    from shardsave.cli import _commands, _diff, _inspect
    from shardsave.errors import ShardsaveError

    run = {"ls": _inspect.cmd_ls, "info": _inspect.cmd_info, "verify": _inspect.cmd_verify,
           "diff": _diff.cmd_diff, "convert": _commands.cmd_convert, "import": _commands.cmd_import,
           "gc": _commands.cmd_gc}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"shardsave {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `shardsave info X | head`: the reader left; not an error
        import os

        # Python flushes stdout again at exit; point it at /dev/null so that is silent too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ShardsaveError, OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        if args.debug:
            raise
        print(f"shardsave {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        print(f"shardsave {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return EXIT_ERROR
