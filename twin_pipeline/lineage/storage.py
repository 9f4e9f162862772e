"""Signed PROV bundles in ``governance.prov_bundle``, one per pipeline run.

A bundle row holds the run's PROV-JSON, its sha256 and an Ed25519 signature made with the current
signing key from :class:`twin_pipeline.keys.KeyRing`. The signature covers the bundle hash *and*
the hash of the ledger entry the bundle closes (the last entry of the run), so rewriting the
hash-chained ledger, even with every hash recomputed, no longer matches a signature. Each bundle is
also announced in the ledger as an entry of kind ``prov_bundle``; :func:`verify_bundles` checks the
three agree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from twin_pipeline import ledger
from twin_pipeline.errors import KeyMaterialError
from twin_pipeline.keys import KeyRing
from twin_pipeline.store import Store

BUNDLE_KIND = "prov_bundle"
log = logging.getLogger(__name__)
DDL = """
CREATE TABLE IF NOT EXISTS governance.prov_bundle (
    run_id VARCHAR PRIMARY KEY,
    created_at VARCHAR,
    prov_json VARCHAR,          -- PROV-JSON of the run (W3C PROV-JSON serialization)
    sha256 VARCHAR,             -- of prov_json (UTF-8)
    ledger_seq BIGINT,          -- the ledger entry this bundle closes
    ledger_hash VARCHAR,        -- and its hash at signing time
    key_version INTEGER,        -- signing key version (never the key)
    key_fingerprint VARCHAR,
    signature VARCHAR           -- base64 Ed25519 over signed_message(...)
)
"""


def ensure(store: Store) -> None:
    ledger.ensure(store)
    store.con.execute(DDL)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def signed_message(
    run_id: str, sha256: str, ledger_seq: int, ledger_hash: str, key_version: int
) -> bytes:
    """The exact bytes that are signed: canonical JSON of what the bundle vouches for."""
    return ledger.canonical_json(
        {
            "run_id": run_id,
            "sha256": sha256,
            "ledger_seq": ledger_seq,
            "ledger_hash": ledger_hash,
            "key_version": key_version,
        }
    ).encode()


@dataclass
class BundleRow:
    run_id: str
    created_at: str
    prov_json: str
    sha256: str
    ledger_seq: int
    ledger_hash: str
    key_version: int
    key_fingerprint: str
    signature: str

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.prov_json)
        return doc


def _last_entry_of_run(store: Store, run_id: str) -> tuple[int, str]:
    row = store.con.execute(
        "SELECT seq, hash FROM governance.ledger WHERE run_id = ? AND kind <> ? "
        "ORDER BY seq DESC LIMIT 1",
        [run_id, BUNDLE_KIND],
    ).fetchone()
    if row is None:
        row = store.con.execute(
            "SELECT seq, hash FROM governance.ledger ORDER BY seq DESC LIMIT 1"
        ).fetchone()
    return (int(row[0]), str(row[1])) if row else (0, ledger.GENESIS)


def store_bundle(store: Store, run_id: str, prov_json: str, keyring: KeyRing) -> BundleRow:
    """Sign and store (or replace) the run's bundle and announce it in the ledger. Atomic."""
    ensure(store)
    with store.transaction() as con:
        seq, head = _last_entry_of_run(store, run_id)
        version = keyring.version("signing")
        digest = sha256_text(prov_json)
        sig = keyring.signing_key(version.version).sign(
            signed_message(run_id, digest, seq, head, version.version)
        )
        row = BundleRow(
            run_id=run_id,
            created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
            prov_json=prov_json,
            sha256=digest,
            ledger_seq=seq,
            ledger_hash=head,
            key_version=version.version,
            key_fingerprint=version.fingerprint,
            signature=base64.b64encode(sig).decode(),
        )
        con.execute("DELETE FROM governance.prov_bundle WHERE run_id = ?", [run_id])
        con.execute(
            "INSERT INTO governance.prov_bundle VALUES (?,?,?,?,?,?,?,?,?)",
            [
                row.run_id,
                row.created_at,
                row.prov_json,
                row.sha256,
                row.ledger_seq,
                row.ledger_hash,
                row.key_version,
                row.key_fingerprint,
                row.signature,
            ],
        )
        ledger.append(
            store,
            BUNDLE_KIND,
            {
                "run_id": run_id,
                "sha256": digest,
                "ledger_seq": seq,
                "ledger_hash": head,
                "key_version": version.version,
                "key_fingerprint": version.fingerprint,
                "signature": row.signature,
            },
            run_id=run_id,
        )
    return row


