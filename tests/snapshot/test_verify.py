"""``twin snapshot verify``: every tampering is caught and named; the CLI exit codes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from twin_pipeline.cli import main
from twin_pipeline.paths import Settings
from twin_pipeline.snapshot import create_snapshot, verify


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One snapshot made once for the module; tests tamper with copies of it."""
    from twin_pipeline.keys import KeyRing

    from .conftest import build_store

    root = tmp_path_factory.mktemp("verify")
    settings = Settings.from_env(root / "home").ensure()
    KeyRing(settings.keys_dir).init()
    build_store(settings)
    out = root / "snap"
    create_snapshot("researcher", out, settings=settings)
    return out


@pytest.fixture
def snap(pristine: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(pristine, out)
    return out


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(out: Path) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m["disclosure_control"]["k"] = 1
    (out / "manifest.json").write_text(json.dumps(m, sort_keys=True, indent=2) + "\n")


def _consistent_forgery(out: Path) -> None:
    """Change a file and rewrite its hash in the manifest: only the signature can catch it."""
    path = out / "data" / "location.parquet"
    _flip_byte(path)
    from twin_pipeline.snapshot.writer import sha256_file

    m = json.loads((out / "manifest.json").read_text())
    m["files"]["data/location.parquet"]["sha256"] = sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(m, sort_keys=True, indent=2) + "\n")


def _resign_with_other_key(out: Path) -> None:
    """An attacker re-signs a changed manifest with their own key and ships its public key."""
    from twin_pipeline.snapshot import manifest

    other = Ed25519PrivateKey.generate()
    _edit_manifest(out)
    (out / "manifest.sig").write_text(manifest.sign((out / "manifest.json").read_bytes(), other))
    (out / "public_key.pem").write_bytes(manifest.public_pem(other.public_key()))


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("changed byte", lambda o: _flip_byte(o / "data" / "patient.parquet"), "data/patient.parquet"),
    ("changed card", lambda o: _flip_byte(o / "README.md", 5), "README.md: sha256"),
    (
        "removed file",
        lambda o: (o / "data" / "encounter.parquet").unlink(),
        "encounter.parquet: missing",
    ),
    ("removed lineage", lambda o: (o / "lineage.json").unlink(), "lineage.json: missing"),
    ("changed manifest", _edit_manifest, "manifest.json: signature does not verify"),
    ("consistent forgery", _consistent_forgery, "manifest.json: signature does not verify"),
    ("removed signature", lambda o: (o / "manifest.sig").unlink(), "manifest.sig: missing"),
    (
        "added file",
        lambda o: (o / "data" / "extra.parquet").write_bytes(b"x"),
        "extra.parquet: not in",
    ),
    ("swapped key", _resign_with_other_key, "public_key.pem: fingerprint"),
    ("manifest not JSON", lambda o: (o / "manifest.json").write_text("{"), "not JSON"),
    ("manifest removed", lambda o: (o / "manifest.json").unlink(), "manifest.json: missing"),
    ("key removed", lambda o: (o / "public_key.pem").unlink(), "public key missing"),
]


@pytest.mark.parametrize(("label", "tamper", "message"), CASES, ids=[c[0] for c in CASES])
def test_tampering_is_named(
    snap: Path, label: str, tamper: Callable[[Path], None], message: str
) -> None:
    assert verify(snap).ok
    tamper(snap)
    report = verify(snap)
    assert not report.ok
    assert any(message in p for p in report.problems), report.problems


def test_trusted_key(snap: Path, tmp_path: Path) -> None:
    pem = (snap / "public_key.pem").read_bytes()
    (tmp_path / "trusted.pem").write_bytes(pem)
    assert verify(snap, tmp_path / "trusted.pem").ok
    # the wrong key: another Ed25519 key does not verify the manifest
    other = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "other.pem").write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    report = verify(snap, tmp_path / "other.pem")
    assert not report.ok
    assert any("signature does not verify with the trusted key" in p for p in report.problems)
    # a forger who swaps the shipped key is caught by the trusted key too
    _resign_with_other_key(snap)
    assert not verify(snap, tmp_path / "trusted.pem").ok


def test_cli_verify_exit_codes(snap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "verify", str(snap)]) == 0
    assert "ok: snapshot" in capsys.readouterr().out
    _flip_byte(snap / "data" / "observation.parquet")
    assert main(["snapshot", "verify", str(snap)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: data/observation.parquet" in err
    assert main(["snapshot", "verify", "--json", str(snap)]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_cli_create_and_denied(
    snap_home: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    assert main(["snapshot", "create", "--as", "researcher", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tables"]["deid.patient"] == 19
    assert main(["snapshot", "verify", str(out)]) == 0
    rc = main(
        [
            "snapshot",
            "create",
            "--as",
            "engineer",
            "--table",
            "harmonized.patient",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 3
    assert "twin: denied:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_folder(tmp_path: Path) -> None:
    report = verify(tmp_path / "nowhere")
    assert not report.ok and "not a snapshot folder" in report.problems[0]
