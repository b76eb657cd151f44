"""What `replicator init` reads from etl-config.toml and what ships beside it: analytics_roles,
memory_triggers, the component migrations, .env.example and the command's help."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from plugins.replicator import minimal_config

from replicator import redact
from replicator.commands.cli import main
from replicator.config.load import load_config
from replicator.destination import state
from replicator.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

CONFIG = minimal_config("", "")


@pytest.fixture(autouse=True)
def _fresh_secrets():
    redact.clear_secrets()
    yield
    redact.clear_secrets()


def _load(tmp_path: Path, extra: str = "", environ: dict[str, str] | None = None):
    path = tmp_path / "etl-config.toml"
    path.write_text(CONFIG + textwrap.dedent(extra))
    return load_config(path, environ=environ or {})


def test_defaults_are_the_supabase_roles_and_no_memory_trigger(tmp_path):
    dst = _load(tmp_path).destination
    assert dst.analytics_roles == ("superset_readonly", "service_role")
    assert dst.memory_triggers is False


def test_analytics_roles_and_memory_triggers_are_read(tmp_path):
    dst = _load(tmp_path, 'analytics_roles = ["metabase", "service_role"]\n'
                          'memory_triggers = "$MEM"\n', {"MEM": "true"}).destination
    assert dst.analytics_roles == ("metabase", "service_role")
    assert dst.memory_triggers is True


@pytest.mark.parametrize("value, words", [
    ('"superset_readonly"', "expected an array of strings"),
    ("[1, 2]", "expected an array of strings"),
    ('["bad name; drop"]', "not a valid role name"),
])
def test_a_bad_analytics_roles_says_where_and_how(tmp_path, value, words):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"analytics_roles = {value}\n")
    line = info.value.one_line()
    assert "[destination] analytics_roles" in line and words in line
    assert '["' in line  # the fix shows the array syntax


def test_repo_config_documents_the_init_keys():
    text = (REPO / "etl-config.toml").read_text()
    assert '# analytics_roles = ["superset_readonly", "service_role"]' in text
    assert "# memory_triggers = false" in text


def test_env_example_names_the_database_password_not_the_api_key():
    text = (REPO / ".env.example").read_text()
    names = re.findall(r"^([A-Z_]+)=", text, re.M)
    assert names == ["ODOO_DB_PASSWORD", "SUPABASE_DB_PASSWORD"]
    assert "Project\n# Settings -> Database" in text and "NOT the service_role API key" in text
    config = (REPO / "etl-config.toml").read_text()
    assert all(f"${n}" in config for n in names)


def test_component_migrations_are_packaged_from_001_without_gaps():
    for component in state.COMPONENTS:
        files = state.migrations(("sql", component))
        assert [m.version for m in files] == list(range(1, len(files) + 1)), component
        assert files, component


def test_init_help_says_what_it_creates(capsys):
    assert main(["init", "--help"]) == 0
    out = capsys.readouterr().out
    for words in ("row-level security", "Analytics access", "v_invoice_summary",
                  "get_pending_expenses", "freshness", "memory_triggers", "Idempotent",
                  "Safe while `run` runs"):
        assert words in out, words
    assert main(["--help"]) == 0
    assert "replicator init --config" in capsys.readouterr().out