def bundles(store: Store, run_id: str | None = None) -> list[BundleRow]:
    """Stored bundles, oldest first (optionally only one run's)."""
    if not store.table_exists("governance.prov_bundle"):
        return []
    sql = (
        "SELECT run_id, created_at, prov_json, sha256, ledger_seq, ledger_hash, key_version, "
        "key_fingerprint, signature FROM governance.prov_bundle"
    )
    params: list[Any] = []
    if run_id:
        sql += " WHERE run_id = ? OR run_id LIKE ?"
        params += [run_id, f"{run_id}%"]
    sql += " ORDER BY created_at, run_id"
    return [
        BundleRow(
            str(r[0]),
            str(r[1]),
            str(r[2]),
            str(r[3]),
            int(r[4]),
            str(r[5]),
            int(r[6]),
            str(r[7]),
            str(r[8]),
        )
        for r in store.con.execute(sql, params).fetchall()
    ]


def verify_bundles(
    store: Store, keyring: KeyRing | None = None
) -> tuple[int, list[tuple[str, str]]]:
    """Check every bundle: hash, signature, ledger anchor and ledger announcement.

    Returns the number of bundles and ``(record, problem)`` pairs, bundles in creation order.
    Also reports runs whose activities were recorded but never closed by a signed bundle.
    """
    keyring = keyring or KeyRing(store.settings.keys_dir)
    problems: list[tuple[str, str]] = []
    rows = bundles(store)
    announced: dict[str, dict[str, Any]] = {}
    ledger_hash: dict[int, str] = {}
    runs_with_activity: list[str] = []
    if store.table_exists("governance.ledger"):
        for seq, kind, rid, payload, h in store.con.execute(
            "SELECT seq, kind, run_id, payload, hash FROM governance.ledger ORDER BY seq"
        ).fetchall():
            ledger_hash[int(seq)] = str(h)
            if kind == BUNDLE_KIND:
                announced[str(rid)] = json.loads(payload)  # the latest announcement wins
            elif kind == "activity" and rid not in runs_with_activity:
                runs_with_activity.append(str(rid))
    stored = {r.run_id for r in rows}
    for r in rows:
        where = f"governance.prov_bundle run {r.run_id}"
        if sha256_text(r.prov_json) != r.sha256:
            problems.append((where, "PROV-JSON does not match its recorded sha256"))
            continue
        try:
            pub = keyring.public_key(r.key_version)
        except KeyMaterialError as exc:
            problems.append((where, f"cannot verify: signing key v{r.key_version}: {exc}"))
            continue
        try:
            sig = base64.b64decode(r.signature, validate=True)
            pub.verify(
                sig, signed_message(r.run_id, r.sha256, r.ledger_seq, r.ledger_hash, r.key_version)
            )
        except (InvalidSignature, ValueError):
            problems.append((where, f"Ed25519 signature does not verify (key v{r.key_version})"))
            continue
        anchor = ledger_hash.get(r.ledger_seq, ledger.GENESIS if r.ledger_seq == 0 else None)
        if anchor != r.ledger_hash:
            problems.append(
                (where, f"signed ledger anchor seq {r.ledger_seq} no longer has the signed hash")
            )
            continue
        ann = announced.get(r.run_id)
        if ann is None:
            problems.append((where, "bundle is not announced in the ledger"))
        elif ann.get("sha256") != r.sha256 or ann.get("signature") != r.signature:
            problems.append((where, "bundle differs from the one announced in the ledger"))
    for rid in announced:
        if rid not in stored:
            problems.append(
                (f"governance.prov_bundle run {rid}", "announced in the ledger but missing")
            )
    for rid in runs_with_activity:
        if rid not in stored and rid not in announced:
            problems.append(
                (f"governance.ledger run {rid}", "activities recorded but no signed PROV bundle")
            )
    _, seal_problems = verify_seal(store, ledger_hash, keyring)
    problems.extend(seal_problems)
    return len(rows), problems


