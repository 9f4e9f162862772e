"""De-identification assets: one ``deid/<table>`` per table of ``policies/deid.yaml``.

The asset list is built from the policy file (declarative): adding a table there adds an asset.
Each asset reads ``harmonized.<table>``, applies the policy (structured rules in SQL, free text
through the Presidio engine, DICOM Annex E actions) and writes ``deid.<table>`` with
``lineage_key`` and ``key_version``, inside ``governed_run`` so the activity record carries the
policy file hash and the key version (never the key). A harmonized column without a rule fails
the asset with an error naming ``table.column``; a harmonized table that does not exist yet is
skipped with metadata ``skipped: missing input``.
"""

import importlib
import pkgutil
from collections.abc import Iterator

import dagster as dg

from twin_pipeline import defs as defs_pkg
from twin_pipeline.defs.common import governed_run
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.deid.leaks import leak_check
from twin_pipeline.deid.policy import TableRule, load_policy
from twin_pipeline.deid.structured import deidentify_table
from twin_pipeline.errors import PolicyViolation


def _upstream_keys() -> set[dg.AssetKey]:
    """Asset keys other stages define (a dep on an undefined key would add a bare stub)."""
    keys: set[dg.AssetKey] = set()
    for mod in pkgutil.iter_modules(defs_pkg.__path__):
        if not mod.ispkg or mod.name in ("deid", "quality"):
            continue
        stage = getattr(importlib.import_module(f"{defs_pkg.__name__}.{mod.name}"), "defs", None)
        if isinstance(stage, dg.Definitions):
            for a in stage.assets or []:
                if isinstance(a, dg.AssetsDefinition):
                    keys.update(a.keys)
                elif isinstance(a, dg.AssetSpec):
                    keys.add(a.key)
    return keys


def _reads(table: str, rule: TableRule) -> list[str]:
    """Harmonized tables a deid asset reads: its own, the person lookup, and the deny-lists."""
    reads = [table]
    if rule.person is not None and rule.person.via_table:
        reads.append(rule.person.via_table)
    if any(c.action == "redact_text" for c in rule.columns.values()):
        # deny-lists: patients' own identifiers, and staff names from these tables
        # (deid.context.deny_index_from_store)
        reads += ["patient", "practitioner", "document_reference", "medication_request"]
    return list(dict.fromkeys(reads))


def _deid_asset(table: str, rule: TableRule, upstream: set[dg.AssetKey]) -> dg.AssetsDefinition:
    released, note = rule.release, rule.reason or ""
    reads = _reads(table, rule) if released else [table]
    what = (
        f"`harmonized.{table}` de-identified under policies/deid.yaml: person ids pseudonymized "
        "(keyed HMAC), dates shifted per patient, quasi-identifiers generalized, free text "
        "redacted with consistent surrogates; with lineage_key and key_version."
        if released
        else f"`harmonized.{table}` is withheld from researchers by policy ({note})."
    )

    @dg.asset(
        key=dg.AssetKey(["deid", table]),
        deps=[k for k in (dg.AssetKey(["harmonized", t]) for t in reads) if k in upstream],
        group_name="deid",
        kinds={"duckdb", "python"},
        owners=["team:privacy"],
        description=what,
        check_specs=[_leak_check_spec(table)] if released else None,
    )
    def _asset(
        context: dg.AssetExecutionContext, twin: TwinResource
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        policy = load_policy()
        check: dg.AssetCheckResult | None = None
        out = f"deid.{table}"
        with governed_run(context, twin, inputs=[f"harmonized.{t}" for t in reads]) as run:
            # Same inputs, policies, key and code as when deid.<table> was written: it is kept
            # (recorded again, unchanged), and so is the leak check it passed.
            kept = run.reuse(out) if released else None
            if kept is not None:
                check = _leak_result(**kept["leak"])
            else:
                try:
                    result = deidentify_table(run.store, policy, table)
                except PolicyViolation as exc:
                    raise dg.Failure(description=str(exc)) from exc
                if result.status == "written":
                    run.outputs(out)
                md = result.metadata()
                if result.status == "skipped":
                    md["skipped"] = result.reason or "missing input"
                run.meta(**md)
                if released:
                    # The leak check runs in this step, on this transaction's table (no second
                    # step, no second store open). The table is committed either way, as a
                    # separate check step found it; a failed check fails the step and so
                    # blocks everything downstream of deid.<table>.
                    rep = leak_check(run.store, policy, table)
                    check = _leak_result(rep.passed, rep.checked_columns, rep.hits)
                    if result.status == "written" and rep.passed:
                        leak = {"passed": True, "checked_columns": rep.checked_columns, "hits": []}
                        run.keep(out, saved={"leak": leak})
                    else:
                        run.forget()
        yield run.result()
        if check is not None:
            yield check

    return _asset
    return _asset


LEAK_CHECK = "no_raw_identifiers"


def _leak_check_spec(table: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        LEAK_CHECK,
        asset=dg.AssetKey(["deid", table]),
        blocking=True,
        description=f"deid.{table} holds no raw patient identifier (MRN, SSN, phone, email, "
        "address, name, patient id) verbatim, and its free text none of the row's own "
        "patient's; blocks anything downstream of a leaking table.",
    )


def _leak_result(passed: bool, checked_columns: int, hits: list[str]) -> dg.AssetCheckResult:
    """The ``deid/<table>:no_raw_identifiers`` evaluation, from a leak check made now or kept
    with a reused table."""
    return dg.AssetCheckResult(
        check_name=LEAK_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "checked_columns": checked_columns,
            "hits": len(hits),
            "where": dg.MetadataValue.json(hits[:20]),
        },
    )


def build_assets() -> list[dg.AssetsDefinition]:
    policy = load_policy()
    upstream = _upstream_keys()
    return [_deid_asset(name, rule, upstream) for name, rule in policy.tables.items()]


defs = dg.Definitions(assets=build_assets())
