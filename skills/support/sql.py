"""``sql_query``: a read-only SQL query over allowed tables, its rows added to the ticket.

The query is checked by parsing it (sqlglot) and again by the database, on a read-only connection of
its own; ``:name`` parameters are always bound. The rules: docs/skills.md, "sql_query".
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlglot
from django.conf import settings
from django.db import connections
from sqlglot import exp

from skills.registry import SkillContext, SkillError, skill

from .ticket import Ticket, ticket_of

Params = dict[str, Any]
# Statements or clauses that change something, anywhere in the tree (a DELETE in a CTE, SELECT ... INTO).
WRITES = (exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter, exp.Command, exp.Into)
# Functions that read or change what is not in a table: files, settings, sequences, queries given as text.
DENIED_FUNCTION = re.compile(
    r"^(pg_|lo_|dblink|set_config|current_setting|nextval|setval|currval|lastval|txid_|query_to_|table_to_|"
    r"cursor_to_|schema_to_|database_to_|load_extension|readfile|writefile|fts3_tokenizer|edit$)",
    re.IGNORECASE,
)
SCALAR = (str, int, float, bool, type(None))
DIALECTS = {"postgresql": "postgres", "sqlite": "sqlite"}
PROGRESS_EVERY = 1000  # SQLite virtual machine instructions between two checks of the clock


@dataclass(frozen=True)
class Query:
    """A checked query: its text as given and the names of its ``:name`` parameters, in order of first use."""

    text: str
    dialect: str
    parameters: list[str]
    # (start, end) of each ``:name`` in ``text``, end exclusive, for drivers that spell parameters otherwise.
    spans: list[tuple[int, int, str]]
    # Names of its CTEs: SQLite's authorizer sees a read of each (of a recursive one, say).
    ctes: frozenset[str] = frozenset()


@skill(
    description="Runs one read-only SELECT (args.query, :name parameters from args.params or the ticket) "
    "over the allowed tables (SQL_QUERY_TABLES) and adds its result under args.into (default 'sql'): "
    "columns, rows (at most SQL_QUERY_MAX_ROWS), row_count, truncated.",
    soft_time_limit=15,
    time_limit=25,
    retries=2,
    backoff=1.0,
    backoff_max=10,
)
def sql_query(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    into = _into(ctx.args.get("into", "sql"))
    alias = settings.SQL_QUERY_DATABASE
    query = check_query(ctx.args.get("query"), dialect_of(alias), allowed_tables())
    params = parameters(query, ctx.args.get("params", {}), ticket)
    timeout = ctx.time_for_call(settings.SQL_QUERY_TIMEOUT)
    if timeout <= 0:
        raise SkillError("sql_query: no time left for the query", transient=False)
    result = run_query(alias, query, params, timeout, settings.SQL_QUERY_MAX_ROWS)
    return {**ticket, into: result}


def allowed_tables() -> list[str]:
    return [str(name).lower() for name in settings.SQL_QUERY_TABLES]


def dialect_of(alias: str) -> str:
    """The sqlglot dialect of a DATABASES alias; SkillError for a backend this skill does not run on."""
    if alias not in connections.settings:
        raise SkillError(f'sql_query: SQL_QUERY_DATABASE "{alias}" is not in DATABASES', transient=False)
    vendor = connections[alias].vendor
    if vendor not in DIALECTS:
        raise SkillError(f"sql_query: the {vendor} backend is not supported (PostgreSQL, SQLite)", transient=False)
    return DIALECTS[vendor]


# --- Checking the query -------------------------------------------------------


def check_query(text: Any, dialect: str, allowed: list[str]) -> Query:
    """The query, checked: one SELECT over ``allowed`` tables; SkillError(transient=False) naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise _refused("args.query must be the SQL text of a SELECT")
    tree = _one_statement(text, dialect)
    if not isinstance(tree, exp.Query):
        raise _refused(f"only SELECT (or WITH ... SELECT) is allowed, not {_kind(tree)}")
    for node in tree.walk():
        _check_node(node, allowed)
    ctes = frozenset(cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE))
    names = _parameter_names(tree)
    spans = _parameter_spans(text, dialect, names)
    return Query(text=text, dialect=dialect, parameters=names, spans=spans, ctes=ctes)


def _one_statement(text: str, dialect: str) -> exp.Expr:
    try:
        # A comment after the last ';' parses as a Semicolon: not a statement.
        trees = sqlglot.parse(text, read=dialect)
        statements = [tree for tree in trees if tree is not None and not isinstance(tree, exp.Semicolon)]
    except sqlglot.errors.SqlglotError as exc:
        raise _refused(f"the query does not parse: {_first_line(exc)}") from exc
    if len(statements) != 1:
        raise _refused(f"only one statement is allowed, got {len(statements)}")
    return statements[0]


