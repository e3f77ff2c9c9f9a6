"""sql_query: one read-only SELECT over the allowed tables, checked by the parser and again by the database."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.apps import apps
from django.db import connection

from orchestration.services import start_run
from skills import demo_shop
from skills.models import Customer, Order
from skills.registry import SkillContext, SkillError
from skills.support.sql import Query, _pyformat, check_query, json_safe, parameters, run_query, sql_query

from .conftest import wait_for_run

ALLOWED = ["shop_customer", "shop_order", "shop_orderitem", "shop_payment"]
DIALECT = "postgres" if connection.vendor == "postgresql" else "sqlite"
CATALOG = "pg_catalog.pg_tables" if connection.vendor == "postgresql" else "sqlite_master"
# The support story: who ordered 1042, and what was captured for it.
CHARGED_TWICE = (
    "select c.email, c.name, p.amount, p.status, p.card_last4 "
    "from shop_order o join shop_customer c on c.id = o.customer_id "
    "join shop_payment p on p.order_id = o.id "
    "where o.id = :order_id and p.status = 'captured' order by p.id"
)
# Counts to a billion: runs far longer than any timeout of these tests.
LONG = "with recursive n(i) as (select 1 union all select i + 1 from n where i < 1000000000) select count(*) from n"


def context(**args: Any) -> SkillContext:
    return SkillContext(run_id=1, step_id=1, step_key="sql", conversation_id=None, state={}, args=args, attempt=1)


@pytest.fixture
def shop(transactional_db: None) -> None:
    """The demo shop, committed (the read-only connection sees only committed rows; a flush removes them)."""
    if not Order.objects.filter(pk=demo_shop.CHARGED_TWICE).exists():
        demo_shop.seed(apps)


def refusal(call: Any) -> str:
    with pytest.raises(SkillError) as caught:
        call()
    assert caught.value.transient is False
    return str(caught.value)


# --- The parser's checks (no database) ---------------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    "query",
    [
        "select * from shop_order",
        "select o.id, count(*) from shop_order o join shop_orderitem i on i.order_id = o.id group by o.id",
        "with recent as (select * from shop_order) select * from recent",
        LONG,
        "select id from shop_order union select order_id from shop_payment",
        "select * from shop_order where id in (select order_id from shop_payment where amount > 50);",
        "select * from shop_order; -- the last one",
        "select 1 -- ; drop table shop_order",
    ],
)
def test_it_accepts_one_select_over_allowed_tables(dialect, query):
    assert check_query(query, dialect, ALLOWED).text == query


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("select * from auth_user", 'sql_query: table "auth_user" is not allowed (allowed: shop_customer, shop_order'),
        ("select * from shop_order where customer_id in (select id from auth_user)", 'table "auth_user"'),
        ("with u as (select * from auth_user) select * from u", 'table "auth_user" is not allowed'),
        ("select * from shop_order o join orchestration_run r on r.id = o.id", 'table "orchestration_run"'),
        ("select * from sqlite_master", 'table "sqlite_master" is not allowed'),
        ("select * from pg_catalog.pg_tables", 'table "pg_catalog.pg_tables" is not allowed'),
        ("select * from information_schema.tables", 'table "information_schema.tables"'),
        ("select * from public.shop_order", 'table "public.shop_order" is not allowed'),
        # A CTE's name covers only the query it belongs to.
        ("select * from auth_user, (with auth_user as (select 1) select * from auth_user) s", 'table "auth_user"'),
        ("select 1; select 2", "sql_query: only one statement is allowed, got 2"),
        ("select * from shop_order; delete from shop_order", "only one statement is allowed, got 2"),
        ("delete from shop_order", "sql_query: only SELECT (or WITH ... SELECT) is allowed, not DELETE"),
        ("insert into shop_order (id) values (1)", "only SELECT (or WITH ... SELECT) is allowed, not INSERT"),
        ("update shop_payment set amount = 0", "not UPDATE"),
        ("drop table shop_order", "not DROP"),
        ("with gone as (delete from shop_payment returning *) select * from gone", "the query contains DELETE"),
        ("select * into stolen from shop_customer", "only SELECT is allowed: the query contains INTO"),
        ("select * from shop_order for update", "no FOR UPDATE/FOR SHARE"),
        ("select pg_read_file('/etc/passwd')", 'the function "pg_read_file" is not allowed'),
        ("select query_to_xml('select * from auth_user', true, true, '')", 'the function "query_to_xml"'),
        ("select current_setting('is_superuser')", 'the function "current_setting" is not allowed'),
        ("select * from generate_series(1, 10)", "is not allowed (allowed: shop_customer"),
        ("select * from pragma_table_info('auth_user')", 'table "pragma_table_info" is not allowed'),
        ("select * from shop_order, lateral pg_ls_dir('.') f", 'the function "pg_ls_dir" is not allowed'),
        ("select pg_catalog.pg_read_file('x')", 'the function "pg_read_file" is not allowed'),
        ("select (select count(*) from auth_user)", 'table "auth_user" is not allowed'),
        ("select * from shop_order natural join auth_user", 'table "auth_user" is not allowed'),
        ("set statement_timeout = 0", "only SELECT (or WITH ... SELECT) is allowed, not SET"),
        ("explain analyze select * from shop_order", "only SELECT (or WITH ... SELECT) is allowed, not COMMAND"),
        ("select * from shop_order where (", "sql_query: the query does not parse"),
        ("pragma table_info(shop_order)", "only SELECT (or WITH ... SELECT) is allowed, not PRAGMA"),
        ("", "args.query must be the SQL text of a SELECT"),
        (" ; ", "only one statement is allowed, got 0"),
    ],
)
def test_it_refuses_anything_but_one_select_over_allowed_tables(dialect, query, message):
    assert message in refusal(lambda: check_query(query, dialect, ALLOWED))


def test_it_refuses_attach_in_sqlite():
    message = refusal(lambda: check_query("attach database '/tmp/x.db' as x", "sqlite", ALLOWED))

    assert message.startswith("sql_query: only SELECT (or WITH ... SELECT) is allowed, not")


def test_it_refuses_a_query_that_is_not_text():
    assert "args.query must be the SQL text" in refusal(lambda: check_query(42, "sqlite", ALLOWED))


def test_parameters_come_from_the_args_then_the_ticket():
    query = check_query("select * from shop_order where id = :order_id and status = :status", DIALECT, ALLOWED)

    assert query.parameters == ["order_id", "status"]
    assert parameters(query, {"status": "paid"}, {"order_id": 1042, "status": "x"}) == {
        "order_id": 1042,
        "status": "paid",
    }


@pytest.mark.parametrize(
    ("given", "ticket", "message"),
    [
        ({}, {}, 'sql_query: parameter "order_id" has no value (in args.params or the ticket)'),
        ({"order_id": [1042]}, {}, 'parameter "order_id" must be a string, number, boolean or null, not list'),
        ({}, {"order_id": {"id": 1}}, 'parameter "order_id" must be a string, number, boolean or null, not dict'),
        ({"order_id": 1, "oder": 2}, {}, "args.params has oder, which the query does not use (write :oder)"),
        ([1042], {}, "args.params must be an object of parameter values"),
    ],
)
def test_a_bad_parameter_is_named(given, ticket, message):
    query = check_query("select * from shop_order where id = :order_id", DIALECT, ALLOWED)

    assert message in refusal(lambda: parameters(query, given, ticket))


def test_psycopg_gets_its_own_placeholders_and_literal_percent_signs():
    text = "select '10:30', 7 % 2 from shop_order where id = :order_id and status like 'p%' and total > :min"
    query = check_query(text, "postgres", ALLOWED)

    assert _pyformat(query) == (
        "select '10:30', 7 %% 2 from shop_order where id = %(order_id)s and status like 'p%%' and total > %(min)s"
    )


def test_a_postgresql_slice_is_not_a_parameter():
    query = check_query("select (array[1, 2, 3])[1:2] from shop_order where id = :id", "postgres", ALLOWED)

    assert _pyformat(query) == "select (array[1, 2, 3])[1:2] from shop_order where id = %(id)s"


def test_values_become_json():
    values = [Decimal("49.99"), datetime(2026, 10, 1, 9, 0), date(2026, 10, 1), b"\x01\xff", None, "x", 3]

    assert json_safe(values) == [49.99, "2026-10-01T09:00:00+00:00", "2026-10-01", "01ff", None, "x", 3]
    assert json_safe(datetime(2026, 10, 1, 9, 0, tzinfo=UTC)) == "2026-10-01T09:00:00+00:00"
    assert json_safe([Decimal("NaN"), Decimal("Infinity")]) == ["NaN", "Infinity"]


# --- On the database ------------------------------------------------------------------


def test_it_finds_the_double_charge_of_order_1042(shop):
    output = sql_query(context(query=CHARGED_TWICE), {"content": "charged twice", "order_id": 1042})

    assert output["sql"] == {
        "columns": ["email", "name", "amount", "status", "card_last4"],
        "rows": [
            ["jane@example.com", "Jane Doe", 101.5, "captured", "4242"],
            ["jane@example.com", "Jane Doe", 101.5, "captured", "4242"],
        ],
        "row_count": 2,
        "truncated": False,
    }
    assert output["content"] == "charged twice"


def test_it_joins_and_aggregates_into_the_key_asked(shop):
    query = (
        "select o.id, count(i.id) as items, sum(i.quantity * i.unit_price) as value, min(o.placed_at) as placed "
        "from shop_order o join shop_orderitem i on i.order_id = o.id "
        "where o.id between :first and :last group by o.id order by o.id"
    )
    output = sql_query(context(query=query, params={"first": 1031, "last": 1032}, into="orders"), {"content": "x"})

    result = output["orders"]
    assert result["columns"] == ["id", "items", "value", "placed"]
    assert [row[:3] for row in result["rows"]] == [[1031, 1, 25.0], [1032, 2, 42.9]]
    assert str(result["rows"][0][3]).startswith("2026-10-01")


def test_a_datetime_column_is_an_iso_string_in_utc(shop):
    query = "select placed_at, total from shop_order where id = 1031"

    assert sql_query(context(query=query), {})["sql"]["rows"] == [["2026-10-01T11:00:00+00:00", 25.0]]


def test_new_orders_come_after_the_demo_ones(shop):
    customer = Customer.objects.create(email="new@example.com", name="New", created_at=demo_shop.START)

    order = Order.objects.create(customer=customer, status="pending", total=1, placed_at=demo_shop.START)

    assert order.pk > 1050


def test_it_keeps_at_most_the_row_cap(shop, settings):
    settings.SQL_QUERY_MAX_ROWS = 5
    output = sql_query(context(query="select id from shop_order order by id"), {"content": "x"})

    assert output["sql"]["rows"] == [[1031], [1032], [1033], [1034], [1035]]
    assert (output["sql"]["row_count"], output["sql"]["truncated"]) == (5, True)


def test_a_long_query_is_stopped_at_the_timeout(shop, settings):
    settings.SQL_QUERY_TIMEOUT = 0.5

    message = refusal(lambda: sql_query(context(query=LONG), {"content": "x"}))

    assert message == "sql_query: the query ran longer than its 0.5s timeout"


@pytest.mark.parametrize(
    "text",
    [
        "insert into shop_customer (email, name, created_at) values ('x@example.com', 'X', '2026-01-01')",
        "update shop_payment set amount = 0",
        "delete from shop_payment",
    ],
)
def test_the_database_refuses_a_write_the_parser_let_through(shop, text):
    # As if the parser had missed it: the read-only connection is the second wall.
    query = Query(text=text, dialect=DIALECT, parameters=[], spans=[])

    message = refusal(lambda: run_query("default", query, {}, 2, 10))

    assert message.startswith("sql_query: only SELECT is allowed")
    assert demo_shop.CHARGED_TWICE in Order.objects.values_list("pk", flat=True)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the table allowlist is the parser's on PostgreSQL")
@pytest.mark.parametrize(
    ("text", "table"),
    [
        ("select * from auth_user", "auth_user"),
        ("select name from sqlite_master", "sqlite_master"),
        ("with u as (select * from auth_user) select * from shop_order, u", "auth_user"),
    ],
)
def test_sqlite_itself_refuses_a_table_the_parser_let_through(shop, text, table):
    query = Query(text=text, dialect="sqlite", parameters=[], spans=[])

    assert f'sql_query: table "{table}" is not allowed' in refusal(lambda: run_query("default", query, {}, 2, 10))


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's own statements")
@pytest.mark.parametrize("text", ["attach database ':memory:' as other", "pragma writable_schema = on"])
def test_sqlite_itself_refuses_attach_and_pragma(shop, text):
    query = Query(text=text, dialect="sqlite", parameters=[], spans=[])

    assert refusal(lambda: run_query("default", query, {}, 2, 10)).startswith("sql_query: only SELECT is allowed")


def test_a_column_the_database_does_not_know_is_its_error(shop):
    message = refusal(lambda: sql_query(context(query="select nope from shop_order"), {"content": "x"}))

    assert message.startswith("sql_query: the database refused the query:")
    assert "nope" in message


# --- Through a worker ---------------------------------------------------------------


@pytest.mark.worker
def test_the_order_a_customer_mentions_is_looked_up(worker, user, shop):
    spec = {
        "chain": [{"skill": "extract_order"}, {"skill": "sql_query", "id": "sql", "args": {"query": CHARGED_TWICE}}]
    }
    message = {"content": "I was charged twice for order 1042!"}

    run = wait_for_run(start_run(owner=user, spec=spec, input=message))

    assert run.status == "succeeded", run.error
    output: dict[str, Any] = run.output or {}
    assert output["order_id"] == 1042
    assert output["sql"]["row_count"] == 2
    assert output["sql"]["rows"][0][:3] == ["jane@example.com", "Jane Doe", 101.5]


@pytest.mark.worker
def test_a_refused_query_fails_the_step_at_once(worker, user, shop):
    spec = {"skill": "sql_query", "args": {"query": "select username, password from auth_user"}}

    run = wait_for_run(start_run(owner=user, spec=spec, input={"content": "x"}))

    assert run.status == "failed"
    assert 'sql_query: table "auth_user" is not allowed (allowed: shop_customer, shop_order' in run.error
    assert run.steps.get().attempts == 1


def test_the_demo_shop_is_shown_read_only_in_the_admin(shop, admin_client):
    listing = admin_client.get("/admin/skills/order/?q=1042")
    order = admin_client.get("/admin/skills/order/1042/change/")

    assert listing.status_code == 200
    assert "jane@example.com" in listing.content.decode()
    assert order.status_code == 200
    assert "ch_1042_2" in order.content.decode()
    assert 'name="_save"' not in order.content.decode()
    assert admin_client.get("/admin/skills/order/add/").status_code == 403