def stored_document(store: Store, run_id: str | None = None) -> Any:
    """The stored PROV graph: one run's bundle, or every bundle merged (a ``ProvDocument``)."""
    from twin_pipeline.errors import TwinPipelineError
    from twin_pipeline.lineage import prov_build

    rows = bundles(store, run_id)
    if run_id and not rows:
        raise TwinPipelineError(f"no signed PROV bundle for run {run_id!r}")
    if run_id and len({r.run_id for r in rows}) > 1:
        raise TwinPipelineError(f"run id prefix {run_id!r} is ambiguous")
    if len(rows) == 1:
        return prov_build.from_json(rows[0].prov_json)
    merged = prov_build.merge_json(json.loads(r.prov_json) for r in rows)
    merged["prefix"].setdefault(prov_build.NS_PREFIX, prov_build.NS_URI)
    return prov_build.from_json(json.dumps(merged))


# -- the signed ledger head ("seal") ----------------------------------------------------------
# Hash chains cannot show that entries were cut off the end. After each committed run, each
# audit entry written on its own, and during and at the end of every gateway session (Sealer),
# the head of the ledger (seq, hash) is signed into TWIN_HOME/ledger.seal.json, outside the
# database: a ledger whose sealed entry is missing or changed was truncated or rewritten.
# Entries after the sealed head are reported as unsealed, not as tampering.
SEAL_FILE = "ledger.seal.json"


def seal_message(seq: int, head: str, key_version: int) -> bytes:
    return ledger.canonical_json(
        {"seal": "twin-pipeline ledger head", "seq": seq, "hash": head, "key_version": key_version}
    ).encode()


@dataclass(frozen=True)
class _Signer:
    """The current signing key, loaded once (its version and fingerprint with it)."""

    version: int
    fingerprint: str
    key: Ed25519PrivateKey

    @classmethod
    def load(cls, keyring: KeyRing) -> _Signer:
        version = keyring.version("signing")
        return cls(version.version, version.fingerprint, keyring.signing_key(version.version))


def seal_document(seq: int, head: str, signer: _Signer) -> dict[str, Any]:
    return {
        "seq": seq,
        "hash": head,
        "key_version": signer.version,
        "key_fingerprint": signer.fingerprint,
        "sealed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "signature": base64.b64encode(
            signer.key.sign(seal_message(seq, head, signer.version))
        ).decode(),
    }


def write_seal(settings_home: Path, doc: dict[str, Any]) -> None:
    """Replace the seal file atomically (a reader sees the old seal or the new one)."""
    path = settings_home / SEAL_FILE
    # one temporary name per writer thread: a gateway's sealer and a direct seal may overlap
    tmp = path.with_name(f".{SEAL_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def seal(
    store: Store,
    keyring: KeyRing | None = None,
    *,
    head: tuple[int, str] | None = None,
    signer: _Signer | None = None,
) -> dict[str, Any] | None:
    """Sign the current (committed) ledger head into ``TWIN_HOME/ledger.seal.json``.

    ``head`` is the ``(seq, hash)`` just committed, if the caller knows it (no look-up then);
    ``signer`` a signing key already loaded (see :class:`Sealer`).
    """
    if head is None:
        if not store.table_exists("governance.ledger"):
            return None
        head = ledger.head(store)
    if head[0] <= 0:
        return None
    signer = signer or _Signer.load(keyring or KeyRing(store.settings.keys_dir))
    doc = seal_document(head[0], head[1], signer)
    write_seal(store.settings.home, doc)
    return doc


