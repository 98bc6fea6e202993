"""Encryption at rest: AES-256-GCM per chunk, HMAC-SHA256 over tables of contents and the index.

Why this shape (docs/FORMAT.md, section 10 is the byte-level spec):

* **Per chunk**, after compression (ciphertext does not compress) and before the checksum
  (the CRC stays on the stored bytes, so ``verify`` without the key still finds storage
  corruption). Chunks stay independently decodable, so a resharding load still reads and
  decrypts only the chunks it needs.
* **A data key per save**, derived with HKDF-SHA256 from the user's 32-byte master key,
  a random 16-byte salt drawn for the save and the save id. Each chunk gets a fresh random
  96-bit nonce, stored in front of its ciphertext. With random nonces GCM stays safe up to
  about 2**32 messages per key; one key per save keeps every key far below that, however
  many saves share the master key.
* **Chunks are bound to their place**: the GCM associated data holds the save id and the
  chunk's (entry, chunk, piece, raw length, codec), so a chunk moved to another slot, file
  or checkpoint fails its tag.
* **Tables of contents and the index are authenticated** with HMAC-SHA256 under a second
  per-save key: each file record in the index carries its TOC's MAC, and the index ends
  with a MAC over all its other bytes. So tampering with the index (shapes, file names,
  metadata, the ``encryption`` record itself), a TOC or any chunk is detected. The index
  is authenticated, not encrypted: key names, dtypes, shapes and metadata are readable.
* **A key id** (HKDF of the master key, no salt) in the index tells a wrong key
  (:class:`~shardsave.errors.WrongKeyError`) from a tampered checkpoint
  (:class:`~shardsave.errors.AuthenticationError`) before any chunk is read.

Where the key comes from: the ``encryption_key=`` argument; when reading an encrypted
checkpoint without one, the file named by the environment variable ``SHARDSAVE_KEY_FILE``
(32 raw bytes or 64 hex digits) -- so the command line and tools that load on a user's
behalf need no plumbing. Saves encrypt only when given a key explicitly.

``cryptography`` is needed only when a key is used (``pip install shardsave[encrypt]``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from shardsave.errors import AuthenticationError, EncryptionError, KeyRequiredError, WrongKeyError
from shardsave.format.index import CheckpointInfo, EncryptionInfo, split_trailer

__all__ = [
    "ALGORITHM",
    "KDF",
    "KEY_BYTES",
    "OVERHEAD",
    "SaveCipher",
    "check_key",
    "key_id",
    "load_key_file",
    "new_salt",
    "open_index",
]

ALGORITHM = "aes-256-gcm/1"
KDF = "hkdf-sha256/1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
"""Bytes an encrypted chunk adds: nonce in front, GCM tag behind."""
SALT_BYTES = 16

KEY_FILE_ENV = "SHARDSAVE_KEY_FILE"
_KEY_ID_INFO = b"shardsave key id v1"
_SAVE_KEYS_INFO = b"shardsave save keys v1\x00"
_CHUNK_AAD = b"shardsave chunk v1\x00"
_TOC_MAC = b"shardsave toc v1\x00"
_INDEX_MAC = b"shardsave index v1\x00"
_AAD_FIELDS = struct.Struct("<IIQQH")  # entry, chunk, piece, raw_length, codec: the TOC's order


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise EncryptionError(
            "encryption needs the 'cryptography' package: pip install 'shardsave[encrypt]'"
        ) from exc
    return hashes, AESGCM, HKDF


def _hkdf(master: bytes, *, length: int, salt: bytes | None, info: bytes) -> bytes:
    hashes, _, hkdf = _crypto()
    out: bytes = hkdf(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(master)
    return out


def check_key(key: Any) -> bytes:
    """The master key as bytes; :class:`EncryptionError` unless it is exactly 32 bytes."""
    if isinstance(key, str):
        raise EncryptionError(
            "encryption_key must be 32 raw bytes, not a str; for a hex string pass bytes.fromhex(text), "
            "for a key file use shardsave.crypto.load_key_file(path)"
        )
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise EncryptionError(f"encryption_key must be 32 bytes, got {type(key).__name__}")
    raw = bytes(key)
    if len(raw) != KEY_BYTES:
        raise EncryptionError(
            f"encryption_key must be {KEY_BYTES} bytes (AES-256), got {len(raw)}; make one with os.urandom(32)"
        )
    return raw


def key_id(master: bytes) -> str:
    """32 hex digits identifying ``master``; revealing it reveals nothing about the key."""
    return _hkdf(master, length=16, salt=None, info=_KEY_ID_INFO).hex()


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def load_key_file(path: str) -> bytes:
    """Read a master key file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).

    Warns nothing and trusts nothing: a file of any other shape is refused, naming the path.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as exc:
        raise EncryptionError(f"cannot read the key file {path}: {exc}") from exc
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise EncryptionError(
        f"key file {path} must hold {KEY_BYTES} raw bytes or {2 * KEY_BYTES} hex digits; "
        "make one with: python -c \"import os; print(os.urandom(32).hex())\" > key.hex"
    )


