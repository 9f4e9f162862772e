"""De-identification: ``harmonized.*`` → ``deid.*`` under ``policies/deid.yaml``.

Modules: :mod:`policy` (pydantic models, coverage, Safe Harbor map), :mod:`keyed` (HMAC
pseudonyms, per-patient date offsets and 2.25 UIDs, in Python and DuckDB SQL),
:mod:`structured` (one SQL statement per table), :mod:`text` (Presidio engine, batching, worker
pool), :mod:`recognizers` (clinical patterns and deny-lists), :mod:`surrogates`,
:mod:`context` (deny-lists from the store or FHIR files), :mod:`leaks` (the blocking leak check),
:mod:`evaluate` (span-level P/R/F2) and :mod:`peers` (stock Presidio, philter-lite).
"""
