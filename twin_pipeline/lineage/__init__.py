"""W3C PROV lineage of the twin: built from the ledger's activity records, signed per run.

- :mod:`.prov_build` turns activity records into a PROV document (entities for source files,
  table versions, validation results, policy and key versions; activities; agents).
- :mod:`.storage` signs and stores one bundle per run in ``governance.prov_bundle``.
- :mod:`.serialize` is the registry of export formats (json, provn, ttl, xml).
- :mod:`.trace` follows a row's ``lineage_key`` back to the source file bytes.
- :mod:`.report` renders the self-contained auditor page; :mod:`.openlineage` emits run events.
"""
