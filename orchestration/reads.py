"""Reads of one row by key whose SQL is compiled once per process.

The ORM compiles a queryset to SQL every time it runs it. For the reads
every API request makes (its token with its user, the conversation with its
owner), compiling cost more than the query itself: 0.7 ms each of the 6 ms
the web spent creating a run (docs/performance.md). ``ByKey`` compiles such
a read once, from the ORM's own queryset, and builds the rows from each
result with the ORM's conversions, as the queryset would.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any, Generic, TypeVar, cast

from django.db import DEFAULT_DB_ALIAS, connection, models
from django.db.models.sql.compiler import SQLCompiler

M = TypeVar("M", bound=models.Model)


class ByKey(Generic[M]):
    """``model``'s row whose field ``key`` (unique) has a value, with the rows its foreign keys ``related`` name.

    ``get(value)`` gives what ``model.objects.select_related(*related).get(**{key: value})``
    gives, or None where that raises DoesNotExist. A value the field does not
    take (``"x"`` for an integer) raises what the queryset would: ValueError,
    TypeError or ValidationError.
    """

    def __init__(self, model: type[M], key: str, related: tuple[str, ...] = ()) -> None:
        self.model = model
        self.key = key
        self.related = related

    def get(self, value: Any) -> M | None:
        sql, compiler, parts = self._compiled
        value = self._key_field.get_db_prep_value(value, connection)
        if self._out_of_range(value):
            return None  # as the ORM's lookup of an integer no column holds (IntegerFieldOverflow)
        with connection.cursor() as cursor:
            cursor.execute(sql, [value])
            found = cursor.fetchone()
        if found is None:
            return None
        row = next(iter(compiler.results_iter([[found]])))
        first, *others = (_from_db(model, names, row[start : start + len(names)]) for model, names, start in parts)
        for name, other in zip(self.related, others, strict=True):
            setattr(first, name, other)
        return cast(M, first)

    @cached_property
    def _compiled(self) -> tuple[str, SQLCompiler, list[tuple[type[models.Model], list[str], int]]]:
        """The SQL, the compiler that converts its rows, and where each model's fields are in a row."""
        parts: list[tuple[type[models.Model], list[str], int]] = []
        columns: list[str] = []
        prefixed: list[tuple[str, type[models.Model]]] = [("", self.model)]
        prefixed += [(f"{name}__", self._related_model(name)) for name in self.related]
        for prefix, model in prefixed:
            names = [field.attname for field in model._meta.concrete_fields]
            parts.append((model, names, len(columns)))
            columns += [prefix + name for name in names]
        # The placeholder value only makes the ORM write a parameter; get() passes the real one.
        placeholder = self._key_field.to_python("0")
        queryset = self.model._default_manager.filter(**{self.key: placeholder}).values_list(*columns)
        # Kept only to convert values (no queries): of its connection, the
        # compiling thread's, converters read the backend's settings alone.
        compiler = queryset.query.get_compiler(DEFAULT_DB_ALIAS)
        sql, params = compiler.as_sql()
        if len(params) != 1:
            raise ValueError(f"{self.model.__name__} by {self.key}: expected one parameter, got {params!r}")
        return sql, compiler, parts

    @cached_property
    def _key_field(self) -> models.Field[Any, Any]:
        meta = self.model._meta
        field = meta.pk if self.key == "pk" else meta.get_field(self.key)
        assert isinstance(field, models.Field), self.key
        return field

    def _out_of_range(self, value: Any) -> bool:
        if not isinstance(value, int):
            return False
        low, high = connection.ops.integer_field_range(self._key_field.get_internal_type())
        return (low is not None and value < low) or (high is not None and value > high)

    def _related_model(self, name: str) -> type[models.Model]:
        field = self.model._meta.get_field(name)
        related = field.related_model
        if field.null or not isinstance(related, type) or not issubclass(related, models.Model):
            raise ValueError(f"{self.model.__name__}.{name}: related takes foreign keys that cannot be null")
        return related


def _from_db(model: type[M], names: list[str], values: Sequence[Any]) -> M:
    return model.from_db(DEFAULT_DB_ALIAS, names, list(values))
