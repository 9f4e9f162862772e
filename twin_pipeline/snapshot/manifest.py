"""The snapshot manifest, its Ed25519 signature, and ``twin snapshot verify``.

Layout of a snapshot folder::

    data/<table>.parquet   one file per exported table
    README.md              the dataset card
    lineage.json           PROV-JSON of the snapshot's derivation
    public_key.pem         the signing key's public half (Ed25519)
    manifest.json          everything above by sha256 and size, plus schema, row counts, source
                           table versions and run ids, policy, key and code versions, the cohort
                           and the disclosure-control summary
    manifest.sig           base64 Ed25519 signature of manifest.json's bytes (domain-separated)

The manifest holds no time and no run-varying value, so the same store, keys and cohort give
the same manifest bytes (and Ed25519 signatures are deterministic, so the same signature).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from twin_pipeline.errors import SignatureError
from twin_pipeline.snapshot.writer import sha256_file

FORMAT = "twin-snapshot/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PUBLIC_KEY = "public_key.pem"
_DOMAIN = b"twin-pipeline snapshot manifest v1\n"


def canonical(doc: Any) -> bytes:
    """Stable JSON bytes: sorted keys, two-space indent, trailing newline (readable and hashable)."""
    return (json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def signed_message(manifest_bytes: bytes) -> bytes:
    return _DOMAIN + hashlib.sha256(manifest_bytes).digest()


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(signed_message(manifest_bytes))).decode() + "\n"


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(key: Ed25519PublicKey) -> str:
    """Same fingerprint as :meth:`twin_pipeline.keys.KeyRing.version` (sha256 of the raw key)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(data: bytes, *, path: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"not a PEM public key: {exc}", path=path) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is not Ed25519", path=path)
    return key


@dataclass
class VerifyReport:
    directory: Path
    snapshot_id: str | None = None
    key_fingerprint: str | None = None
    trusted_key: bool = False
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "directory": str(self.directory),
            "snapshot_id": self.snapshot_id,
            "key_fingerprint": self.key_fingerprint,
            "trusted_key": self.trusted_key,
            "files_checked": self.files_checked,
            "problems": self.problems,
        }


def verify(directory: Path, pubkey_pem: Path | None = None) -> VerifyReport:
    """Check the manifest signature and every file's sha256 and size; name what changed.

    Without ``pubkey_pem`` the public key shipped in the snapshot is used (this proves the files
    match the manifest and the manifest was signed by that key; compare its fingerprint with the
    publisher's). With ``pubkey_pem`` the manifest must be signed by that trusted key.
    """
    directory = Path(directory)
    report = VerifyReport(directory=directory, trusted_key=pubkey_pem is not None)
    if not directory.is_dir():
        report.problems.append(f"{directory}: not a snapshot folder (missing)")
        return report
    mpath = directory / MANIFEST
    try:
        manifest_bytes = mpath.read_bytes()
        manifest: dict[str, Any] = json.loads(manifest_bytes)
    except FileNotFoundError:
        report.problems.append(f"{MANIFEST}: missing")
        return report
    except (OSError, ValueError) as exc:
        report.problems.append(f"{MANIFEST}: unreadable or not JSON ({exc})")
        return report
    report.snapshot_id = manifest.get("snapshot_id")

    # -- signature ---------------------------------------------------------------------------
    key: Ed25519PublicKey | None = None
    key_source = pubkey_pem if pubkey_pem is not None else directory / PUBLIC_KEY
    try:
        key = load_public_key(Path(key_source).read_bytes(), path=str(key_source))
    except FileNotFoundError:
        report.problems.append(f"{key_source}: public key missing")
    except (OSError, SignatureError) as exc:
        report.problems.append(f"{key_source}: {exc}")
    if key is not None:
        report.key_fingerprint = fingerprint(key)
        expected = (manifest.get("signature") or {}).get("key_fingerprint")
        if pubkey_pem is None and expected and expected != report.key_fingerprint:
            report.problems.append(
                f"{PUBLIC_KEY}: fingerprint {report.key_fingerprint} is not the signing key "
                f"named in the manifest ({expected})"
            )
        try:
            sig = base64.b64decode((directory / SIGNATURE).read_text().strip(), validate=True)
            key.verify(sig, signed_message(manifest_bytes))
        except FileNotFoundError:
            report.problems.append(f"{SIGNATURE}: missing")
        except (ValueError, OSError):
            report.problems.append(f"{SIGNATURE}: not a base64 signature")
        except InvalidSignature:
            who = "the trusted key" if pubkey_pem is not None else "the snapshot's public key"
            report.problems.append(
                f"{MANIFEST}: signature does not verify with {who} "
                f"(fingerprint {report.key_fingerprint}): the manifest was changed or signed "
                "by another key"
            )

    # -- files -------------------------------------------------------------------------------
    files: dict[str, dict[str, Any]] = manifest.get("files") or {}
    if not files:
        report.problems.append(f"{MANIFEST}: lists no files")
    for rel, meta in sorted(files.items()):
        path = directory / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            report.problems.append(f"{rel}: path escapes the snapshot folder")
            continue
        report.files_checked += 1
        if not path.is_file():
            report.problems.append(f"{rel}: missing (removed)")
            continue
        size = path.stat().st_size
        digest = sha256_file(path)
        if digest != meta.get("sha256"):
            report.problems.append(
                f"{rel}: sha256 {digest[:16]}… does not match the manifest "
                f"({str(meta.get('sha256'))[:16]}…): changed"
                + (
                    f" (size {size}, manifest {meta.get('bytes')})"
                    if size != meta.get("bytes")
                    else ""
                )
            )
    known = {MANIFEST, SIGNATURE, *files}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel not in known:
            report.problems.append(f"{rel}: not in the manifest (added)")
    return report
