"""[mappings] in its table form: target, exclude, filter, soft_delete, history."""

from __future__ import annotations

import textwrap

import pytest

from replicator.config.load import load_config
from replicator.config.settings import NO_OPTIONS, MappingOptions
from replicator.errors import ConfigError

MINIMAL = """\
[source]
host = "127.0.0.1"
port = 5432
database = "odoo_core"
user = "odoo"
password = "pw-source"
publication = "odoo_pub"

[destination]
host = "127.0.0.1"
port = 5433
database = "postgres"
user = "postgres"
password = "pw-dest"
"""


def load(tmp_path, mappings: str, environ=None):
    path = tmp_path / "etl-config.toml"
    path.write_text(MINIMAL + textwrap.dedent(mappings))
    return load_config(path, environ=environ or {})


def test_table_form_beside_the_string_form(tmp_path):
    config = load(tmp_path, """\
        [mappings]
        account_move = "account_move"
        billing.invoice = "finance.invoice"

        [mappings.res_partner]
        target = "odoo_mirror.partners"
        exclude = ["email", "phone"]
        filter = "active and company_id = $COMPANY"
        soft_delete = true
        history = true

        [mappings."sales.order"]
        soft_delete = true

        [mappings.hr.employee]
        exclude = ["bank_account_id"]
        """, environ={"COMPANY": "1"})
    assert config.mappings == {
        "public.account_move": "odoo_mirror.account_move",
        "billing.invoice": "finance.invoice",
        "public.res_partner": "odoo_mirror.partners",
        "sales.order": "odoo_mirror.order",        # no target: the source's name
        "hr.employee": "odoo_mirror.employee",
    }
    assert config.options("public", "res_partner") == MappingOptions(
        frozenset({"email", "phone"}), "active and company_id = 1", True, True)
    assert config.options("sales", "order") == MappingOptions(soft_delete=True)
    assert config.options("hr", "employee").exclude == {"bank_account_id"}
    assert config.options("public", "account_move") is NO_OPTIONS


@pytest.mark.parametrize(("mappings", "message"), [
    ("[mappings.t]\ntarget = \"x\"\nexclud = [\"a\"]\n", "[mappings.t] unknown key: exclud"),
    ("[mappings.t]\nexclude = \"email\"\n",
     '[mappings.t] exclude: expected a list of column names, got string "email"'),
    ("[mappings.t]\nexclude = [\"e-mail\"]\n",
     "[mappings.t] exclude: 'e-mail' is not a valid column name"),
    ("[mappings.t]\nfilter = \"\"\n",
     '[mappings.t] filter: expected a SQL condition as a string, got string ""'),
    ("[mappings.t]\nhistory = \"yes\"\n",
     '[mappings.t] history: expected true or false, got string "yes"'),
    ("[mappings.t]\ntarget = \"a.b.c\"\n",
     "[mappings.t] target: 'a.b.c' is not a valid destination table name"),
])
def test_bad_table_form(tmp_path, mappings, message):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, mappings)
    assert err.value.message == message
    assert "\n" not in err.value.message


def test_unknown_key_names_the_close_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "[mappings.t]\nsoft_delet = true\n")
    assert "did you mean 'soft_delete'" in err.value.hint


def test_check_summary_shows_the_options(tmp_path):
    from replicator.commands.cli import _summary

    config = load(tmp_path, """\
        [mappings.res_partner]
        target = "partners"
        exclude = ["phone", "email"]
        filter = "active"
        history = true
        """)
    assert ("public.res_partner -> odoo_mirror.partners (exclude email, phone; filter; history)"
            in _summary(config))


def test_a_column_excluded_later_is_dropped_from_the_mirror():
    from replicator.destination.mirror_ddl import plan_mirror
    from replicator.schema import Column, MirrorTable, Origin, SourceTable

    cols = (Column("id", "integer", 23, 4), Column("email", "text", 25, -1),
            Column("iban", "text", 25, -1))
    t = MirrorTable(SourceTable(16500, "public", "t", cols, ("id",), "d"), "odoo_mirror", "t",
                    "replicator", binary=True,
                    options=MappingOptions(exclude=frozenset({"email", "iban"})))
    plan = plan_mirror(t, {"id": "integer", "email": "text"}, {1: "id", 2: "email"},
                       (Origin(1), Origin(2), Origin(3)))
    # email goes; iban (new at the source) is never added.
    assert [s.as_string() for s, _ in plan.statements] == [
        'alter table "odoo_mirror"."t" drop column "email"']
