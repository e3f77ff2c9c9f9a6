"""INSERT statements built before the transaction that runs them.

Django builds an INSERT's SQL and parameters while the transaction runs it.
On SQLite a transaction holds the database's one write lock from its start
(BEGIN IMMEDIATE, settings) to its end, and every step transition of every
worker waits for that lock: building a new run's rows took most of the time
the web held it (docs/performance.md). ``Insert.of`` builds them beforehand,
with the models' defaults and field conversions as ``bulk_create`` applies
them; ``Insert.execute`` runs the one statement and gives the rows their ids.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

from django.db import connection, models


@dataclass(frozen=True)
class Insert:
    rows: Sequence[models.Model]
    sql: str
    params: list[Any]
    later: dict[str, list[int]]  # a column given to ``execute``: its places in ``params``

    @classmethod
    def of(cls, rows: Sequence[models.Model], later: Collection[str] = ()) -> Insert:
        """One INSERT of ``rows`` (unsaved, of one model); the ``later`` columns (attnames) are given to ``execute``."""
        meta = type(rows[0])._meta
        fields = [field for field in meta.concrete_fields if not field.primary_key]  # ids come from the database
        quote = connection.ops.quote_name
        params: list[Any] = []
        places: dict[str, list[int]] = {name: [] for name in later}
        for row in rows:
            for field in fields:
                if field.attname in places:
                    places[field.attname].append(len(params))
                    params.append(None)
                else:
                    params.append(field.get_db_prep_save(field.pre_save(row, True), connection))
        columns = ", ".join(quote(_column(field)) for field in fields)
        values = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * len(rows))
        sql = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES {values} RETURNING {quote(_column(meta.pk))}"
        return cls(rows, sql, params, places)

    def execute(self, **later: Any) -> None:
        """Insert the rows, with the ``later`` columns' values; each row gets its id, as saved rows have."""
        params = list(self.params)
        for name, value in later.items():
            for place in self.later[name]:
                params[place] = value
            for row in self.rows:
                setattr(row, name, value)
        with connection.cursor() as cursor:
            cursor.execute(self.sql, params)
            ids = [pk for (pk,) in cursor.fetchall()]
        # RETURNING gives the ids in the rows' order, as bulk_create relies on too.
        for row, pk in zip(self.rows, ids, strict=True):
            row.pk = pk
            row._state.adding = False
            row._state.db = connection.alias


def _column(field: Any) -> str:
    return cast(str, field.column)  # a concrete field has one
