"""Encryption at rest (shardsave.crypto): round trips through every entry point, and every
way of getting the key wrong or tampering with the checkpoint ends in a clear
ShardsaveError subclass -- never in wrong tensors."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import shardsave as ss
from shardsave import knobs
from shardsave.cli import main as cli_main
from shardsave.crypto import OVERHEAD, key_id, load_key_file
from shardsave.errors import (
    AuthenticationError,
    CorruptionError,
    EncryptionError,
    KeyRequiredError,
    ShardsaveError,
    WrongKeyError,
)
from shardsave.format.index import index_from_json
from shardsave.format.toc import TOC_DTYPE, TOC_HEADER

KEY = bytes(range(32))


def state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(40, 33, generator=g), "bf": torch.randn(50, 20, generator=g).bfloat16(),
                  "zeros": torch.zeros(300), "ids": torch.arange(77)},
        "opt": {"step": torch.tensor(5.0)},
        "np": np.arange(12, dtype=np.int16).reshape(3, 4),
        "blob": b"\x00secret bytes\xff",
        "meta": {"epoch": 3, "name": "run"},
        "rng": ss.PerRank(torch.tensor([1, 2, 3], dtype=torch.uint8)),
    }


def same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape and bool(
            (got.reshape(-1).view(torch.uint8) == want.reshape(-1).view(torch.uint8)).all())
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.dtype == want.dtype and got.tobytes() == want.tobytes()
    if isinstance(want, ss.PerRank):
        return same(got, [want.value])
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    return bool(got == want)


@pytest.fixture
def encrypted(tmp_path: Path) -> str:
    path = str(tmp_path / "enc")
    with knobs.override(CHUNK_BYTES=2048):
        ss.save(state(), path, encryption_key=KEY)
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", ["auto", "raw", "zstd", "zstd-shuffle"])
def test_round_trip_through_every_codec(tmp_path: Path, codec: str) -> None:
    path = str(tmp_path / codec)
    with knobs.override(CHUNK_BYTES=1024):
        info = ss.save(state(), path, codec=codec, encryption_key=KEY)
    assert info.encrypted and info.encryption is not None and info.encryption.key_id == key_id(KEY)
    assert same(ss.load_full(path, encryption_key=KEY), state())
    report = ss.verify(path, encryption_key=KEY)
    assert report.ok and report.authenticated is True, report.problems


@pytest.mark.timeout(60)
def test_in_place_load_and_info(encrypted: str) -> None:
    target = state()
    target["model"]["w"].zero_()
    target["model"]["bf"].zero_()
    target["np"][:] = 0
    target["meta"]["epoch"] = 0
    ss.load(target, encrypted, encryption_key=KEY)
    assert same(target["model"], state()["model"]) and target["meta"]["epoch"] == 3
    assert same(target["np"], state()["np"])
    assert ss.info(encrypted, encryption_key=KEY).encrypted
    assert ss.info(encrypted).encrypted  # names and shapes are readable without the key


@pytest.mark.timeout(60)
def test_stored_bytes_are_ciphertext(encrypted: str, tmp_path: Path) -> None:
    plain = str(tmp_path / "plain")
    with knobs.override(CHUNK_BYTES=2048):
        ss.save(state(), plain, codec="raw")
    data = b"".join(p.read_bytes() for p in Path(encrypted, "data").iterdir())
    assert b"secret bytes" not in data
    w = state()["model"]["w"].numpy().tobytes()
    assert w[:64] not in data and w[-64:] not in data
    # Every chunk grew by exactly a nonce and a tag.
    ienc, iplain = ss.info(encrypted), ss.info(plain)
    assert ienc.files[0].toc_mac is not None and iplain.files[0].toc_mac is None


@pytest.mark.timeout(60)
def test_missing_wrong_and_malformed_keys(encrypted: str, tmp_path: Path) -> None:
    for call in (lambda k: ss.load_full(encrypted, encryption_key=k),
                 lambda k: ss.load(state(), encrypted, encryption_key=k)):
        with pytest.raises(KeyRequiredError, match="encryption_key"):
            call(None)
        with pytest.raises(WrongKeyError, match="another key"):
            call(os.urandom(32))
        with pytest.raises(EncryptionError, match="32 bytes"):
            call(b"short")
        with pytest.raises(EncryptionError, match="not a str"):
            call(KEY.hex())
    # save reports it like any failure of a collective save: on every rank, before writing.
    with pytest.raises(ss.CheckpointError, match="32 bytes"):
        ss.save(state(), str(tmp_path / "x"), encryption_key=b"\x00" * 16)
    assert not (tmp_path / "x" / "index.json").exists()


@pytest.mark.timeout(60)
def test_a_plain_checkpoint_is_refused_when_a_key_is_given(tmp_path: Path) -> None:
    """Downgrade: an attacker who replaces an encrypted checkpoint by a plain one of their
    making must not get it loaded by a caller who expects encryption."""
    plain = str(tmp_path / "plain")
    ss.save(state(), plain)
    with pytest.raises(EncryptionError, match="not encrypted"):
        ss.load_full(plain, encryption_key=KEY)
    assert not ss.verify(plain, encryption_key=KEY).ok


@pytest.mark.timeout(60)
def test_verify_without_the_key_checks_checksums_only(encrypted: str) -> None:
    report = ss.verify(encrypted)
    assert report.ok and report.authenticated is False and report.chunks_checked > 0
    data = next(Path(encrypted, "data").iterdir())
    raw = bytearray(data.read_bytes())
    raw[3] ^= 0x40
    data.write_bytes(bytes(raw))
    assert not ss.verify(encrypted).ok  # corruption is still found without the key


def _rewrite_index(path: str, edit: Any) -> None:
    index = Path(path, "index.json")
    index.write_bytes(edit(index.read_bytes()))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["metadata", "shape", "save_id", "key_id", "salt", "mac", "strip-mac",
                                  "to-sha256", "drop-encryption"])
def test_a_tampered_index_is_refused(encrypted: str, what: str) -> None:
    def edit(data: bytes) -> bytes:
        text = data.decode()
        if what == "metadata":
            return text.replace('"metadata":{}', '"metadata":{"x":1}').encode()
        if what == "shape":
            return text.replace('"shape":[40,33]', '"shape":[33,40]').encode()
        if what == "save_id":
            return re.sub(r'"save_id":"[^"]*"', '"save_id":"20000101T000000-00000000"', text).encode()
        if what == "key_id":
            return re.sub(r'"key_id":"[0-9a-f]*"', '"key_id":"' + key_id(os.urandom(32)) + '"', text).encode()
        if what == "salt":
            return re.sub(r'"salt":"[0-9a-f]*"', '"salt":"' + "0" * 32 + '"', text).encode()
        if what == "mac":
            return re.sub(r'"index_mac":"[0-9a-f]*"', '"index_mac":"' + "0" * 64 + '"', text).encode()
        doc = json.loads(text)
        doc.pop("index_mac")
        if what == "drop-encryption":
            doc.pop("encryption")
        body = json.dumps(doc, separators=(",", ":")).encode()
        if what == "strip-mac":
            return body
        import hashlib

        signed = body[:-1]
        return signed + b',"index_sha256":"' + hashlib.sha256(signed).hexdigest().encode() + b'"}'

    _rewrite_index(encrypted, edit)
    with pytest.raises(ShardsaveError) as info:
        ss.load_full(encrypted, encryption_key=KEY)
    assert isinstance(info.value, (AuthenticationError, WrongKeyError, CorruptionError, EncryptionError))
    assert not ss.verify(encrypted, encryption_key=KEY).ok


@pytest.mark.timeout(60)
def test_chunks_swapped_between_slots_fail_authentication(encrypted: str) -> None:
    """Two chunks of the same size trade places, TOC rows fixed up to match (with the CRC of
    the TOC recomputed): only the GCM associated data can notice."""
    import zlib

    data_file = next(Path(encrypted, "data").iterdir())
    info = ss.info(encrypted)
    f = info.files[0]
    blob = bytearray(data_file.read_bytes())
    rows = np.frombuffer(bytes(blob[f.toc_offset + TOC_HEADER.size:f.toc_offset + f.toc_length]),
                         dtype=TOC_DTYPE).copy()
    sizes: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        sizes.setdefault(int(r["length"]), []).append(i)
    a, b = next(v for v in sizes.values() if len(v) >= 2)[:2]
    for name in ("offset",):
        rows[a][name], rows[b][name] = int(rows[b][name]), int(rows[a][name])
    toc = bytes(blob[f.toc_offset:f.toc_offset + TOC_HEADER.size]) + rows.tobytes()
    blob[f.toc_offset:f.toc_offset + f.toc_length] = toc
    data_file.write_bytes(bytes(blob))
    # Fix the TOC checksum in the index as a forger would; the index MAC then fails...
    _rewrite_index(encrypted, lambda d: d.replace(f'"toc_checksum":{f.toc_checksum}'.encode(),
                                                  f'"toc_checksum":{zlib.crc32(toc)}'.encode()))
    with pytest.raises(AuthenticationError):
        ss.load_full(encrypted, encryption_key=KEY)


@pytest.mark.timeout(60)
def test_a_data_file_from_another_save_with_the_same_key_is_refused(tmp_path: Path) -> None:
    """Replay: the same value saved twice under one key; the second checkpoint's data file
    copied over the first's name."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ss.save({"w": torch.arange(1000.0)}, a, encryption_key=KEY, codec="raw")
    ss.save({"w": torch.arange(1000.0)}, b, encryption_key=KEY, codec="raw")
    fa, fb = ss.info(a).files[0], ss.info(b).files[0]
    assert fa.size == fb.size
    shutil.copyfile(Path(b, fb.name), Path(a, fa.name))
    with pytest.raises(CorruptionError):  # the TOC's checksum (its MAC too) and every tag differ
        ss.load_full(a, encryption_key=KEY)


