"""The governed wrapper every asset uses: one transaction, an activity record, and metadata.

    @dg.asset(key=["harmonized", "patient"], deps=[["raw", "fhir"]], ...)
    def patient(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
        with governed_run(context, twin, inputs=["raw.fhir_resource"]) as run:
            build_patient_table(run.store)              # library code, writes harmonized.patient
            run.outputs("harmonized.patient")
            run.meta(quarantined=3)
        return run.result()

Everything inside the ``with`` block commits together with the activity record, or not at all.
"""

import contextlib
import functools
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from twin_pipeline.activity import (
    ActivityRecord,
    TableVersion,
    code_version,
    input_versions,
    key_versions,
    policy_versions,
    record_activity,
    table_versions,
)
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.memory import release as release_memory
from twin_pipeline.procs import cpu_seconds
from twin_pipeline.store import Store


@dataclass
class GovernedRun:
    store: Store
    record: ActivityRecord
    _outputs: list[str] = field(default_factory=list)
    _meta: dict[str, Any] = field(default_factory=dict)
    _result: dg.MaterializeResult | None = None
    _unchanged: set[str] = field(default_factory=set)
    _stamp: str = ""

    def outputs(self, *tables: str, changed: bool = True) -> None:
        """Tables this step wrote. ``changed=False``: the step left them as they were (a raw
        step with no new file), so their version recorded by the last writer is reused when
        the row count still matches, instead of hashing the table again (~5 s for the 1.86M
        readings of a 10k hospital)."""
        self._outputs.extend(tables)
        if changed:
            self._unchanged.difference_update(tables)
        else:
            self._unchanged.update(tables)

    def meta(self, **values: Any) -> None:
        self._meta.update(values)

    def reuse(
        self,
        *tables: str,
        extra: dict[str, Any] | None = None,
        accept: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any] | None:
        """Keep ``tables`` as this step last wrote them when nothing it depends on changed
        (:mod:`twin_pipeline.reuse`: the recorded versions of its inputs, policies, specs,
        pseudonym key, code, and ``extra``). Then they are recorded again, unchanged, with
        metadata ``reused``/``reused_from_run``, and what :meth:`keep` saved is returned (the
        step reports it instead of working); else None, and the step does its work and calls
        :meth:`keep` when its result may be reused. ``accept(saved)`` false (a file the step
        made outside the store is gone) means the work is done again."""
        from twin_pipeline.reuse import remember, reusable, step_stamp

        rec = self.record
        # The versions in force, read once: the stamp uses them and record_activity keeps them.
        if not rec.policy_versions:
            rec.policy_versions = policy_versions()
        if not rec.key_versions:
            rec.key_versions = key_versions(self.store.settings.keys_dir)
        self._stamp = step_stamp(
            self.store,
            rec.input_versions,
            extra,
            policies=rec.policy_versions,
            keys=rec.key_versions,
        )
        kept = reusable(self.store, rec.asset_key, self._stamp, tables)
        saved = {k: v for k, v in (kept or {}).items() if k != "run_id"}
        if kept is None or (accept is not None and not accept(saved)):
            self.meta(reused=False)
            return None
        self.outputs(*tables, changed=False)
        remember(self.store, self.record.asset_key, self._stamp, tables, saved)
        self.meta(reused=True, reused_from_run=kept["run_id"])
        return saved

    def keep(self, *tables: str, saved: dict[str, Any] | None = None) -> None:
        """After :meth:`reuse` returned None and the step wrote ``tables``: a later run with
        the same stamp may keep them (``saved``: what it must report again, JSON)."""
        from twin_pipeline.reuse import remember

        assert self._stamp, "keep() follows reuse()"
        remember(self.store, self.record.asset_key, self._stamp, tables, saved)

    def forget(self) -> None:
        """This step's tables are not a result to reuse (a failed check, nothing written)."""
        from twin_pipeline.reuse import forget

        forget(self.store, self.record.asset_key)

    def source_files(self, files: Sequence[dict[str, Any]]) -> None:
        self.record.source_files.extend(files)

    def result(self) -> dg.MaterializeResult:
        assert self._result is not None, "result() is available after the with-block"
        return self._result


def launcher(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, twin: TwinResource
) -> tuple[str, str]:
    """Who launched this run and their role, checked against ``policies/``.

    ``twin run`` tags its runs with ``twin/user``; a run launched from the Dagster UI without
    that tag is the UI's user (``TWIN_USER`` of the process serving it). Either way the user's
    role must allow pipeline runs, so a researcher's launch fails at its first asset, before
    anything is read or written."""
    run = context.op_execution_context.run
    tags = run.tags if run is not None else {}
    user = tags.get("twin/user") or twin.user
    return user, _authorized_role(user, _policy_stamp())


def _policy_stamp() -> tuple[float, float]:
    from twin_pipeline.paths import POLICIES_DIR

    roles, users = POLICIES_DIR / "roles.yaml", POLICIES_DIR / "users.yaml"
    return roles.stat().st_mtime, users.stat().st_mtime


@functools.lru_cache(maxsize=64)
def _authorized_role(user: str, stamp: tuple[float, float]) -> str:
    from twin_pipeline.policy import authorize_pipeline_run

    role: str = authorize_pipeline_run(user)
    return role


@contextlib.contextmanager
def governed_run(
    context: dg.AssetExecutionContext,
    twin: TwinResource,
    *,
    inputs: Sequence[str] = (),
    params: dict[str, Any] | None = None,
) -> Iterator[GovernedRun]:
    user, role = launcher(context, twin)
    store = twin.open_store(run_id=context.run_id)
    asset_key = context.asset_key.to_user_string()
    record = ActivityRecord(
        activity_id=f"{context.run_id}:{asset_key}:{uuid.uuid4().hex[:8]}",
        run_id=context.run_id,
        asset_key=asset_key,
        started_at=datetime.now(UTC).isoformat(),
        ended_at="",
        user=user,
        role=role,
        inputs=list(inputs),
        params=dict(params or {}),
        code_version=code_version(),
        informed_by=[k.to_user_string() for k in context.assets_def.dependency_keys],
    )
    run = GovernedRun(store, record)
    cpu0 = cpu_seconds()
    try:
        with store.transaction():
            record.input_versions = input_versions(store, inputs)
            yield run
            outs = table_versions(store, run._outputs, unchanged=run._unchanged)
            record.outputs = outs
            record.ended_at = datetime.now(UTC).isoformat()
            record_activity(store, record)  # + its PROV fragment, same transaction as the data
        # CPU the step cost (its worker pools included): wall time alone misleads on a machine
        # shared with other work, and the benchmark compares CPU too.
        cpu = {"cpu_s": dg.MetadataValue.float(round(cpu_seconds() - cpu0, 3))}
        run._result = dg.MaterializeResult(metadata={**_metadata(outs, run._meta), **cpu})
    finally:
        store.close()
        release_memory()  # what the step freed goes back to the OS before the next one


def _metadata(outs: list[TableVersion], extra: dict[str, Any]) -> dict[str, Any]:
    md: dict[str, Any] = {}
    for tv in outs:
        prefix = "" if len(outs) == 1 else f"{tv.table}."
        md[f"{prefix}rows"] = dg.MetadataValue.int(tv.rows)
        md[f"{prefix}content_hash"] = dg.MetadataValue.text(tv.content_hash)
    md.update(extra)
    return md
