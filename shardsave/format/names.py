"""Every name shardsave uses on storage, in one place.

A checkpoint is a directory (any fsspec URL)::

    <path>/index.json                      written last, by the coordinator; its presence = committed
    <path>/data/<save-id>-r<rank>.bin      one data file per rank: chunks, then a table of contents

New data files of an overwrite carry a new save id, so the old checkpoint stays loadable
until the new index replaces the old one.
"""

from __future__ import annotations

import re
import secrets
import time

INDEX_NAME = "index.json"
DATA_DIR = "data"
TMP_INFIX = ".tmp-"
CLAIM_PREFIX = ".commit-claim-"
"""``<path>/.commit-claim-<base>``: held for the instant a save commits on top of ``base``
(the save id the index named when the save started, or ``none``); see ``shardsave.claim``."""

_SAVE_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")
_DATA_FILE_RE = re.compile(r"^data/(?P<save_id>[0-9]{8}T[0-9]{6}-[0-9a-f]{8})-r(?P<rank>[0-9]+)\.bin$")


def new_save_id() -> str:
    """A fresh save id: UTC time (sorts) plus 32 random bits (unique across jobs)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def is_save_id(text: str) -> bool:
    return bool(_SAVE_ID_RE.match(text))


def claim_name(base: str) -> str:
    """Name of the commit claim for saves based on ``base`` (a save id, ``none``, or a digest)."""
    return f"{CLAIM_PREFIX}{base}"


def data_file_name(save_id: str, rank: int) -> str:
    """Relative name of rank ``rank``'s data file of save ``save_id``."""
    return f"{DATA_DIR}/{save_id}-r{rank}.bin"


def parse_data_file_name(name: str) -> tuple[str, int] | None:
    """(save_id, rank) of a data file name, or None if ``name`` is not one."""
    m = _DATA_FILE_RE.match(name)
    if m is None:
        return None
    return m.group("save_id"), int(m.group("rank"))