@pytest.mark.timeout(60)
def test_chunk_tags_bind_the_save_and_the_slot() -> None:
    """The innermost line (the outer ones -- checksums, TOC and index MACs -- stop every
    forgery first): a chunk decrypts only under its own save's keys and in its own slot."""
    from shardsave.crypto import SaveCipher

    salt = bytes(16)
    cipher = SaveCipher(KEY, "20260101T000000-00000001", salt)
    place = {"entry": 3, "chunk": 1, "piece": 7, "raw_length": 400, "codec": 0}
    sealed = cipher.encrypt_chunk(np.arange(400, dtype=np.uint8), **place)
    assert bytes(cipher.decrypt_chunk(sealed, **place)) == bytes(range(256)) + bytes(range(144))
    for field in place:
        with pytest.raises(AuthenticationError):
            cipher.decrypt_chunk(sealed, **{**place, field: place[field] + 1})
    for other in (SaveCipher(KEY, "20260101T000000-00000002", salt),
                  SaveCipher(KEY, "20260101T000000-00000001", b"\x01" * 16),
                  SaveCipher(os.urandom(32), "20260101T000000-00000001", salt)):
        with pytest.raises(AuthenticationError):
            other.decrypt_chunk(sealed, **place)
    with pytest.raises(AuthenticationError):
        cipher.decrypt_chunk(sealed[:20], **place)