class Sealer:
    """Seals the ledger head of one long-lived writer (the query gateway) off its hot path.

    Each audited query hands its committed head to :meth:`note`; a background thread signs the
    newest noted head at most once per ``interval`` seconds, and :meth:`close` seals the store's
    actual head synchronously. So a gateway session costs no signature or file write per query,
    and what an intruder could cut off the end of the log undetected is bounded: the entries of
    the last ``interval`` seconds of a session that never reached :meth:`close` (a killed
    process). ``twin audit verify`` reports entries after the sealed head as unsealed.
    """

    def __init__(self, store: Store, keyring: KeyRing, interval: float = 0.5) -> None:
        self._store = store
        self._signer = _Signer.load(keyring)
        self._interval = interval
        self._cond = threading.Condition()
        self._pending: tuple[int, str] | None = None
        self._sealed_seq = 0
        self._busy = False  # the thread is between seals (it will look at _pending again)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="twin-ledger-sealer", daemon=True)
        self._thread.start()

    def note(self, head: tuple[int, str]) -> None:
        with self._cond:
            if self._pending is None or head[0] > self._pending[0]:
                self._pending = head
            if not self._busy:
                self._cond.notify()

    def _seal(self, head: tuple[int, str]) -> None:
        if head[0] <= self._sealed_seq:
            return
        write_seal(self._store.settings.home, seal_document(head[0], head[1], self._signer))
        self._sealed_seq = head[0]

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopped:
                    self._busy = False
                    self._cond.wait()
                head = self._pending
                if self._stopped or head is None:
                    return
                self._pending = None
                self._busy = True
            try:
                self._seal(head)
            except OSError as exc:  # the next seal (or close) retries
                log.warning("ledger seal not written: %s", exc)
            with self._cond:
                if not self._stopped:
                    self._cond.wait(self._interval)  # no wake-ups by note() meanwhile

    def close(self) -> dict[str, Any] | None:
        """Stop the thread and seal the committed head of the store (the last word)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)
        head = ledger.head(self._store)
        with self._cond:
            if head[0] <= 0:
                return None
            doc = seal_document(head[0], head[1], self._signer)
            write_seal(self._store.settings.home, doc)
            self._sealed_seq = head[0]
            return doc


def sealed_seq(store: Store) -> int | None:
    """The ledger seq the seal file vouches for (None: no readable seal)."""
    try:
        return int(json.loads((store.settings.home / SEAL_FILE).read_text())["seq"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_seal(
    store: Store, ledger_hashes: dict[int, str], keyring: KeyRing | None = None
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """Check the sealed head against the ledger; returns the seal and problems."""
    path = store.settings.home / SEAL_FILE
    if not path.exists():
        return None, []
    where = f"{SEAL_FILE}"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        seq, head, kv = int(doc["seq"]), str(doc["hash"]), int(doc["key_version"])
        sig = base64.b64decode(str(doc["signature"]), validate=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None, [(where, "unreadable ledger seal")]
    keyring = keyring or KeyRing(store.settings.keys_dir)
    try:
        keyring.public_key(kv).verify(sig, seal_message(seq, head, kv))
    except KeyMaterialError as exc:
        return doc, [(where, f"cannot verify: signing key v{kv}: {exc}")]
    except InvalidSignature:
        return doc, [(where, f"Ed25519 signature of the ledger seal does not verify (key v{kv})")]
    if seq not in ledger_hashes:
        return doc, [
            (
                f"governance.ledger seq {seq}",
                "sealed ledger head is missing: entries were deleted from the end of the ledger",
            )
        ]
    if ledger_hashes[seq] != head:
        return doc, [
            (f"governance.ledger seq {seq}", "sealed ledger head no longer has the sealed hash")
        ]
    return doc, []
