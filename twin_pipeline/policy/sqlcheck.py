"""Parse, check and rewrite one user query (no database access here).

The rules, in order:

1. the text parses (sqlglot, duckdb dialect) into exactly one statement, and that statement is
   a read-only query: ``SELECT`` (including ``FROM``-first), ``UNION``/``INTERSECT``/``EXCEPT``,
   CTEs, subqueries;
2. no forbidden construct appears anywhere in the tree (DDL/DML, ``COPY``, ``ATTACH``,
   ``PRAGMA``, ``SET``, prepared-statement parameters, ``INTO``, time travel, ...);
3. no function outside the scalar/aggregate world is called: file and URL readers, catalog
   functions (``duckdb_*``, ``pragma_*``, ``pg_*``), ``query``/``query_table``, settings and
   variables, ``error``, ``stats``, sequences; the only table functions are ``range``,
   ``generate_series`` and ``unnest``;
4. every table reference is either a CTE of the query (renamed to a unique internal name, so a
   mis-scoped reference fails instead of reaching a real table) or resolves to a relation of
   the ``twin`` catalog that the role may read; it is replaced by a subquery that applies the
   role's row filters and column masks (built by the caller).

Any failure raises :class:`QueryDenied` naming the relation or construct refused.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from twin_pipeline.errors import AccessDenied

logging.getLogger("sqlglot").setLevel(logging.ERROR)

DIALECT = "duckdb"
CATALOG = "twin"
MAX_SQL_CHARS = 100_000
MIN_RECURSION_LIMIT = 8_000
RESERVED_PREFIX = "__"  # identifiers the gateway generates (CTE names, policy aliases)
CATALOG_SCHEMAS = frozenset({"information_schema", "pg_catalog"})
ALLOWED_TABLE_FUNCTIONS = (exp.GenerateSeries, exp.Unnest, exp.ExplodingGenerateSeries)

# Statement-level or nested constructs that never belong in a read-only query.
FORBIDDEN_NODES: dict[type[exp.Expr], str] = {
    exp.Command: "statement",
    exp.Create: "CREATE",
    exp.Drop: "DROP",
    exp.Insert: "INSERT",
    exp.Update: "UPDATE",
    exp.Delete: "DELETE",
    exp.Merge: "MERGE",
    exp.Copy: "COPY",
    exp.Attach: "ATTACH",
    exp.Detach: "DETACH",
    exp.Set: "SET",
    exp.SetItem: "SET",
    exp.Pragma: "PRAGMA",
    exp.Use: "USE",
    exp.Install: "INSTALL",
    exp.Describe: "DESCRIBE",
    exp.Summarize: "SUMMARIZE",
    exp.Show: "SHOW",
    exp.Alter: "ALTER",
    exp.Transaction: "BEGIN TRANSACTION",
    exp.Commit: "COMMIT",
    exp.Rollback: "ROLLBACK",
    exp.Into: "SELECT INTO",
    exp.Placeholder: "query parameter",
    exp.Parameter: "query parameter",
    exp.SessionParameter: "session parameter",
    exp.Lock: "FOR UPDATE/SHARE lock",
    exp.Export: "EXPORT",
    exp.TruncateTable: "TRUNCATE",
    exp.Cache: "CACHE",
    exp.Uncache: "UNCACHE",
    exp.LoadData: "LOAD",
    exp.Analyze: "ANALYZE",
}

_FORBIDDEN = tuple(FORBIDDEN_NODES)

# Functions refused by name (lower case), exactly or by prefix.
DENIED_FUNCTIONS = frozenset(
    {
        "getenv",
        "current_setting",
        "getvariable",
        "current_query",
        "query",
        "query_table",
        "glob",
        "sniff_csv",
        "stats",
        "error",
        "nextval",
        "currval",
        "setseed",
        "which_secret",
        "load_aws_credentials",
        "sql_auto_complete",
        "checkpoint",
        "force_checkpoint",
        "json_execute_serialized_sql",
        "json_serialize_sql",
        "json_deserialize_sql",
        "json_serialize_plan",
        "obj_description",
        "col_description",
        "shobj_description",
        "format_pg_type",
        "format_type",
        "to_regclass",
        "to_regtype",
        "current_schemas",
        "seq_scan",
        "index_scan",
        "test_all_types",
        "test_vector_types",
        "repeat_row",
        "summary",
        "enable_logging",
        "disable_logging",
        "truncate_duckdb_logs",
    }
)
DENIED_PREFIXES = (
    "read_",
    "duckdb_",
    "pragma_",
    "pg_",
    "has_",
    "parquet_",
    "iceberg_",
    "delta_",
    "sqlite_",
    "postgres_",
    "mysql_",
    "arrow_",
    "python_",
    "pandas_",
    "icu_",
    "__",
    "twin_",
)


class QueryDenied(AccessDenied):
    """A query is refused; ``construct`` names the relation or construct."""

    def __init__(self, message: str, *, construct: str, relations: Iterable[str] = ()):
        self.construct = construct
        self.relations = sorted(set(relations))
        super().__init__(message)


@dataclass
class Rewritten:
    sql: str  # what runs: every store relation replaced by its policy subquery
    relations: list[str] = field(default_factory=list)  # schema.table read, sorted
    cte_names: list[str] = field(default_factory=list)  # internal names given to CTEs


def function_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return node.sql_name().lower()


def function_denied(name: str) -> bool:
    name = name.lower().strip('"')
    return name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES)


def check_filter_sql(where: str) -> exp.Expr:
    """Parse a policy row filter (a boolean SQL expression); ValueError if it is not one."""
    try:
        node = sqlglot.parse_one(where, read=DIALECT)
    except (ParseError, TokenError) as exc:
        raise ValueError(f"not a SQL condition: {exc}") from exc
    if isinstance(node, exp.Query) or node.find(*FORBIDDEN_NODES):
        raise ValueError("a row filter must be a boolean expression")
    return node


def _parse_one(sql: str) -> exp.Expr:
    if len(sql) > MAX_SQL_CHARS:
        raise QueryDenied(f"query longer than {MAX_SQL_CHARS} characters", construct="length")
    try:
        statements = [s for s in sqlglot.parse(sql, read=DIALECT) if s is not None]
    except (ParseError, TokenError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        word = leading_keyword(sql)
        raise QueryDenied(
            f"the query could not be parsed as one SELECT (it starts with {word}): {first}",
            construct=word,
        ) from None
    if len(statements) != 1:
        raise QueryDenied(
            f"exactly one statement per query is allowed (found {len(statements)})",
            construct="multiple statements",
        )
    return statements[0]


def leading_keyword(sql: str) -> str:
    """The first word of ``sql`` after comments and whitespace, upper case (for messages)."""
    text = re.sub(r"(--[^\n]*\n?|/\*.*?\*/|\s+)", " ", sql, flags=re.S).strip()
    m = re.match(r"[A-Za-z_]+", text)
    return m.group(0).upper() if m else (text[:1] or "empty query")


def _check_root(root: exp.Expr, sql: str) -> None:
    node = root
    while isinstance(node, exp.Subquery):
        node = node.this
    if not isinstance(node, exp.Select | exp.SetOperation):
        what = FORBIDDEN_NODES.get(type(node))
        if isinstance(node, exp.Command):
            what = str(node.this).upper()
        what = what or leading_keyword(sql)
        raise QueryDenied(
            f"{what} is not allowed: only read-only SELECT queries", construct=str(what)
        )


def _check_nodes(root: exp.Expr) -> None:
    for node in root.walk():
        if isinstance(node, _FORBIDDEN):
            what = next(w for k, w in FORBIDDEN_NODES.items() if isinstance(node, k))
            raise QueryDenied(f"{what} is not allowed in a query", construct=what)
        if isinstance(node, exp.Identifier) and str(node.this).startswith(RESERVED_PREFIX):
            raise QueryDenied(
                f"identifier {node.this} is reserved (names starting with {RESERVED_PREFIX} "
                "belong to the gateway)",
                construct=str(node.this),
            )
        if isinstance(node, exp.Func):
            name = function_name(node)
            if function_denied(name):
                raise QueryDenied(f"function {name}() is not allowed", construct=f"{name}()")


class _Rewriter:
    def __init__(
        self,
        role_name: str,
        may_read: Callable[[str], bool],
        relations: Mapping[str, object],
        relation_query: Callable[[str], str],
        catalog_views: bool,
    ) -> None:
        self.role_name = role_name
        self.may_read = may_read
        self.relations = relations
        self.relation_query = relation_query
        self.catalog_views = catalog_views
        self.read: set[str] = set()
        self.nonce = secrets.token_hex(8)
        self.placeholders: dict[str, str] = {}  # quoted placeholder -> policy subquery SQL
        self.cte_names: list[str] = []
        self._counter = itertools.count(1)

    def deny(self, message: str, construct: str) -> QueryDenied:
        return QueryDenied(message, construct=construct, relations=self.read)

    # -- scope walk ---------------------------------------------------------------------------
    def visit(self, node: exp.Expr, ctes: dict[str, str]) -> None:
        with_ = node.args.get("with_")
        if isinstance(with_, exp.With):
            ctes = dict(ctes)
            recursive = bool(with_.args.get("recursive"))
            pending = [(c, self._unique(c.alias_or_name)) for c in with_.expressions]
            if recursive:  # every CTE of WITH RECURSIVE sees all of them
                for c, uniq in pending:
                    ctes[c.alias_or_name.lower()] = uniq
            for c, uniq in pending:
                self.visit(c.this, ctes)
                ctes[c.alias_or_name.lower()] = uniq
                alias = c.args.get("alias")
                if isinstance(alias, exp.TableAlias):
                    alias.set("this", exp.to_identifier(uniq))
        for child in list(node.iter_expressions()):
            if child is with_:
                continue
            self.visit(child, ctes)
        if isinstance(node, exp.Table):
            self.table(node, ctes)

    def _unique(self, name: str) -> str:
        uniq = f"__cte{next(self._counter)}_{name.lower()}"
        self.cte_names.append(uniq)
        return uniq

    # -- one table reference -------------------------------------------------------------------
    def table(self, node: exp.Table, ctes: dict[str, str]) -> None:
        target = node.this
        if not isinstance(target, exp.Identifier):
            if isinstance(target, ALLOWED_TABLE_FUNCTIONS):
                return
            if isinstance(target, exp.Func):
                name = function_name(target)
                raise self.deny(f"table function {name}() is not allowed", construct=f"{name}()")
            raise self.deny(
                f"table reference {node.sql(DIALECT)} is not allowed", construct=node.sql(DIALECT)
            )
        for arg in ("version", "when", "changes", "system_time"):
            if node.args.get(arg):
                raise self.deny(
                    "time travel (AT/VERSION) on a table is not allowed", construct="AT"
                )
        for arg in ("partition", "rows_from", "indexed", "hints"):
            if node.args.get(arg):
                raise self.deny(f"{arg.upper()} on a table is not allowed", construct=arg.upper())
        name = target.name.lower()
        schema = node.db.lower() if node.db else ""
        catalog = node.catalog.lower() if node.catalog else ""
        shown = ".".join(p for p in (catalog, schema, name) if p)
        if not schema and not catalog and name in ctes:
            if not node.alias:
                node.set("alias", exp.TableAlias(this=exp.to_identifier(target.name)))
            node.set("this", exp.to_identifier(ctes[name]))
            return
        if catalog and catalog != CATALOG:
            raise self.deny(
                f"catalog {catalog!r} is not allowed (relation {shown}); only the twin store",
                construct=shown,
            )
        if schema in CATALOG_SCHEMAS:
            if not self.catalog_views:
                raise self.deny(
                    f"catalog view {schema}.{name} is not readable by role {self.role_name}",
                    construct=f"{schema}.{name}",
                )
            self.read.add(f"{schema}.{name}")
            node.set("catalog", None)
            return
        relation = self.resolve(schema, name, shown)
        self.read.add(relation)
        # A placeholder with a per-query random name stands in for the policy subquery; it is
        # swapped for the subquery's SQL after generation (cheaper than splicing ASTs, and the
        # user cannot write the name because it does not exist until now).
        placeholder = f"__twin_rel_{self.nonce}_{len(self.placeholders) + 1}"
        self.placeholders[f'"{placeholder}"'] = self.relation_query(relation)
        if not isinstance(node.args.get("alias"), exp.TableAlias):
            node.set("alias", exp.TableAlias(this=exp.to_identifier(target.name)))
        node.set("this", exp.to_identifier(placeholder, quoted=True))
        node.set("db", None)
        node.set("catalog", None)

    def resolve(self, schema: str, name: str, shown: str) -> str:
        if schema:
            relation = f"{schema}.{name}"
            if not self.may_read(relation):
                raise self.deny(
                    f"relation {relation} is not readable by role {self.role_name}",
                    construct=relation,
                )
            if relation not in self.relations:
                raise self.deny(f"relation {relation} does not exist", construct=relation)
            return relation
        readable = [r for r in self.relations if r.split(".", 1)[1] == name and self.may_read(r)]
        if len(readable) == 1:
            return readable[0]
        if len(readable) > 1:
            raise self.deny(
                f"relation {name} is ambiguous ({', '.join(sorted(readable))}); "
                "qualify it with a schema",
                construct=name,
            )
        raise self.deny(
            f"relation {shown} does not exist or is not readable by role {self.role_name}",
            construct=shown,
        )


def rewrite(
    sql: str,
    *,
    role_name: str,
    may_read: Callable[[str], bool],
    relations: Mapping[str, object],
    relation_query: Callable[[str], str],
    catalog_views: bool = False,
) -> Rewritten:
    """Check ``sql`` and return the SQL to run; :class:`QueryDenied` if anything is refused.

    ``relations`` holds every ``schema.table`` of the store (lower case); ``relation_query``
    returns the policy subquery (SQL text of a SELECT) for one of them.
    """
    # sqlglot's recursive-descent parser spends ~20 Python frames per nesting level; give
    # ordinary nested queries room (Python 3.11+ frames do not grow the C stack). Deeper input
    # still ends in RecursionError, which the gateway turns into a denial.
    if sys.getrecursionlimit() < MIN_RECURSION_LIMIT:
        sys.setrecursionlimit(MIN_RECURSION_LIMIT)
    root = _parse_one(sql)
    _check_root(root, sql)
    _check_nodes(root)
    rw = _Rewriter(role_name, may_read, relations, relation_query, catalog_views)
    rw.visit(root, {})
    rewritten = {(r.split(".")[0], r.split(".")[1]) for r in rw.read if "." in r}
    # schema-qualified column references (deid.patient.x) now point at the subquery's alias
    for col in root.find_all(exp.Column):
        db = col.args.get("db")
        if db is not None and (str(col.db).lower(), str(col.table).lower()) in rewritten:
            col.set("db", None)
            col.set("catalog", None)
    out = root.sql(dialect=DIALECT, comments=False)
    for placeholder, policy_sql in rw.placeholders.items():
        if out.count(placeholder) != 1:  # pragma: no cover - would be a generator surprise
            raise QueryDenied("the query could not be rewritten safely", construct="rewrite")
        out = out.replace(placeholder, f"({policy_sql})")
    return Rewritten(
        sql=out,
        relations=sorted(rw.read),
        cte_names=rw.cte_names,
    )
