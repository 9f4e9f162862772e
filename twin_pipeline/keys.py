"""Local key material: pseudonymization (HMAC), signing (Ed25519) and store encryption keys.

Keys live in ``TWIN_HOME/keys`` (folder 0700, files 0600). They are created only by
``twin keys init`` or ``twin keys rotate``; a missing key is an error, never a silent new key,
so pseudonyms stay stable. Nothing here prints or logs key bytes: callers get versions and
fingerprints (a hash that cannot be turned back into the key).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from twin_pipeline.errors import KeyMaterialError

KeyKind = Literal["pseudonym", "signing"]
_MANIFEST = "keyring.json"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@dataclass(frozen=True)
class KeyVersion:
    kind: str
    version: int
    fingerprint: str

    @property
    def label(self) -> str:
        return f"{self.kind}-v{self.version}"


class KeyRing:
    """Read and manage the key files in one folder."""

    def __init__(self, keys_dir: Path):
        self.dir = keys_dir

    # -- lifecycle ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.dir / _MANIFEST).is_file()

    def init(self, *, if_missing: bool = False) -> bool:
        """Create the first version of every key. Returns False if keys already existed."""
        if self.exists():
            if if_missing:
                return False
            raise KeyMaterialError(
                "keys already exist; use `twin keys rotate` for a new version", path=str(self.dir)
            )
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        _write_private(self.dir / "store.key", secrets.token_hex(32).encode())
        manifest: dict[str, dict[str, int]] = {}
        for kind in ("pseudonym", "signing"):
            self._create(kind, 1)  # type: ignore[arg-type]
            manifest[kind] = {"current": 1}
        self._write_manifest(manifest)
        return True

    def rotate(self, kind: KeyKind) -> KeyVersion:
        """Make a new current version of a key; old versions stay for verification."""
        manifest = self._manifest()
        new = manifest[kind]["current"] + 1
        self._create(kind, new)
        manifest[kind]["current"] = new
        self._write_manifest(manifest)
        return self.version(kind)

    # -- access ------------------------------------------------------------------------------
    def version(self, kind: KeyKind, version: int | None = None) -> KeyVersion:
        v = version or self._manifest()[kind]["current"]
        if kind == "pseudonym":
            fp = hashlib.sha256(b"fingerprint:" + self.pseudonym_key(v)).hexdigest()[:16]
        else:
            pub = self.public_key(v).public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            fp = hashlib.sha256(pub).hexdigest()[:16]
        return KeyVersion(kind, v, fp)

    def pseudonym_key(self, version: int | None = None) -> bytes:
        v = version or self._manifest()["pseudonym"]["current"]
        return self._read(f"pseudonym-v{v}.key")

    def signing_key(self, version: int | None = None) -> Ed25519PrivateKey:
        v = version or self._manifest()["signing"]["current"]
        key = serialization.load_pem_private_key(self._read(f"signing-v{v}.pem"), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyMaterialError("signing key is not Ed25519", path=str(self.dir))
        return key

    def public_key(self, version: int | None = None) -> Ed25519PublicKey:
        return self.signing_key(version).public_key()

    def public_key_pem(self, version: int | None = None) -> bytes:
        return self.public_key(version).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def store_key(self) -> str:
        return self._read("store.key").decode().strip()

    def summary(self) -> dict[str, object]:
        """Versions and fingerprints only: safe to print."""
        m = self._manifest()
        out: dict[str, object] = {
            kind: {"current": m[kind]["current"], "fingerprint": self.version(kind).fingerprint}  # type: ignore[arg-type]
            for kind in ("pseudonym", "signing")
        }
        out["store"] = {"encrypted": True}
        return out

    # -- internals ---------------------------------------------------------------------------
    def _create(self, kind: KeyKind, version: int) -> None:
        if kind == "pseudonym":
            _write_private(self.dir / f"pseudonym-v{version}.key", secrets.token_bytes(32))
        else:
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_private(self.dir / f"signing-v{version}.pem", pem)

    def _manifest(self) -> dict[str, dict[str, int]]:
        path = self.dir / _MANIFEST
        if not path.is_file():
            raise KeyMaterialError(
                "no keys found; create them once with `twin keys init`", path=str(self.dir)
            )
        try:
            data: dict[str, dict[str, int]] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise KeyMaterialError(f"unreadable key manifest: {exc}", path=str(path)) from exc
        return data

    def _write_manifest(self, manifest: dict[str, dict[str, int]]) -> None:
        tmp = self.dir / (_MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.chmod(tmp, 0o600)
        tmp.replace(self.dir / _MANIFEST)

    def _read(self, name: str) -> bytes:
        path = self.dir / name
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise KeyMaterialError(
                "key file missing; restore it from backup (a new key would change every "
                "pseudonym), or run `twin keys init` on a new TWIN_HOME",
                path=str(path),
            ) from exc
        except OSError as exc:
            raise KeyMaterialError(f"cannot read key file: {exc}", path=str(path)) from exc
