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
(``Insert.from_json``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS, connection, connections, models, transaction
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class Table:
    """What an INSERT of a model's rows names: its table, columns (but the id) and id column, quoted."""

    fields: tuple[models.Field[Any, Any], ...]  # the inserted fields (ids come from the database)
    name: str  # the table
    columns: tuple[str, ...]  # the fields' columns, in the fields' order
    pk: str  # the primary key's column

    @classmethod
    def of(cls, model: type[models.Model]) -> Table:
        table = _tables.get(model)
        if table is None:
            table = _tables[model] = cls._described(model)
        return table

    @classmethod
    def _described(cls, model: type[models.Model]) -> Table:
        meta, quote = model._meta, connection.ops.quote_name
        fields = tuple(field for field in meta.concrete_fields if not field.primary_key)
        return cls(fields, quote(meta.db_table), tuple(quote(_column(f)) for f in fields), quote(_column(meta.pk)))

    @property
    def into(self) -> str:
        return f"{self.name} ({', '.join(self.columns)})"


# Described once per process, not for every INSERT (a run's creation makes three).
_tables: dict[type[models.Model], Table] = {}


@dataclass(frozen=True)
class Insert:
    rows: Sequence[models.Model]
    sql: str
    params: list[Any]
    later: dict[str, list[int]]  # a column given to ``execute``: its places in ``params``
    table: Table
    on_conflict: str = ""  # an ON CONFLICT clause (``update_on_conflict``)

    @classmethod
    def of(cls, rows: Sequence[models.Model], later: Collection[str] = (), on_conflict: str = "") -> Insert:
        """One INSERT of ``rows`` (unsaved, of one model); the ``later`` columns (attnames) are given to ``execute``.

        A single statement, so outside a transaction it is one of its own:
        no BEGIN and COMMIT round trips, as ``bulk_create`` makes.
        """
        table = Table.of(type(rows[0]))
        # The connection itself, not the thread-local proxy the fields would look it up through each time.
        db = connections[DEFAULT_DB_ALIAS]
        params: list[Any] = []
        places: dict[str, list[int]] = {name: [] for name in later}
        for row in rows:
            for field in table.fields:
                if field.attname in places:
                    places[field.attname].append(len(params))
                    params.append(None)
                else:
                    params.append(field.get_db_prep_save(field.pre_save(row, True), db))
        sql = _insert_sql(table, len(rows), on_conflict)
        return cls(rows, sql, params, places, table, on_conflict)

    def execute(self, **later: Any) -> None:
        """Insert the rows, with the ``later`` columns' values; each row gets its id, as saved rows have."""
        with connection.cursor() as cursor:
            cursor.execute(self.sql, self._params(later))
            ids = [pk for (pk,) in cursor.fetchall()]
        self._saved(ids, later)

    def from_json(self, sql_for: Mapping[str, str]) -> tuple[str, list[Any]]:
        """The INSERT with its rows as one JSON parameter, and the ``sql_for`` columns (attnames) as SQL.

        PostgreSQL only (``jsonb_populate_recordset``). Neither its text nor
        its number of parameters depends on the number of rows: psycopg
        parses it once per process (it parses anew every statement of over
        50 parameters, and a ``chain3`` run's rows were 98) and PostgreSQL
        prepares it once per connection, for runs of any shape; and one JSON
        text costs less to pass than a parameter per value. The rows come out
        in their order, so their ids do too.
        """
        if missing := set(self.later) - set(sql_for):
            raise ValueError(f"from_json takes no later values: give {sorted(missing)} as SQL")
        fields, width = self.table.fields, len(self.table.fields)
        given = [n for n, field in enumerate(fields) if field.attname not in sql_for]
        rows = [
            {_column(fields[n]): _json_value(self.params[row * width + n]) for n in given}
            for row in range(len(self.rows))
        ]
        select = ", ".join(
            sql_for.get(field.attname, column) for field, column in zip(fields, self.table.columns, strict=True)
        )
        records = f"jsonb_populate_recordset(NULL::{self.table.name}, %s::jsonb)"
        conflict = f" {self.on_conflict}" if self.on_conflict else ""
        sql = f"INSERT INTO {self.table.into} SELECT {select} FROM {records}{conflict} RETURNING {self.table.pk}"
        return sql, [json.dumps(rows, allow_nan=False)]

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
    parent_id_sql = f"(SELECT {parent.table.pk} FROM parent)"
    results = [parent_id_sql]
    for number, child in enumerate(children):
        sql, child_params = child.from_json(sql_for={link: parent_id_sql})
        ctes.append(f"child{number} AS ({sql})")
        params += child_params
        # A multi-row INSERT takes its ids from the sequence in the rows' order.
        results.append(f"ARRAY(SELECT {child.table.pk} FROM child{number} ORDER BY {child.table.pk})")
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


def _insert_sql(table: Table, rows: int, on_conflict: str) -> str:
    row = "(" + ", ".join(["%s"] * len(table.columns)) + ")"
    conflict = f" {on_conflict}" if on_conflict else ""
    return f"INSERT INTO {table.into} VALUES {', '.join([row] * rows)}{conflict} RETURNING {table.pk}"


def _json_value(param: Any) -> Any:
    """A column's value as ``from_json`` passes it: what PostgreSQL reads back as the value the ORM would store."""
    if isinstance(param, Jsonb):
        return param.obj  # a JSONField's (no encoder of its own here: as json.dumps gives it)
    if isinstance(param, datetime):
        return param.isoformat()  # with its offset, to the microsecond
    if isinstance(param, UUID):
        return str(param)
    return param


def _column(field: Any) -> str:
    return cast(str, field.column)  # a concrete field has one