@pytest.mark.timeout(60)
def test_the_payload_layout_is_nonce_ciphertext_tag(encrypted: str) -> None:
    info = ss.info(encrypted)
    f = info.files[0]
    blob = Path(encrypted, f.name).read_bytes()
    rows = np.frombuffer(blob[f.toc_offset + TOC_HEADER.size:f.toc_offset + f.toc_length], dtype=TOC_DTYPE)
    raw_rows = [r for r in rows if info.codecs[int(r["codec"])] == "raw/1"]
    assert raw_rows and all(int(r["length"]) == int(r["raw_length"]) + OVERHEAD for r in raw_rows)
    nonces = {blob[int(r["offset"]):int(r["offset"]) + 12] for r in rows}
    assert len(nonces) == len(rows)  # a fresh nonce per chunk


@pytest.mark.timeout(60)
def test_key_files_the_environment_and_the_cli(encrypted: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    hex_file, raw_file, bad = tmp_path / "k.hex", tmp_path / "k.bin", tmp_path / "bad"
    hex_file.write_text(KEY.hex() + "\n")
    raw_file.write_bytes(KEY)
    bad.write_text("not a key")
    assert load_key_file(str(hex_file)) == KEY == load_key_file(str(raw_file))
    with pytest.raises(EncryptionError, match="32 raw bytes or 64 hex digits"):
        load_key_file(str(bad))
    # The CLI passes --key-file on through the environment of its process: set it here
    # first so that monkeypatch restores it after the test.
    monkeypatch.setenv("SHARDSAVE_KEY_FILE", "")
    assert cli_main(["verify", encrypted]) == 0  # no key: the checksums pass, and it says so
    assert "checksums only" in capsys.readouterr().out
    assert cli_main(["verify", encrypted, "--key-file", str(hex_file)]) == 0
    assert "authenticated with the key" in capsys.readouterr().out
    monkeypatch.setenv("SHARDSAVE_KEY_FILE", str(raw_file))
    assert same(ss.load_full(encrypted), state())  # readers fall back to SHARDSAVE_KEY_FILE
    out = tmp_path / "out.safetensors"
    assert cli_main(["convert", encrypted, str(out), "--keys", "model"]) == 0
    monkeypatch.setenv("SHARDSAVE_KEY_FILE", str(bad))
    assert cli_main(["verify", encrypted]) == 1


@pytest.mark.timeout(60)
def test_async_save_encrypts(tmp_path: Path) -> None:
    path = str(tmp_path / "async")
    handle = ss.async_save(state(), path, encryption_key=KEY)
    assert handle.wait().encrypted
    assert same(ss.load_full(path, encryption_key=KEY), state())
    with pytest.raises(KeyRequiredError):
        ss.load_full(path)


@pytest.mark.timeout(60)
def test_an_encrypted_index_parses_as_format_1_1(encrypted: str) -> None:
    data = Path(encrypted, "index.json").read_bytes()
    parsed = index_from_json(data)
    assert parsed.format_version == (1, 1) and parsed.encryption is not None
    assert parsed.encryption.algorithm == "aes-256-gcm/1" and parsed.encryption.kdf == "hkdf-sha256/1"
    assert data.endswith(b'"}') and b'"index_mac":"' in data[-90:]