def _view(data: Any) -> memoryview:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class SaveCipher:
    """The keys of one save: encrypts/decrypts its chunks, MACs its TOCs and its index.

    Every rank of a save builds the same one from (master key, save id, salt); it holds no
    mutable state, so encoder and decoder threads share it.
    """

    def __init__(self, master: bytes, save_id: str, salt: bytes) -> None:
        _, aesgcm, _ = _crypto()
        okm = _hkdf(check_key(master), length=64, salt=salt, info=_SAVE_KEYS_INFO + save_id.encode("utf-8"))
        self._aead = aesgcm(okm[:32])
        self._mac_key = okm[32:]
        self._aad_prefix = _CHUNK_AAD + save_id.encode("utf-8") + b"\x00"
        self.save_id = save_id
        self.salt = salt
        self.key_id = key_id(master)

    def record(self) -> EncryptionInfo:
        """The index's ``encryption`` record for this save."""
        return EncryptionInfo(algorithm=ALGORITHM, kdf=KDF, salt=self.salt.hex(), key_id=self.key_id)

    def _aad(self, entry: int, chunk: int, piece: int, raw_length: int, codec: int) -> bytes:
        return self._aad_prefix + _AAD_FIELDS.pack(entry, chunk, piece, raw_length, codec)

    def encrypt_chunk(self, payload: Any, *, entry: int, chunk: int, piece: int, raw_length: int,
                      codec: int) -> np.ndarray:
        """``nonce || ciphertext || tag`` of one encoded chunk, as a fresh uint8 array."""
        src = _view(payload)
        out = np.empty(NONCE_BYTES + src.nbytes + TAG_BYTES, dtype=np.uint8)
        nonce = os.urandom(NONCE_BYTES)
        out[:NONCE_BYTES] = np.frombuffer(nonce, dtype=np.uint8)
        aad = self._aad(entry, chunk, piece, raw_length, codec)
        into = getattr(self._aead, "encrypt_into", None)
        if into is not None:
            into(nonce, src, aad, out.data[NONCE_BYTES:])
        else:  # pragma: no cover - cryptography < 45
            out[NONCE_BYTES:] = np.frombuffer(self._aead.encrypt(nonce, bytes(src), aad), dtype=np.uint8)
        return out

    def decrypt_chunk(self, stored: Any, *, entry: int, chunk: int, piece: int, raw_length: int, codec: int,
                      out: np.ndarray | None = None, where: str = "chunk") -> np.ndarray:
        """The plaintext of a stored chunk, into ``out`` if given (exactly the plaintext size).

        :class:`AuthenticationError` if the tag fails: tampered with, moved, or corrupted.
        """
        src = _view(stored)
        n = src.nbytes - OVERHEAD
        if n < 0:
            raise AuthenticationError(f"{where}: {src.nbytes} stored bytes, shorter than a nonce and a tag")
        if out is None:
            out = np.empty(n, dtype=np.uint8)
        elif out.nbytes != n:
            raise AuthenticationError(f"{where}: holds {n} encrypted bytes, expected {out.nbytes}")
        aad = self._aad(entry, chunk, piece, raw_length, codec)
        nonce = bytes(src[:NONCE_BYTES])
        try:
            into = getattr(self._aead, "decrypt_into", None)
            if into is not None:
                into(nonce, src[NONCE_BYTES:], aad, out.reshape(-1).view(np.uint8).data)
            else:  # pragma: no cover - cryptography < 45
                out[:] = np.frombuffer(self._aead.decrypt(nonce, bytes(src[NONCE_BYTES:]), aad), dtype=np.uint8)
        except Exception as exc:  # InvalidTag; nothing else is expected from these arguments
            raise AuthenticationError(
                f"{where} fails authentication (AES-GCM tag): the chunk was modified, moved from another "
                "place, or corrupted; do not use this checkpoint"
            ) from exc
        return out

    def toc_mac(self, rank: int, toc: bytes | memoryview) -> str:
        return hmac.new(self._mac_key, _TOC_MAC + struct.pack("<I", rank) + bytes(toc), hashlib.sha256).hexdigest()

    def check_toc(self, rank: int, toc: bytes | memoryview, expected: str | None, where: str) -> None:
        if expected is None or not hmac.compare_digest(self.toc_mac(rank, toc), expected):
            raise AuthenticationError(
                f"{where}: table of contents fails authentication (HMAC-SHA256): it was modified; "
                "do not use this checkpoint"
            )

    def index_mac(self, signed: bytes) -> str:
        return hmac.new(self._mac_key, _INDEX_MAC + signed, hashlib.sha256).hexdigest()


