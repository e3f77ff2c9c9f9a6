"""INSERT statements built before the transaction that runs them.

Django builds an INSERT's SQL and parameters while the transaction runs it.
On SQLite a transaction holds the database's one write lock from its start
(BEGIN IMMEDIATE, settings) to its end, and every step transition of every
worker waits for that lock: building a new run's rows took most of the time
the web held it (docs/performance.md). ``Insert.of`` builds them beforehand,
with the models' defaults and field conversions as ``bulk_create`` applies
them; ``Insert.execute`` runs the one statement and gives the rows their ids.

``insert_family`` inserts a row with rows that refer to it; on PostgreSQL
in one statement (a data-modifying WITH), not a transaction of one INSERT
each: a new run's creation was seven round trips, it is three
(docs/performance.md). Its text is the same for runs of any shape
(``columnwise``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from django.db import DEFAULT_DB_ALIAS, connection, connections, models, transaction


@dataclass(frozen=True)
class Insert:
    rows: Sequence[models.Model]
    sql: str
    params: list[Any]
    later: dict[str, list[int]]  # a column given to ``execute``: its places in ``params``
    columns: tuple[str, ...]  # the inserted columns' attnames, in the statement's order
    into: str  # the statement's table and columns, quoted: "table" ("a", "b")
    pk: str  # the primary key's column, quoted
    types: tuple[str, ...]  # the inserted columns' database types, in the statement's order
    on_conflict: str = ""  # an ON CONFLICT clause (``update_on_conflict``)

    @classmethod
    def of(cls, rows: Sequence[models.Model], later: Collection[str] = (), on_conflict: str = "") -> Insert:
        """One INSERT of ``rows`` (unsaved, of one model); the ``later`` columns (attnames) are given to ``execute``.

        A single statement, so outside a transaction it is one of its own:
        no BEGIN and COMMIT round trips, as ``bulk_create`` makes.
        """
        meta = type(rows[0])._meta
        fields = [field for field in meta.concrete_fields if not field.primary_key]  # ids come from the database
        # The connection itself, not the thread-local proxy the fields would look it up through each time.
        db = connections[DEFAULT_DB_ALIAS]
        quote = db.ops.quote_name
        params: list[Any] = []
        places: dict[str, list[int]] = {name: [] for name in later}
        for row in rows:
            for field in fields:
                if field.attname in places:
                    places[field.attname].append(len(params))
                    params.append(None)
                else:
                    params.append(field.get_db_prep_save(field.pre_save(row, True), db))
        columns = tuple(field.attname for field in fields)
        into = f"{quote(meta.db_table)} ({', '.join(quote(_column(field)) for field in fields)})"
        pk = quote(_column(meta.pk))
        types = tuple(cast(str, field.db_type(db)) for field in fields)
        sql = _insert_sql(into, columns, len(rows), pk, on_conflict)
        return cls(rows, sql, params, places, columns, into, pk, types, on_conflict)

    def execute(self, **later: Any) -> None:
        """Insert the rows, with the ``later`` columns' values; each row gets its id, as saved rows have."""
        with connection.cursor() as cursor:
            cursor.execute(self.sql, self._params(later))
            ids = [pk for (pk,) in cursor.fetchall()]
        self._saved(ids, later)

    def columnwise(self, later: Mapping[str, Any], sql_for: Mapping[str, str]) -> tuple[str, list[Any]]:
        """The INSERT and its parameters, with the ``later`` columns' values and the ``sql_for`` columns as SQL.

        PostgreSQL's form: an array per column (``unnest``), not a VALUES row
        per row, so neither its text nor its number of parameters depends on
        the number of rows: psycopg parses it once per process (it parses anew every
        statement of over 50 parameters, and a ``chain3`` run's rows were 98)
        and PostgreSQL prepares it once per connection, for runs of any shape.
        Rows come out of ``unnest`` in their order, so their ids are too.
        """
        params, width = self._params(later), len(self.columns)
        given = [n for n, column in enumerate(self.columns) if column not in sql_for]
        arrays = [[params[row * width + n] for row in range(len(self.rows))] for n in given]
        select = ", ".join(sql_for.get(column, f"c{n}") for n, column in enumerate(self.columns))
        unnest = ", ".join(f"%s::{self.types[n]}[]" for n in given)
        names = ", ".join(f"c{n}" for n in given)
        conflict = f" {self.on_conflict}" if self.on_conflict else ""
        sql = f"INSERT INTO {self.into} SELECT {select} FROM unnest({unnest}) AS given({names}){conflict}"
        return f"{sql} RETURNING {self.pk}", arrays

    def _params(self, later: Mapping[str, Any]) -> list[Any]:
        params = list(self.params)
        for name, value in later.items():
            for place in self.later[name]:
                params[place] = value
        return params

    def _saved(self, ids: Sequence[Any], later: Mapping[str, Any]) -> None:
        """Give the rows the ``later`` values and their ids (in the rows' order, as bulk_create relies on too)."""
        for name, value in later.items():
            for row in self.rows:
                setattr(row, name, value)
        for row, pk in zip(self.rows, ids, strict=True):
            row.pk = pk
            row._state.adding = False
            row._state.db = connection.alias


def insert_family(parent: Insert, children: Sequence[Insert], link: str, **later: Any) -> None:
    """Insert ``parent``'s one row and ``children``' rows, whose ``link`` column is the parent's id.

    On PostgreSQL one statement, atomic on its own; elsewhere an INSERT
    each, in a transaction. ``later``: the parent's ``later`` columns.
    """
    if connection.vendor != "postgresql":
        with transaction.atomic(savepoint=False):  # nothing catches an error here and goes on
            parent.execute(**later)
            for child in children:
                child.execute(**{link: parent.rows[0].pk})
        return
    sql, params = parent.sql, parent._params(later)
    ctes = [f"parent AS ({sql})"]
    parent_id_sql = f"(SELECT {parent.pk} FROM parent)"
    results = [parent_id_sql]
    for number, child in enumerate(children):
        sql, child_params = child.columnwise({}, sql_for={link: parent_id_sql})
        ctes.append(f"child{number} AS ({sql})")
        params += child_params
        # A multi-row INSERT takes its ids from the sequence in the rows' order.
        results.append(f"ARRAY(SELECT {child.pk} FROM child{number} ORDER BY {child.pk})")
    with connection.cursor() as cursor:
        cursor.execute(f"WITH {', '.join(ctes)} SELECT {', '.join(results)}", params)
        parent_id, *children_ids = cursor.fetchone()
    parent._saved([parent_id], later)
    for child, ids in zip(children, children_ids, strict=True):
        child._saved(ids, {link: parent_id})


def update_on_conflict(model: type[models.Model], unique: Sequence[str], update: Sequence[str]) -> str:
    """ON CONFLICT on the ``unique`` fields: update the ``update`` fields to the new row's (PostgreSQL and SQLite)."""
    quote = connection.ops.quote_name
    meta = model._meta
    targets = ", ".join(quote(_column(meta.get_field(name))) for name in unique)
    columns = [quote(_column(meta.get_field(name))) for name in update]
    return f"ON CONFLICT ({targets}) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in columns)


def _insert_sql(into: str, columns: Sequence[str], rows: int, pk: str, on_conflict: str) -> str:
    row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    conflict = f" {on_conflict}" if on_conflict else ""
    return f"INSERT INTO {into} VALUES {', '.join([row] * rows)}{conflict} RETURNING {pk}"


def _column(field: Any) -> str:
    return cast(str, field.column)  # a concrete field has one
