"""plan_mirror: which ALTERs bring a mirror to the stream's columns (no server needed)."""

from __future__ import annotations

from replicator.destination.mirror_ddl import plan_mirror
from replicator.schema import Column, MirrorTable, Origin, SourceTable

INT = Column("x", "integer", 23, 4)
TEXT = Column("x", "text", 25, -1)


def col(name: str, like: Column) -> Column:
    return Column(name, like.type_sql, like.typoid, like.typlen)


def table(*columns: Column) -> MirrorTable:
    source = SourceTable(16500, "public", "t", columns, ("id",), "d")
    return MirrorTable(source, "odoo_mirror", "t", "replicator", binary=True)


def sqls(plan) -> list[str]:
    return [s.as_string() for s, _ in plan.statements]


def test_odoo_type_change_renames_then_adds():
    t = table(col("id", INT), col("c_moved0", TEXT), col("c", INT))
    plan = plan_mirror(t, {"id": "integer", "c": "text"}, {1: "id", 2: "c"},
                       (Origin(1), Origin(2), Origin(3)))
    assert sqls(plan) == [
        'alter table "odoo_mirror"."t" rename column "c" to "c_moved0"',
        'alter table "odoo_mirror"."t" add column "c" integer',
    ]
    assert plan.attnums == {1: "id", 2: "c_moved0", 3: "c"}


def test_without_attnums_columns_match_by_name():
    t = table(col("id", INT), col("c", INT))
    plan = plan_mirror(t, {"id": "integer", "c": "text"}, {1: "id", 2: "c"})
    assert sqls(plan) == ['alter table "odoo_mirror"."t" alter column "c" type integer '
                          'using "c"::integer']
    assert plan.statements[0][1] == ("c", "text", "integer")


def test_swap_goes_through_temporary_names():
    t = table(col("id", INT), col("b", TEXT), col("a", TEXT))
    plan = plan_mirror(t, {"id": "integer", "a": "text", "b": "text"}, {1: "id", 2: "a", 3: "b"},
                       (Origin(1), Origin(2), Origin(3)))
    assert sqls(plan)[-2:] == ['alter table "odoo_mirror"."t" rename column "_r_tmp0" to "b"',
                               'alter table "odoo_mirror"."t" rename column "_r_tmp1" to "a"']
    assert plan.attnums == {1: "id", 2: "b", 3: "a"}


def test_fast_default_is_added_then_dropped_and_volatile_one_asks_for_a_copy():
    t = table(col("id", INT), col("c", INT), col("d", TEXT))
    plan = plan_mirror(t, {"id": "integer"}, {1: "id"},
                       (Origin(1), Origin(2, True, "7"), Origin(3, True, None)))
    assert sqls(plan) == [
        'alter table "odoo_mirror"."t" add column "c" integer default \'7\'::integer',
        'alter table "odoo_mirror"."t" alter column "c" drop default',
        'alter table "odoo_mirror"."t" add column "d" text',
    ]
    assert plan.recopy == ["d"]
    # A copy fills every row itself.
    copy = plan_mirror(t, {"id": "integer"}, {1: "id"},
                       (Origin(1), Origin(2, True, "7"), Origin(3, True, None)), fast_defaults=False)
    assert copy.recopy == [] and "default" not in " ".join(sqls(copy))


def test_dropped_column_steps_aside_for_a_new_one_of_its_name():
    t = table(col("id", INT), col("c", INT))
    plan = plan_mirror(t, {"id": "integer", "c": "text"}, {1: "id", 2: "c"},
                       (Origin(1), Origin(3)))
    assert sqls(plan) == [
        'alter table "odoo_mirror"."t" rename column "c" to "c_dropped"',
        'alter table "odoo_mirror"."t" add column "c" integer',
    ]
    assert plan.attnums == {1: "id", 3: "c"}