def open_index(data: bytes, info: CheckpointInfo, key: Any, *, where: str = "") -> SaveCipher | None:
    """Check a parsed index against ``key`` (None: no key, or the ``SHARDSAVE_KEY_FILE`` one
    for an encrypted checkpoint); the save's cipher, or None.

    * encrypted, no key: :class:`KeyRequiredError`; a different key: :class:`WrongKeyError`;
      an index whose MAC fails: :class:`AuthenticationError` -- never a cipher for it;
    * not encrypted, and a key was given: :class:`EncryptionError`. A caller who expects
      encryption must not silently accept a plain checkpoint, which anybody could have
      written in its place;
    * not encrypted, no key: None (the index digest was already checked by the parser).
    """
    where = where or info.path or "index.json"
    enc = info.encryption
    if enc is None:
        if key is not None:
            raise EncryptionError(
                f"{where} is not encrypted, but an encryption_key was given: refusing to load unauthenticated "
                "data where encrypted data was expected (it may have been replaced); load it without a key if "
                "it is trusted"
            )
        return None
    if key is None and os.environ.get(KEY_FILE_ENV):
        key = load_key_file(os.environ[KEY_FILE_ENV])
    if key is None:
        raise KeyRequiredError(
            f"{where} is encrypted ({enc.algorithm}, key id {enc.key_id}); pass encryption_key= (the 32-byte "
            "master key it was saved with) or, for the command line, --key-file / SHARDSAVE_KEY_FILE"
        )
    master = check_key(key)
    if enc.algorithm != ALGORITHM or enc.kdf != KDF:
        raise EncryptionError(
            f"{where} uses {enc.algorithm} with {enc.kdf}; this shardsave reads {ALGORITHM} with {KDF}: upgrade it"
        )
    mine = key_id(master)
    if not hmac.compare_digest(mine, enc.key_id):
        raise WrongKeyError(
            f"{where} was saved with another key (key id {enc.key_id}; the given key's id is {mine}); "
            "pass the key it was saved with"
        )
    cipher = SaveCipher(master, info.save_id, bytes.fromhex(enc.salt))
    split = split_trailer(data)
    if split is None or split[1] != "index_mac" or not hmac.compare_digest(cipher.index_mac(split[0]), split[2]):
        raise AuthenticationError(
            f"{where}: the index fails authentication (HMAC-SHA256): it was modified after the save; "
            "do not use this checkpoint"
        )
    return cipher


def describe(info: CheckpointInfo) -> Mapping[str, str] | None:
    """The encryption record as a plain dict (for ``info`` output), or None."""
    enc = info.encryption
    if enc is None:
        return None
    return {"algorithm": enc.algorithm, "kdf": enc.kdf, "key_id": enc.key_id}