def _check_node(node: exp.Expr, allowed: list[str]) -> None:
    if isinstance(node, WRITES):
        raise _refused(f"only SELECT is allowed: the query contains {_kind(node)}")
    if isinstance(node, exp.Select) and node.args.get("locks"):
        raise _refused("only SELECT is allowed: no FOR UPDATE/FOR SHARE")
    if isinstance(node, exp.Table):
        _check_table(node, allowed)
    if isinstance(node, exp.Func):
        name = _function_name(node)
        if DENIED_FUNCTION.match(name):
            raise _refused(f'the function "{name.lower()}" is not allowed')


def _check_table(table: exp.Table, allowed: list[str]) -> None:
    if not isinstance(table.this, exp.Identifier):  # a table function: generate_series(...), json_each(...)
        function = table.this
        name = function.name if isinstance(function, exp.Anonymous) else _function_name(function)
    else:
        name = ".".join(part.name for part in table.parts)
        if not table.db and _is_cte(table):
            return
    if name.lower() not in allowed:
        raise _refused(f'table "{name}" is not allowed (allowed: {", ".join(allowed)})')


def _function_name(node: exp.Expr) -> str:
    """A function's name as written (an unknown one's) or as sqlglot knows it (COUNT, GENERATE_SERIES)."""
    if isinstance(node, exp.Anonymous):
        return node.name
    return node.sql_name() if isinstance(node, exp.Func) else node.sql()


def _is_cte(table: exp.Table) -> bool:
    """Whether ``table`` names a CTE of a WITH that encloses it (its own, for a recursive one)."""
    ancestor = table.parent
    while ancestor is not None:
        with_ = ancestor.args.get("with_")
        if isinstance(with_, exp.With) and any(cte.alias_or_name == table.name for cte in with_.expressions):
            return True
        ancestor = ancestor.parent
    return False


def _parameter_names(tree: exp.Expr) -> list[str]:
    return list(dict.fromkeys(placeholder.name for placeholder in tree.find_all(exp.Placeholder) if placeholder.name))


def _parameter_spans(text: str, dialect: str, names: list[str]) -> list[tuple[int, int, str]]:
    """Where each ``:name`` of ``names`` is in the text: a ':' token right before the name's (never in a string).

    Only the parser's placeholders: a PostgreSQL slice ``a[1:n]`` stays as it is.
    """
    tokens = sqlglot.Dialect.get_or_raise(dialect).tokenize(text)
    spans = []
    for colon, name in itertools.pairwise(tokens):
        if colon.token_type.name == "COLON" and name.start == colon.end + 1 and name.text in names:
            spans.append((colon.start, name.end + 1, name.text))
    return spans


def parameters(query: Query, given: Any, ticket: Ticket) -> Params:
    """The value of each parameter of ``query``: from ``given`` (args.params), else the ticket's key of that name."""
    if not isinstance(given, dict):
        raise _refused("args.params must be an object of parameter values")
    unused = sorted(set(given) - set(query.parameters))
    if unused:
        raise _refused(f"args.params has {', '.join(unused)}, which the query does not use (write :{unused[0]})")
    values = {}
    for name in query.parameters:
        if name in given:
            value = given[name]
        elif name in ticket:
            value = ticket[name]
        else:
            raise _refused(f'parameter "{name}" has no value (in args.params or the ticket)')
        if not isinstance(value, SCALAR):
            raise _refused(f'parameter "{name}" must be a string, number, boolean or null, not {type(value).__name__}')
        values[name] = value
    return values


# --- Running it -----------------------------------------------------------------


def run_query(alias: str, query: Query, params: Params, timeout: float, max_rows: int) -> dict[str, Any]:
    """The query's first ``max_rows`` rows, JSON-safe, read on a read-only connection of its own."""
    runner = _run_on_sqlite if query.dialect == "sqlite" else _run_on_postgres
    columns, rows = runner(alias, query, params, timeout, max_rows + 1)
    return {
        "columns": columns,
        "rows": [[json_safe(value) for value in row] for row in rows[:max_rows]],
        "row_count": min(len(rows), max_rows),
        "truncated": len(rows) > max_rows,
    }


Rows = tuple[list[str], list[tuple[Any, ...]]]
Authorizer = Callable[[int, str | None, str | None, str | None, str | None], int]


