"""Step reuse (twin_pipeline.reuse): the stamp changes with everything a step's output depends
on, and a remembered result is offered only while the step's tables are still the versions
that run recorded."""

from __future__ import annotations

import pytest

from twin_pipeline import reuse
from twin_pipeline.activity import TableVersion, table_versions
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

INPUTS = [TableVersion("harmonized.patient", 3, "a" * 64), TableVersion("harmonized.x", 5, "b")]


def test_the_stamp_follows_inputs_policies_key_code_and_extra(
    twin_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(twin_home) as store:
        base = reuse.step_stamp(store, INPUTS)
        assert reuse.step_stamp(store, list(reversed(INPUTS))) == base  # order is not content
        changed = [
            reuse.step_stamp(store, [TableVersion("harmonized.patient", 3, "c" * 64), INPUTS[1]]),
            reuse.step_stamp(store, [TableVersion("harmonized.patient", 4, "a" * 64), INPUTS[1]]),
            reuse.step_stamp(store, INPUTS[:1]),
            reuse.step_stamp(store, INPUTS, {"scenario": "x"}),
        ]
        real = reuse.policy_versions()
        assert "policies/deid.yaml" in real
        monkeypatch.setattr(reuse, "policy_versions", lambda: {**real, "policies/deid.yaml": "0"})
        changed.append(reuse.step_stamp(store, INPUTS))
        # who may read or run is not what a step writes
        monkeypatch.setattr(
            reuse,
            "policy_versions",
            lambda: {**real, "policies/users.yaml": "0", "policies/roles.yaml": "1"},
        )
        assert reuse.step_stamp(store, INPUTS) == base
        monkeypatch.setattr(reuse, "policy_versions", lambda: real)
        monkeypatch.setattr(reuse, "code_fingerprint", lambda: "other code")
        changed.append(reuse.step_stamp(store, INPUTS))
        monkeypatch.undo()
        assert reuse.step_stamp(store, INPUTS) == base
        KeyRing(twin_home.keys_dir).rotate("pseudonym")
        changed.append(reuse.step_stamp(store, INPUTS))
    assert len(set(changed)) == len(changed) and base not in changed


def test_the_fingerprint_covers_the_package_and_the_specs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pathlib

    from twin_pipeline.paths import ASSETS_DIR, PACKAGE_ROOT

    seen: list[pathlib.Path] = []
    read = pathlib.Path.read_bytes

    def spy(self: pathlib.Path) -> bytes:
        seen.append(self)
        return read(self)

    reuse.code_fingerprint.cache_clear()
    monkeypatch.setattr(pathlib.Path, "read_bytes", spy)
    try:
        first = reuse.code_fingerprint()
    finally:
        reuse.code_fingerprint.cache_clear()
    assert PACKAGE_ROOT / "deid" / "structured.py" in seen
    assert PACKAGE_ROOT / "reuse.py" in seen
    assert ASSETS_DIR / "telemetry.yaml" in seen
    # a changed source file changes it
    target = PACKAGE_ROOT / "deid" / "keyed.py"
    monkeypatch.setattr(
        pathlib.Path, "read_bytes", lambda p: read(p) + (b"#" if p == target else b"")
    )
    try:
        assert reuse.code_fingerprint() != first
    finally:
        reuse.code_fingerprint.cache_clear()


def _table(store: Store, name: str, rows: int) -> None:
    store.con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT range AS i FROM range({rows})")


def test_a_result_is_offered_only_while_its_tables_are_that_runs(
    twin_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = ["deid.t"]
    with Store.open(twin_home, run_id="run-1") as store:
        with store.transaction():
            _table(store, "deid.t", 4)
            table_versions(store, out)
            reuse.remember(store, "deid/t", "s1", out, {"leak": {"passed": True}})
        assert reuse.reusable(store, "deid/t", "s1", out) == {
            "run_id": "run-1",
            "leak": {"passed": True},
        }
        assert reuse.reusable(store, "deid/t", "s2", out) is None  # another stamp
        assert reuse.reusable(store, "deid/u", "s1", out) is None  # another step
        assert reuse.reusable(store, "deid/t", "s1", ["deid.t", "deid.v"]) is None
        monkeypatch.setenv("TWIN_REUSE", "0")
        assert reuse.reusable(store, "deid/t", "s1", out) is None  # switched off
        monkeypatch.delenv("TWIN_REUSE")
        store.con.execute("INSERT INTO deid.t VALUES (99)")  # rows differ from the recorded
        assert reuse.reusable(store, "deid/t", "s1", out) is None
        store.con.execute("DELETE FROM deid.t WHERE i = 99")
        assert reuse.reusable(store, "deid/t", "s1", out) is not None
        reuse.forget(store, "deid/t")
        assert reuse.reusable(store, "deid/t", "s1", out) is None
        reuse.remember(store, "deid/t", "s1", out)
        assert reuse.reusable(store, "deid/t", "s1", out) == {"run_id": "run-1"}
    # Another run recorded a version of the table since: the stamp no longer vouches for it.
    with Store.open(twin_home, run_id="run-2") as store:
        table_versions(store, out)
        assert reuse.reusable(store, "deid/t", "s1", out) is None
        reuse.remember(store, "deid/t", "s1", out)  # what a reusing step does for its run
        assert reuse.reusable(store, "deid/t", "s1", out) == {"run_id": "run-2"}
        store.con.execute("DROP TABLE deid.t")
        assert reuse.reusable(store, "deid/t", "s1", out) is None
