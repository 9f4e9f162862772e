"""The one module that writes to the DuckDB twin store.

The store is an AES-GCM encrypted DuckDB database (key from ``TWIN_HOME/keys/store.key``),
attached as catalog ``twin`` on an in-memory connection. Every writer goes through
:class:`Store`; each asset run writes inside one transaction (:meth:`Store.transaction`), so a
crash leaves the store as it was before that asset began.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from twin_pipeline.errors import StoreError
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings

SCHEMA_VERSION = 5
# Ordered migrations: (version reached, what it does, SQL or a function of the store). A store
# records the version it is at in governance.store_meta; opening an older store applies the
# missing steps in one transaction. A store with no version (made before versioning) counts as
# version 0.
Migration = tuple[int, str, "str | Callable[[Store], None]"]


def _telemetry_keys_from_lines(store: Store) -> None:
    """Telemetry readings store the line number and the file's key prefix; ``position`` and
    ``lineage_key`` became virtual columns computed from them. Rows of an older store keep their
    keys and positions exactly (as the explicit ``position_text`` / ``lineage_key_text``)."""
    from twin_pipeline.harmonize.telemetry import READING, READING_TABLE_DDL
    from twin_pipeline.sources.telemetry import RAW_DDL, RAW_TABLE

    for table, ddl in ((RAW_TABLE, RAW_DDL), (READING, READING_TABLE_DDL)):
        if not store.table_exists(table):
            continue
        cols = [c for c, _ in store.columns(table)]
        if "lineage_key_text" in cols:
            continue
        schema, name = table.split(".")
        old = f"{schema}._{name}_v2"
        store.con.execute(f"ALTER TABLE {table} RENAME TO _{name}_v2")
        store.con.execute(ddl)
        keep = [c for c in cols if c not in ("lineage_key", "position")]
        store.con.execute(
            f"INSERT INTO {table} BY NAME SELECT {', '.join(keep)}, "
            f"position AS position_text, lineage_key AS lineage_key_text FROM {old}"
        )
        store.con.execute(f"DROP TABLE {old}")


def _content_hash_scheme(store: Store) -> None:
    """Record which content-hash scheme the store's tables are hashed with. A store that has
    table versions recorded keeps ``v1`` (its ledger, PROV documents and snapshots name those
    hashes, and ``twin lineage trace`` compares against them); any other store hashes with
    ``v2``, the same order-independent digest of a cheaper row serialization."""
    store.con.execute(
        "INSERT OR IGNORE INTO governance.store_meta VALUES ('content_hash_scheme', ?)",
        ["v1" if _has_recorded_versions(store) else "v2"],
    )


def _content_hash_v3(store: Store) -> None:
    """A store with nothing recorded yet (a new one) hashes with ``v3``; any other keeps the
    scheme its ledger names (``v1`` or ``v2``)."""
    if _has_recorded_versions(store):
        return
    store.con.execute(
        "UPDATE governance.store_meta SET value = 'v3' WHERE key = 'content_hash_scheme' "
        "AND value = 'v2'"
    )


def _has_recorded_versions(store: Store) -> bool:
    return any(
        store.table_exists(t)
        and store.con.execute(f"SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT 1)").fetchone()
        != (0,)
        for t in ("governance.table_version", "governance.prov_activity", "governance.ledger")
    )


MIGRATIONS: tuple[Migration, ...] = (
    (1, "governance layout: store_meta, source_file, quarantine, run", ""),
    (
        2,
        "record applied migrations in governance.schema_migration",
        "CREATE TABLE IF NOT EXISTS governance.schema_migration ("
        "version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMPTZ)",
    ),
    (
        3,
        "telemetry readings: lineage_key and position computed from file key prefix and line",
        _telemetry_keys_from_lines,
    ),
    (
        4,
        "content hashes: scheme recorded (v2 for a store with no table versions yet)",
        _content_hash_scheme,
    ),
    (
        5,
        "content hashes: v3, per source file (for a store with no table versions yet)",
        _content_hash_v3,
    ),
)
SCHEMAS = ("raw", "harmonized", "deid", "governance", "twin")
CATALOG = "twin"
# Store.compact: DuckDB's row group size, the schemas compacted after a run, and the bounds.
ROW_GROUP_ROWS = 122_880
COMPACT_SCHEMAS = SCHEMAS
COMPACT_MIN_ROW_GROUPS = 32
# A larger keyed table is not rewritten (its rows would be copied every run); none is that large
# at 10,000 patients, but a ledger of years of audited queries could be.
COMPACT_MAX_ROWS = 2_000_000
# Content hash v3: tables with this column are hashed per source file, and the digests of
# files whose rows did not change are remembered here (Store._hash_by_file).
GROUP_COLUMN = "source_file"
GROUP_HASH_TABLE = "governance.content_hash_group"
GROUP_HASH_DDL = f"""
CREATE TABLE IF NOT EXISTS {GROUP_HASH_TABLE} (
    table_name VARCHAR,
    signature VARCHAR,      -- digest of the hashed columns and types (a new column: all again)
    grp VARCHAR,            -- the source_file value
    row_count BIGINT,
    checksum VARCHAR,       -- sum of DuckDB hash() of the rows: what says a file is unchanged
    digest VARCHAR          -- sha256 of the file's rows' md5 digests, sorted
)
"""
# Columns that differ between two runs over the same data; left out of content hashes.
VOLATILE_COLUMNS = frozenset({"run_id", "activity_id", "loaded_at", "created_at", "updated_at"})

GOVERNANCE_DDL = """
CREATE TABLE IF NOT EXISTS governance.store_meta (
    key VARCHAR PRIMARY KEY, value VARCHAR
);
CREATE TABLE IF NOT EXISTS governance.source_file (
    path VARCHAR PRIMARY KEY,      -- path relative to the landing folder
    abs_path VARCHAR,
    kind VARCHAR,
    sha256 VARCHAR,
    size_bytes BIGINT,
    records_in BIGINT,
    records_loaded BIGINT,
    records_quarantined BIGINT,
    first_seen TIMESTAMPTZ,
    run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS governance.quarantine (
    quarantine_id VARCHAR,
    run_id VARCHAR,
    stage VARCHAR,                 -- read | harmonize | quality | deid
    table_name VARCHAR,            -- target table (schema.table) or source kind
    source_kind VARCHAR,
    source_file VARCHAR,
    position VARCHAR,              -- line:N, entry:N, file, row:N
    rule VARCHAR,                  -- short machine name of what failed
    reason VARCHAR,                -- human-readable, names file and record
    payload VARCHAR,               -- the raw record as received (text)
    lineage_key VARCHAR,
    created_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS governance.run (
    run_id VARCHAR PRIMARY KEY,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    landing VARCHAR,
    user_name VARCHAR,
    role VARCHAR,
    status VARCHAR,
    summary VARCHAR
);
"""


def _keyring_store_key(settings: Settings) -> str:
    return KeyRing(settings.keys_dir).store_key()


def httpfs_extension_path() -> Path:
    """The httpfs extension file shipped by the ``duckdb-ext-httpfs`` wheel."""
    import duckdb_ext  # type: ignore[import-not-found]

    roots = [Path(p) for p in duckdb_ext.__path__]
    for root in roots:
        hits = sorted(root.glob(f"extensions/v{duckdb.__version__}/*/httpfs.duckdb_extension"))
        if hits:
            return hits[0]
    raise StoreError(
        f"duckdb-ext-httpfs for duckdb {duckdb.__version__} is not installed; "
        "it is needed to read and write the encrypted store"
    )


DEFAULT_MEMORY_LIMIT = "1GB"


#: The time zone of every store connection (see :func:`configure_connection`).
STORE_TIMEZONE = "UTC"


def memory_limit() -> str:
    """DuckDB's buffer-pool cap for a connection of this process (``TWIN_MEMORY_LIMIT``)."""
    return os.environ.get("TWIN_MEMORY_LIMIT", DEFAULT_MEMORY_LIMIT).replace("'", "")


def configure_connection(con: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    """Time zone, memory cap and spill location of a store connection.

    The time zone is UTC for the connection and every cursor made from it, whatever the
    machine's: DuckDB otherwise takes the process's zone (``TZ``) for each session, and a
    ``TIMESTAMPTZ`` cast to a date or a local timestamp cast to an instant gave another
    table on a machine in another zone (the scanners' "as-of day", the imaging studies'
    series times). Code that reads times in another zone sets it for its own statements
    (the telemetry reader, for timestamps without an offset) and puts it back.

    DuckDB would otherwise take 80% of the machine's memory and spill into ``./.tmp`` of the
    working directory in plain text. Spill files go to ``TWIN_HOME/spill`` (created private)
    and are encrypted, as the store is. ``TWIN_MEMORY_LIMIT`` (default 1GB) bounds DuckDB's
    buffer pool per process, so a 10k-patient run stays within a laptop's memory."""
    con.execute(f"SET GLOBAL TimeZone = '{STORE_TIMEZONE}'")
    spill = settings.spill_dir
    spill.mkdir(mode=0o700, exist_ok=True)
    limit = memory_limit()
    con.execute(f"SET temp_directory = '{str(spill).replace(chr(39), chr(39) * 2)}'")
    con.execute("SET temp_file_encryption = true")
    con.execute(f"SET memory_limit = '{limit}'")
    from twin_pipeline.memory import configure_duckdb

    configure_duckdb(con)  # freed DuckDB memory goes back to the OS between steps (issue #11)


def waiting_dir(path: Path) -> Path:
    """Where processes waiting for the store file ``path`` say so (one file per waiter), so a
    pipeline run that keeps the store between its steps (:func:`hold_between_steps`) lets
    them in at its next step boundary."""
    return path.with_name(path.name + ".waiting")


def _attach_waiting(con: duckdb.DuckDBPyConnection, sql: str, path: Path | None = None) -> None:
    """ATTACH, waiting while another process holds the store's write lock (a pipeline step).

    Each asset holds the store only for its own transaction, so readers get in between steps and
    see the last committed state. ``TWIN_LOCK_TIMEOUT`` seconds (default 120) bound the wait.
    While waiting, a file in :func:`waiting_dir` (named by pid and thread) tells a run that
    keeps the store between steps to let go of it.
    """
    deadline = time.monotonic() + float(os.environ.get("TWIN_LOCK_TIMEOUT", "120"))
    marker: Path | None = None
    try:
        while True:
            try:
                con.execute(sql)
                return
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    if "lock" in str(exc).lower():
                        raise StoreError(
                            "store is busy: another process (a pipeline run) holds it; "
                            "try again later or raise TWIN_LOCK_TIMEOUT"
                        ) from exc
                    raise
                if marker is None and path is not None:
                    marker = _mark_waiting(path)
                time.sleep(0.05)
    finally:
        if marker is not None:
            with contextlib.suppress(OSError):
                marker.unlink()


def _mark_waiting(path: Path) -> Path | None:
    folder = waiting_dir(path)
    marker = folder / f"{os.getpid()}-{threading.get_native_id()}"
    try:
        folder.mkdir(exist_ok=True)
        marker.touch()
    except OSError:  # a read-only home: the run lets go at its end, as before
        return None
    return marker


def _someone_waiting(path: Path) -> bool:
    """Whether a live process waits for the store file ``path`` (markers of dead processes,
    left by a kill, are removed)."""
    try:
        entries = list(os.scandir(waiting_dir(path)))
    except OSError:
        return False
    for entry in entries:
        try:
            pid = int(entry.name.split("-", 1)[0])
            if pid != os.getpid():
                os.kill(pid, 0)
            return True
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        except (ValueError, PermissionError):
            return True
    return False


def _attach(con: duckdb.DuckDBPyConnection, path: Path, key: str, read_only: bool) -> None:
    ro = ", READ_ONLY" if read_only else ""
    try:
        _attach_waiting(con, f"ATTACH '{path}' AS {CATALOG} (ENCRYPTION_KEY '{key}'{ro})", path)
        con.execute(f"USE {CATALOG}")
    except duckdb.Error as exc:
        msg = str(exc).split("\n")[0]
        if "encrypt" in msg.lower() or "key" in msg.lower():
            msg = f"cannot open store (wrong or missing store key?): {msg}"
        raise StoreError(msg, path=str(path)) from exc


@dataclass
class _SharedEntry:
    base: duckdb.DuckDBPyConnection
    refs: int = 0
    read_only: bool = False
    attached: bool = False


class _SharedConnection:
    """One in-memory DuckDB per store file and process, httpfs loaded once (it costs ~0.4 s).

    The store file is attached while at least one :class:`Store` uses it and detached when the
    last one closes, so the file lock is still held only while an asset (or a query) works and
    other processes get in between. Each Store gets its own cursor (its own transaction).

    Within :func:`hold_between_steps` (a pipeline run) the file stays attached when the last
    Store closes, unless another process waits for it (:func:`waiting_dir`): re-attaching for
    every step re-read and decrypted the catalog and the governance tables each step touches,
    and detaching checkpointed (~30-50 ms a step together). A waiting reader gets in at the
    next step boundary, as before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Path, _SharedEntry] = {}
        self._held: dict[Path, int] = {}
        self._pid = 0

    def acquire(
        self, settings: Settings, key: str, read_only: bool
    ) -> duckdb.DuckDBPyConnection | None:
        """A cursor on the shared connection with ``path`` attached, or None to go private."""
        if os.environ.get("TWIN_SHARED_CONNECTION", "1") == "0":
            return None
        with self._lock:
            self._check_pid()
            path = settings.store_path
            entry = self._entries.get(path)
            if entry is None:
                self._evict_idle(keep=1)
                base = duckdb.connect(":memory:")
                base.execute(f"LOAD '{httpfs_extension_path()}'")
                configure_connection(base, settings)
                entry = self._entries[path] = _SharedEntry(base)
            if entry.refs == 0 and entry.attached and entry.read_only and not read_only:
                self._detach(entry)  # kept read-only: a writer needs it attached read-write
            if not entry.attached:
                _attach(entry.base, path, key, read_only)
                entry.read_only, entry.attached = read_only, True
            elif entry.read_only and not read_only:
                return None
            entry.refs += 1
            cur = entry.base.cursor()
            cur.execute(f"USE {CATALOG}")
            return cur

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked child: never reuse the parent's handles
            self._entries, self._held, self._pid = {}, {}, os.getpid()

    def _evict_idle(self, keep: int) -> None:
        """Close all but ``keep`` idle per-file connections (a test run opens many stores)."""
        idle = [p for p, e in self._entries.items() if e.refs == 0]
        for p in idle[: max(0, len(idle) - keep)]:
            with contextlib.suppress(duckdb.Error):
                self._entries[p].base.close()
            del self._entries[p]

    @staticmethod
    def _detach(entry: _SharedEntry) -> None:
        entry.attached = False
        with contextlib.suppress(duckdb.Error):
            entry.base.execute("USE memory")
            entry.base.execute(f"DETACH {CATALOG}")

    def release(self, path: Path) -> None:
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs <= 0:
                entry.refs = 0
                if not self._held.get(path) or _someone_waiting(path):
                    self._detach(entry)
                else:
                    _trim_cache(entry.base)

    def hold(self, path: Path) -> None:
        with self._lock:
            self._check_pid()
            self._held[path] = self._held.get(path, 0) + 1

    def unhold(self, path: Path) -> None:
        with self._lock:
            self._check_pid()
            n = self._held.get(path, 0) - 1
            if n > 0:
                self._held[path] = n
                return
            self._held.pop(path, None)
            entry = self._entries.get(path)
            if entry is not None and entry.refs == 0 and entry.attached:
                self._detach(entry)

    def attached(self, path: Path) -> bool:
        """Whether this process has the store file ``path`` attached now."""
        with self._lock:
            entry = self._entries.get(path)
            return entry is not None and entry.attached and self._pid == os.getpid()


_SHARED = _SharedConnection()
# What a store kept attached between steps may keep cached (MB). Detaching dropped the whole
# buffer pool after every step; kept, what a big step read would stay resident through the next
# steps (up to TWIN_MEMORY_LIMIT) beside their own Python memory.
HELD_CACHE_MB = 64


def _trim_cache(base: duckdb.DuckDBPyConnection) -> None:
    """Evict the buffer pool of ``base`` down to :data:`HELD_CACHE_MB` (lowering the memory
    limit evicts the least recently used blocks; it is set back at once). ~1 ms when there is
    nothing to evict."""
    with contextlib.suppress(duckdb.Error):
        row = base.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()
        if not (row and row[0] and int(row[0]) > HELD_CACHE_MB << 20):
            return
        try:
            base.execute(f"SET memory_limit = '{HELD_CACHE_MB}MB'")
        finally:
            base.execute(f"SET memory_limit = '{memory_limit()}'")


@contextlib.contextmanager
def hold_between_steps(settings: Settings) -> Iterator[None]:
    """Keep the store attached in this process between the Stores opened inside (the steps of
    one pipeline run), letting go whenever another process waits for it, and at the end."""
    path = settings.store_path
    _SHARED.hold(path)
    try:
        yield
    finally:
        _SHARED.unhold(path)


# store files this process has brought to SCHEMA_VERSION (Store.ensure_schema)
_ENSURED: set[Path] = set()


@dataclass
class QuarantineRow:
    stage: str
    table_name: str
    source_kind: str
    source_file: str
    position: str
    rule: str
    reason: str
    payload: str | None = None
    lineage_key: str | None = None


def quarantine_id(row: QuarantineRow) -> str:
    h = hashlib.sha256(
        "\x1f".join([row.stage, row.table_name, row.source_file, row.position, row.rule]).encode()
    )
    return h.hexdigest()[:24]


def lineage_key(file_sha256: str, position: str, record_hash: str) -> str:
    """Deterministic key of one source record: stable across reruns and machines."""
    return hashlib.sha256(f"{file_sha256}|{position}|{record_hash}".encode()).hexdigest()[:32]


def position_lineage_key(file_sha256: str, position: str) -> str:
    """Key of a record named by its position in one file version (telemetry lines): the file's
    sha256 prefix and the position, cheap to build per row in SQL. The record's bytes are
    covered by the file's sha256; a trace re-reads and hashes them when it needs them."""
    return f"{file_sha256[:20]}/{position}"


#: Rows up to which a content hash reads a table through a copy (:func:`_scan_source`). The
#: copy costs memory while the hash runs: 1.86 M telemetry rows (a 10k-patient hospital) took
#: the process from 337 to 988 MB RSS (direct: 480 MB), for 1.85 s instead of 2.49 s.
HASH_COPY_MAX_ROWS = 2_000_000


def _scan_source(
    fq: str, columns: Sequence[tuple[str, str]], rows: int, where: str = ""
) -> tuple[str, str]:
    """(``WITH`` clause, relation) for a content hash to read the ``rows`` rows of ``fq``
    from.

    Rows a transaction wrote itself (a step hashing the table it just built, before the commit
    that records it) are scanned on one thread (duckdb/duckdb#18074); so is all the per-row
    work in the same pipeline (the row's JSON text, its md5). Copying the rows first (a
    materialized CTE: the copy is cheap) lets that work run on every thread: ~30% less time
    for 1.9M telemetry rows on two cores, and the same for committed rows. Not for a table
    with a ``JSON`` column (the FHIR payloads: the copy would hold them all in memory), nor
    for one of more than :data:`HASH_COPY_MAX_ROWS` rows."""
    names = ", ".join(f'"{c}"' for c, _ in columns)
    if rows > HASH_COPY_MAX_ROWS or any(t == "JSON" for _, t in columns):
        return "", f"{fq} {where}".rstrip()
    return f"WITH __rows AS MATERIALIZED (SELECT {names} FROM {fq} {where}) ", "__rows"


def fully_qualified(qualified: str) -> str:
    """``schema.table`` with the catalog in front: ``twin.node`` alone is ambiguous, because the
    catalog and one of its schemas are both named ``twin``."""
    return f"{CATALOG}.{qualified}" if qualified.count(".") == 1 else qualified


#: The name under which :func:`execute_over` shows its batch to the statement.
BATCH = "_twin_arrow_batch"


def sql_literal(text: str) -> str:
    """``text`` as a SQL string literal (quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def execute_over(con: duckdb.DuckDBPyConnection, sql: str, batch: Any) -> None:
    """Run ``sql``, which reads ``batch`` (a pyarrow table or a DataFrame) as ``_twin_arrow_batch``.

    Not ``register``/``unregister``: DuckDB versions its catalog, so a view registered and
    dropped inside a transaction keeps its Python object, every buffer of the batch, alive
    until the transaction ends. The FHIR reader's inserts kept ~680 MB of Arrow memory alive
    in the 10k-patient ``raw/fhir`` step that way (issue #11). DuckDB's replacement scan of a
    local variable holds the batch only while the statement runs. A connection with external
    access off (the query gateway's) has no replacement scans: there the batch is registered."""
    _twin_arrow_batch = batch  # read by name by DuckDB's replacement scan
    try:
        con.execute(sql)
    except duckdb.CatalogException as exc:
        if BATCH not in str(exc):
            raise
        con.register(BATCH, batch)
        try:
            con.execute(sql)
        finally:
            con.unregister(BATCH)


def _quoted(qualified: str) -> str | None:
    """``schema.table`` as a quoted name in the store catalog (None when not ``schema.table``)."""
    schema, _, name = qualified.partition(".")
    if not schema or not name:
        return None
    return ".".join('"' + p.replace('"', '""') + '"' for p in (CATALOG, schema, name))


@dataclass
class TableStatus:
    rows: int
    hash: str


@dataclass
class Store:
    """Handle on the twin store. Open with :meth:`open`; use as a context manager."""

    settings: Settings
    con: duckdb.DuckDBPyConnection
    read_only: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _tx_depth: int = 0
    _shared: bool = False
    _closed: bool = False
    # (seq, hash) of the last ledger entry this handle committed (twin_pipeline.ledger)
    _ledger_head: tuple[int, str] | None = None

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        settings: Settings | None = None,
        *,
        read_only: bool = False,
        run_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        private: bool = False,
    ) -> Store:
        """Open the store. ``private`` (or any ``config``) gives a connection of its own, not
        the process-wide one: needed by anything that changes connection settings (the query
        gateway locks its configuration)."""
        settings = (settings or Settings.from_env()).ensure()
        key = _keyring_store_key(settings)
        if read_only and not settings.store_path.exists():
            raise StoreError("no store yet: run `twin run` first", path=str(settings.store_path))
        shared = None if (config or private) else _SHARED.acquire(settings, key, read_only)
        if shared is not None:
            store = cls(settings=settings, con=shared, read_only=read_only)
            store._shared = True
        else:
            con = duckdb.connect(":memory:", config=dict(config or {}))
            try:
                con.execute(f"LOAD '{httpfs_extension_path()}'")
                configure_connection(con, settings)
                _attach(con, settings.store_path, key, read_only)
            except BaseException:
                con.close()
                raise
            store = cls(settings=settings, con=con, read_only=read_only)
        if run_id:
            store.run_id = run_id
        if not read_only:
            try:
                store.ensure_schema()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.con.close()
        if self._shared:
            _SHARED.release(self.settings.store_path)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ------------------------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Create the schemas and governance tables; migrate an older store to this version.

        Every asset step opens the store; once this process has brought a store file to this
        version, a later open only reads the recorded version (one query, not ten). A store
        file created anew since then has no version recorded and takes the full path."""
        path = self.settings.store_path
        if path in _ENSURED:
            try:
                row = self.con.execute(
                    "SELECT value FROM governance.store_meta WHERE key = 'schema_version'"
                ).fetchone()
            except duckdb.CatalogException:
                row = None
            if row is not None and row[0] == str(SCHEMA_VERSION):
                return
            _ENSURED.discard(path)
        with self.transaction():
            had_meta = self.table_exists("governance.store_meta")
            for schema in SCHEMAS:
                self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            self.con.execute(GOVERNANCE_DDL)
            current = self.con.execute(
                "SELECT value FROM governance.store_meta WHERE key = 'schema_version'"
            ).fetchone()
            fresh = not had_meta and not self.tables(("raw", "harmonized", "deid", "twin"))
            version = int(current[0]) if current else (SCHEMA_VERSION if fresh else 0)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store schema version {version} is newer than this twin-pipeline "
                    f"({SCHEMA_VERSION}); upgrade twin-pipeline to open it",
                    path=str(self.settings.store_path),
                )
            steps = [m for m in MIGRATIONS if m[0] > version or fresh]
            now = datetime.now(UTC)
            for _, _, step in steps:
                if callable(step):
                    step(self)
                elif step:
                    self.con.execute(step)
            for to_version, description, _ in steps:
                self.con.execute(
                    "INSERT OR REPLACE INTO governance.schema_migration VALUES (?, ?, ?)",
                    [to_version, description, now],
                )
            self.con.execute(
                "INSERT OR REPLACE INTO governance.store_meta VALUES ('schema_version', ?)",
                [str(SCHEMA_VERSION)],
            )
        _ENSURED.add(path)

    def schema_version(self) -> int:
        row = self.con.execute(
            "SELECT value FROM governance.store_meta WHERE key = 'schema_version'"
        ).fetchone()
        return int(row[0]) if row else 0

    # -- transactions ------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One atomic unit of writes; rolled back on any exception. Nested calls join the outer."""
        if self._tx_depth:
            self._tx_depth += 1
            try:
                yield self.con
            finally:
                self._tx_depth -= 1
            return
        self._tx_depth = 1
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self._tx_depth = 0
            with contextlib.suppress(duckdb.Error):
                self.con.execute("ROLLBACK")
            raise
        else:
            self._tx_depth = 0
            self.con.execute("COMMIT")

    @contextlib.contextmanager
    def unordered(self) -> Iterator[None]:
        """Let DuckDB write the result of a statement in any row order (both threads write at
        once). For appends whose order means nothing: every value a row needs (a line number
        from a row offset, say) must be computed inside the statement."""
        self.con.execute("SET preserve_insertion_order = false")
        try:
            yield
        finally:
            self.con.execute("SET preserve_insertion_order = true")

    # -- helpers used by every stage -------------------------------------------------------
    def table_exists(self, qualified: str) -> bool:
        """Whether the store has this table. A probe of the table itself: listing
        ``duckdb_tables()`` builds every table's row (its CREATE statement among them) and cost
        ~2 ms a call, ~570 calls a run. The store catalog holds tables only, no views; a missing
        table is a catalog error, which leaves an open transaction usable."""
        name = _quoted(qualified)
        if name is None:
            return False
        try:
            self.con.execute(f"SELECT 1 FROM {name} LIMIT 0")
        except duckdb.CatalogException:
            return False
        return True

    def tables(self, schemas: Sequence[str] = SCHEMAS) -> list[str]:
        rows = self.con.execute(
            "SELECT schema_name || '.' || table_name FROM duckdb_tables() "
            "WHERE database_name = ? ORDER BY 1",
            [CATALOG],
        ).fetchall()
        return [r[0] for r in rows if r[0].split(".")[0] in schemas]

    def columns(self, qualified: str) -> list[tuple[str, str]]:
        """(name, type) of each column in order; [] when there is no such table. ``DESCRIBE``
        gives the types ``duckdb_columns()`` does, at a fifth of its cost."""
        name = _quoted(qualified)
        if name is None:
            return []
        try:
            rows = self.con.execute(f"DESCRIBE {name}").fetchall()
        except duckdb.CatalogException:
            return []
        return [(str(r[0]), str(r[1])) for r in rows]

    def insert_values(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        *,
        columns: Sequence[str] = (),
        or_replace: bool = False,
    ) -> None:
        """Append a few Python rows (into ``columns``, else every column in order) in one
        multi-row statement (DuckDB's ``executemany`` runs one INSERT per row, ~3 ms each on
        the store). For many rows use :meth:`insert_arrow`."""
        if not rows:
            return
        width = len(rows[0])
        marks = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(rows))
        verb = "INSERT OR REPLACE" if or_replace else "INSERT"
        names = f" ({', '.join(columns)})" if columns else ""
        self.con.execute(f"{verb} INTO {table}{names} VALUES {marks}", [v for r in rows for v in r])

    def insert_arrow(
        self, table: str, batch: Any, *, or_replace: bool = False, by_name: bool = False
    ) -> None:
        """Append a pyarrow table whose columns match ``table`` (in order, or ``by_name``) in one
        statement (``executemany`` would run one INSERT per row: slow, and ``INSERT OR REPLACE``
        into a keyed table keeps an index delta per row in the transaction's memory)."""
        verb = "INSERT OR REPLACE" if or_replace else "INSERT"
        names = " BY NAME" if by_name else ""
        execute_over(self.con, f"{verb} INTO {table}{names} SELECT * FROM {BATCH}", batch)

    def create_table_as(self, table: str, query: str, *, plain: Collection[str] = ()) -> None:
        """``CREATE OR REPLACE TABLE table AS query``, the columns named in ``plain`` stored
        uncompressed.

        DuckDB's string compression (dictionary/FSST) analyses every value when it writes; for
        a column whose values are nearly all distinct digests or keys (lineage_key,
        record_hash, a resource's own id) it saves about half the bytes for about twice the
        write CPU. ``harmonized.fhir_resource`` at 10,000 patients (620k rows): 1.27 -> 0.6 s.
        Values, and so content hashes, are the same either way."""
        cols = self.con.execute(f"DESCRIBE {query}").fetchall()
        ddl = ", ".join(
            '"'
            + str(c).replace('"', '""')
            + f'" {t}'
            + (" USING COMPRESSION uncompressed" if c in plain else "")
            for c, t, *_ in cols
        )
        self.con.execute(f"DROP TABLE IF EXISTS {table}")
        self.con.execute(f"CREATE TABLE {table} ({ddl})")
        self.con.execute(f"INSERT INTO {table} {query}")

    def quarantine(self, rows: Iterable[QuarantineRow]) -> int:
        """Append quarantined records (idempotent on stage/table/file/position/rule)."""
        now = datetime.now(UTC)
        data = [
            (
                quarantine_id(r),
                self.run_id,
                r.stage,
                r.table_name,
                r.source_kind,
                r.source_file,
                r.position,
                r.rule,
                r.reason,
                r.payload,
                r.lineage_key,
                now,
            )
            for r in rows
        ]
        if not data:
            return 0
        ids = [d[0] for d in data]
        # ids as a relation (a hash semi-join) and multi-row INSERTs: list_contains compares
        # every stored row with every id, and DuckDB's executemany runs one INSERT per row.
        self.con.execute(
            "DELETE FROM governance.quarantine WHERE quarantine_id IN "
            "(SELECT unnest(?::VARCHAR[]))",
            [ids],
        )
        for start in range(0, len(data), 500):
            chunk = data[start : start + 500]
            marks = ", ".join(["(?,?,?,?,?,?,?,?,?,?,?,?)"] * len(chunk))
            self.con.execute(
                f"INSERT INTO governance.quarantine VALUES {marks}", [v for d in chunk for v in d]
            )
        return len(data)

    def clear_quarantine(self, stage: str, table_name: str) -> None:
        """Drop quarantine rows a full rebuild of ``table_name`` at ``stage`` will re-create."""
        self.con.execute(
            "DELETE FROM governance.quarantine WHERE stage = ? AND table_name = ?",
            [stage, table_name],
        )

    def content_hash_scheme(self) -> str:
        """``v1``, ``v2`` or ``v3`` (see :meth:`content_hash`); a store from before schemes were
        recorded hashes with ``v1``."""
        try:
            row = self.con.execute(
                "SELECT value FROM governance.store_meta WHERE key = 'content_hash_scheme'"
            ).fetchone()
        except duckdb.CatalogException:
            row = None
        return str(row[0]) if row else "v1"

    def content_hash(self, qualified: str, *, verify: bool = False) -> str:
        """Order-independent hash of a table's content, volatile columns left out: sha256 of the
        rows' md5 digests (hex), sorted and concatenated. A row's text is, in schemes ``v2`` and
        ``v3``, its values as one JSON array (``json_array``: strings escaped, NULL as null, so
        two different rows never give the same text) and, in scheme ``v1`` (older stores, whose
        ledgers name these hashes), ``CAST(row(...) AS VARCHAR)``, which costs about twice as
        much (32 -> 20 s over a 10k-patient store).

        ``v3`` (every store made since schema version 5) hashes a table with a ``source_file``
        column per source file: each file's rows give a digest as above, and the table's hash
        is the sha256 of those digests, sorted and concatenated. Appending one file to a table
        of millions of rows then re-digests that file's rows only (:meth:`_hash_by_file`); a
        table without that column is hashed as in ``v2``. ``verify`` recomputes every file's
        digest from the rows (audits and traces: the remembered digests are not trusted)."""
        columns = [(c, t) for c, t in self.columns(qualified) if c not in VOLATILE_COLUMNS]
        if not columns:
            return hashlib.sha256(b"").hexdigest()
        import numpy as np
        import pyarrow as pa

        scheme = self.content_hash_scheme()
        if scheme == "v1":
            text = "CAST(row({}) AS VARCHAR)".format(", ".join(f'"{c}"' for c, _ in columns))
        else:  # a JSON column's text is kept as it is (json_array would re-serialize it)
            text = "CAST(json_array({}) AS VARCHAR)".format(
                ", ".join(
                    f'CAST("{c}" AS VARCHAR)' if t == "JSON" else f'"{c}"' for c, t in columns
                )
            )
        if scheme == "v3" and any(c == GROUP_COLUMN for c, _ in columns):
            return self._hash_by_file(qualified, columns, text, verify=verify)
        # The sorted digests stream to Arrow and are hashed here: the same value as DuckDB's
        # sha256(string_agg(h, '' ORDER BY h)) (tested), ~20% less time at 10k patients, as
        # the ordered aggregate runs on one thread.
        with_rows, src = _scan_source(
            fully_qualified(qualified), columns, self.row_count(qualified)
        )
        reader = self.con.execute(
            f"{with_rows}SELECT md5({text}) AS h FROM {src} ORDER BY h"
        ).fetch_record_batch(1 << 20)
        digest = hashlib.sha256()
        for batch in reader:
            col = batch.column(0)
            wide = pa.types.is_large_string(col.type)
            offsets = np.frombuffer(col.buffers()[1], np.int64 if wide else np.int32)
            lo, hi = offsets[col.offset], offsets[col.offset + len(col)]
            digest.update(memoryview(col.buffers()[2])[lo:hi])  # type: ignore[arg-type]
        return digest.hexdigest()

    def _hash_by_file(
        self, qualified: str, columns: list[tuple[str, str]], text: str, *, verify: bool
    ) -> str:
        """``v3`` for a table with a ``source_file`` column (see :meth:`content_hash`).

        ``governance.content_hash_group`` remembers each file's digest with its row count and a
        cheap checksum of its rows (the sum of DuckDB's 64-bit ``hash`` of each row: one pass
        over the table, ~0.2 s for 1.9M readings where digesting them takes ~1.7 s). Files
        whose count or checksum changed, or that are new, are digested again; the others'
        digests are reused. The checksum only decides what to re-digest: the hash itself is
        always made of md5/sha256 digests, and ``verify`` ignores what is remembered."""
        fq = fully_qualified(qualified)
        names = ", ".join(f'"{c}"' for c, _ in columns)
        signature = hashlib.sha256(json.dumps(columns).encode()).hexdigest()[:16]
        group = f'"{GROUP_COLUMN}"'
        checksum = f"count(*), CAST(sum(hash({names})::HUGEINT) AS VARCHAR)"
        digest = "sha256(string_agg(h, '' ORDER BY h))"
        known: dict[str | None, tuple[int, str, str]] = {}
        if not verify and self.table_exists(GROUP_HASH_TABLE):
            known = {
                g: (int(n), str(ck), str(d))
                for g, n, ck, d in self.con.execute(
                    f"SELECT grp, row_count, checksum, digest FROM {GROUP_HASH_TABLE} "
                    "WHERE table_name = ? AND signature = ?",
                    [qualified, signature],
                ).fetchall()
            }
        if not known:  # nothing to reuse (a table just built): one pass does it all
            with_rows, src = _scan_source(fq, columns, self.row_count(qualified))
            rows = self.con.execute(
                f"{with_rows}SELECT g, {checksum}, {digest} FROM (SELECT {group} AS g, "
                f"md5({text}) AS h, {names} FROM {src}) GROUP BY g"
            ).fetchall()
            current = {g: (int(n), str(ck)) for g, n, ck, _ in rows}
            digests = fresh = {g: str(d) for g, _, _, d in rows}
        else:
            current = {
                g: (int(n), str(ck))
                for g, n, ck in self.con.execute(
                    f"SELECT {group}, {checksum} FROM {fq} GROUP BY 1"
                ).fetchall()
            }
            digests = {
                g: known[g][2] for g, v in current.items() if g in known and known[g][:2] == v
            }
            todo = [g for g in current if g not in digests]
            fresh = {}
            if todo:
                where = f"WHERE {group} IN (SELECT unnest(?::VARCHAR[]))"
                where += f" OR {group} IS NULL" if None in todo else ""
                with_rows, src = _scan_source(fq, columns, self.row_count(qualified), where)
                fresh = dict(
                    self.con.execute(
                        f"{with_rows}SELECT g, {digest} FROM (SELECT {group} AS g, md5({text}) "
                        f"AS h FROM {src}) GROUP BY g",
                        [[g for g in todo if g is not None]],
                    ).fetchall()
                )
                digests.update(fresh)
        # (verify: what it recomputed replaces what was kept; files gone are forgotten)
        if (fresh or set(known) - set(current)) and not self.read_only:
            self._remember_groups(qualified, signature, current, fresh)
        return hashlib.sha256("".join(sorted(digests.values())).encode()).hexdigest()

    def _remember_groups(
        self,
        qualified: str,
        signature: str,
        current: dict[Any, tuple[int, str]],
        fresh: dict[Any, str],
    ) -> None:
        """Remember the digests in ``fresh`` (replacing what was remembered for those files) and
        forget the files ``qualified`` no longer has."""
        import pyarrow as pa

        self.con.execute(GROUP_HASH_DDL)
        if len(fresh) == len(current):  # every file digested now: replace them all
            self.con.execute(f"DELETE FROM {GROUP_HASH_TABLE} WHERE table_name = ?", [qualified])
        else:
            keep = [g for g in current if g not in fresh]  # remembered digests still valid
            self.con.execute(
                f"DELETE FROM {GROUP_HASH_TABLE} WHERE table_name = ? AND (signature <> ? OR "
                "grp IS NULL AND NOT ? OR grp NOT IN (SELECT unnest(?::VARCHAR[])))",
                [qualified, signature, None in keep, [g for g in keep if g is not None]],
            )
        batch = pa.table(
            {
                "grp": pa.array(list(fresh), pa.string()),
                "row_count": pa.array([current[g][0] for g in fresh], pa.int64()),
                "checksum": pa.array([current[g][1] for g in fresh], pa.string()),
                "digest": pa.array(list(fresh.values()), pa.string()),
            }
        )
        execute_over(
            self.con,
            f"INSERT INTO {GROUP_HASH_TABLE} SELECT {sql_literal(qualified)}, "
            f"{sql_literal(signature)}, grp, row_count, checksum, digest FROM {BATCH}",
            batch,
        )

    def row_count(self, qualified: str) -> int:
        row = self.con.execute(f"SELECT count(*) FROM {fully_qualified(qualified)}").fetchone()
        return int(row[0]) if row else 0

    def compact(
        self,
        schemas: Sequence[str] = COMPACT_SCHEMAS,
        *,
        min_row_groups: int = COMPACT_MIN_ROW_GROUPS,
        only: Collection[str] | None = None,
    ) -> dict[str, tuple[int, int]]:
        """Rewrite the keyed tables of ``schemas`` that small commits have split into many row
        groups; returns ``{table: (row groups before, after)}`` for those rewritten.

        In DuckDB 1.4 every committed append to a checkpointed table with a PRIMARY KEY starts
        a row group of its own, in a block of its own (256 KB), and nothing merges them later
        (``VACUUM`` does not, nor does deleting and re-inserting the rows). A step commits one
        ledger entry and one PROV activity, and each store close checkpointed (before a run
        kept the store between its steps): a home that had run eleven times on an empty
        landing held 383 MB for ~3,000 governance rows, and every step had slowed by ~0.4 s. A keyed table is rewritten when it has at least
        ``min_row_groups`` row groups averaging under ``ROW_GROUP_ROWS / 60`` rows: renamed,
        created again from its own DDL (``duckdb_tables().sql``: columns, defaults,
        constraints), refilled in its stored order and the old one dropped, in one
        transaction. Tables with generated columns are left alone, and so would be any with a
        forced compression (the DDL text does not keep it; no keyed table has one). The rows,
        their order and every content hash stay the same; the freed blocks are reused by later
        writes, so the file stops growing. ``only``: just these tables (``schema.table``)."""
        names = ", ".join(f"'{s}'" for s in schemas)
        found = self.con.execute(
            f"SELECT schema_name, table_name, sql, estimated_size FROM duckdb_tables() "
            f"WHERE database_name = '{CATALOG}' AND schema_name IN ({names}) ORDER BY 1, 2"
        ).fetchall()
        done: dict[str, tuple[int, int]] = {}
        for schema, table, ddl, rows_hint in found:
            qualified = f"{schema}.{table}"
            if only is not None and qualified not in only:
                continue
            text = ddl.upper()
            keyed = "PRIMARY KEY" in text or "UNIQUE" in text
            if not keyed or "GENERATED" in text or "USING COMPRESSION" in text:
                continue
            if int(rows_hint or 0) > COMPACT_MAX_ROWS:
                continue
            groups = self._row_groups(qualified)
            rows = self.row_count(qualified)
            if groups < min_row_groups or rows >= groups * (ROW_GROUP_ROWS // 60):
                continue
            old = f"{table}__compacting"
            name, old_name = _quoted(qualified), _quoted(f"{schema}.{old}")
            assert name is not None and old_name is not None
            with self.transaction() as con:
                con.execute(f'ALTER TABLE {name} RENAME TO "{old}"')
                con.execute(ddl)  # names its schema: "CREATE TABLE governance.ledger(...)"
                con.execute(f"INSERT INTO {name} SELECT * FROM {old_name}")
                con.execute(f"DROP TABLE {old_name}")
            done[qualified] = (groups, self._row_groups(qualified))
        return done

    def _row_groups(self, qualified: str) -> int:
        row = self.con.execute(
            "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info(?)",
            [fully_qualified(qualified)],
        ).fetchone()
        return int(row[0]) if row else 0

    def status(self, known: Mapping[str, tuple[int, str]] | None = None) -> dict[str, Any]:
        """The ``twin status --json`` document. ``known``: table -> (rows, content hash)
        versions to report instead of hashing, for tables whose row count still matches."""
        tables: dict[str, dict[str, Any]] = {}
        for t in self.tables():
            rows = self.row_count(t)
            version = (known or {}).get(t)
            digest = version[1] if version and version[0] == rows else self.content_hash(t)
            tables[t] = {"rows": rows, "hash": digest}
        q_rows = self.con.execute(
            "SELECT stage, table_name, count(*) FROM governance.quarantine GROUP BY ALL ORDER BY 1, 2"
        ).fetchall()
        by_stage: dict[str, int] = {}
        by_table: dict[str, int] = {}
        for stage, table, n in q_rows:
            by_stage[stage] = by_stage.get(stage, 0) + int(n)
            by_table[table] = by_table.get(table, 0) + int(n)
        return {
            "store": str(self.settings.store_path),
            "schema_version": self.schema_version(),
            "tables": tables,
            "quarantine": {
                "total": sum(by_stage.values()),
                "by_stage": by_stage,
                "by_table": by_table,
            },
        }

    def record_run(self, run_id: str, **fields: Any) -> None:
        cols = ["run_id", *fields]
        vals = [run_id, *(json.dumps(v) if isinstance(v, dict) else v for v in fields.values())]
        updates = ", ".join(f"{c} = excluded.{c}" for c in fields)
        self.con.execute(
            f"INSERT INTO governance.run ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT (run_id) DO UPDATE SET {updates}",
            vals,
        )