def _run_on_postgres(alias: str, query: Query, params: Params, timeout: float, limit: int) -> Rows:
    import psycopg  # only where PostgreSQL is used

    wrapper = connections.create_connection(alias)
    try:
        connection = wrapper.get_new_connection(wrapper.get_connection_params())
    except psycopg.OperationalError as exc:
        raise SkillError(f"sql_query: the database cannot be reached: {_first_line(exc)}", transient=True) from exc
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION READ ONLY")
            cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
            cursor.execute(_pyformat(query), params)
            columns = [column.name for column in cursor.description or []]
            return columns, cursor.fetchmany(limit)
    except psycopg.errors.QueryCanceled as exc:
        raise _timed_out(timeout) from exc
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise _refused(f"only SELECT is allowed: {_first_line(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise SkillError(f"sql_query: the database failed: {_first_line(exc)}", transient=True) from exc
    except psycopg.Error as exc:
        raise _refused(f"the database refused the query: {_first_line(exc)}") from exc
    finally:
        connection.rollback()
        connection.close()


def _pyformat(query: Query) -> str:
    """The text with ``:name`` as ``%(name)s`` and every other ``%`` doubled, as psycopg reads it."""
    parts, done = [], 0
    for start, end, name in query.spans:
        parts += [query.text[done:start].replace("%", "%%"), f"%({name})s"]
        done = end
    return "".join([*parts, query.text[done:].replace("%", "%%")])


def _run_on_sqlite(alias: str, query: Query, params: Params, timeout: float, limit: int) -> Rows:
    denied: list[str] = []
    with _read_only_sqlite(alias, _authorizer(allowed_tables(), query.ctes, denied), timeout) as connection:
        try:
            cursor = connection.execute(query.text, params)
            columns = [column[0] for column in cursor.description or []]
            return columns, cursor.fetchmany(limit)
        except sqlite3.DatabaseError as exc:
            if denied:
                raise _refused(denied[0]) from exc
            if "interrupted" in str(exc):
                raise _timed_out(timeout) from exc
            transient = "locked" in str(exc) or "busy" in str(exc)
            raise SkillError(f"sql_query: the database refused the query: {exc}", transient=transient) from exc


@contextmanager
def _read_only_sqlite(alias: str, authorizer: Authorizer, timeout: float) -> Iterator[sqlite3.Connection]:
    uri = Path(str(connections[alias].settings_dict["NAME"])).resolve().as_uri() + "?mode=ro"
    try:
        # PARSE_DECLTYPES: Django's converters (registered with the sqlite3 module) give decimal and
        # datetime columns back as Decimal and datetime, as on PostgreSQL.
        connection = sqlite3.connect(uri, uri=True, timeout=timeout, detect_types=sqlite3.PARSE_DECLTYPES)
    except sqlite3.Error as exc:
        raise SkillError(f"sql_query: the database cannot be opened read-only: {exc}", transient=False) from exc
    try:
        connection.set_authorizer(authorizer)
        connection.set_progress_handler(_deadline_check(time.monotonic() + timeout), PROGRESS_EVERY)
        yield connection
    finally:
        connection.close()


def _authorizer(allowed: list[str], ctes: frozenset[str], denied: list[str]) -> Authorizer:
    """Allows reading the ``allowed`` tables (and the query's CTEs) and computing; records and denies the rest.

    A CTE's name is allowed only in a read with no database name, so it never opens a real table's columns.
    """
    harmless = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}

    def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
        if action in harmless:
            return sqlite3.SQLITE_OK
        table = (arg1 or "").lower()
        if action == sqlite3.SQLITE_READ and (table in allowed or (table in ctes and db is None)):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            denied.append(f'table "{arg1}" is not allowed (allowed: {", ".join(allowed)})')
        else:
            denied.append("only SELECT is allowed: the query would write or change the connection")
        return sqlite3.SQLITE_DENY

    return authorize


def _deadline_check(deadline: float) -> Callable[[], int]:
    def past_deadline() -> int:
        return 1 if time.monotonic() > deadline else 0  # non-zero interrupts the statement

    return past_deadline


# --- Values and errors ------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """A value as JSON: Decimal as a number (float), dates and times as ISO 8601 strings, bytes as hex."""
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else str(value)  # JSON has no NaN or Infinity
    if isinstance(value, datetime):
        if value.tzinfo is None and settings.USE_TZ:
            value = value.replace(tzinfo=UTC)  # Django keeps datetimes in UTC where the column has no zone
        return value.isoformat()
    if isinstance(value, date | time_of_day):
        return value.isoformat()
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    return value


def _into(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _refused(f"args.into must be the name of a ticket key, not {value!r}")
    return value


def _refused(message: str) -> SkillError:
    return SkillError(f"sql_query: {message}", transient=False)


def _timed_out(timeout: float) -> SkillError:
    return SkillError(f"sql_query: the query ran longer than its {timeout:.1f}s timeout", transient=False)


def _kind(node: exp.Expr) -> str:
    return type(node).__name__.upper()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
