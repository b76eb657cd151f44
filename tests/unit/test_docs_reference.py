"""docs/configuration.md is the configuration reference, so it must stay true.

Per section it has a table `| key | default | meaning |`. Every key the loader accepts
(the settings dataclasses' fields, less those marked as not keys; MAPPING_KEYS for the
[mappings.<table>] form) is listed once, with its real default, and no other key is: a key
added to the settings without a row, a default changed in the code only, or a row left
behind for a removed key fails here. The shipped etl-config.toml may only set (or show,
commented out) documented keys. The manual's relative links and anchors must resolve, and
README keeps what CI and newcomers rely on.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from replicator.config import load
from replicator.config.settings import (
    MAPPING_KEYS,
    Config,
    DestinationSettings,
    MappingOptions,
    SourceSettings,
)
from replicator.telemetry import metrics

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

HEADER = ["key", "default", "meaning"]
REQUIRED = "required"      # the key must be in the file
UNSET = "unset"            # the default is None: leave the key out
# The one default that is not a value: a table-form mapping's target is the source's name.
TARGET_DEFAULT = "the source table's name"


# --- reading the reference --------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells; a | inside `code` does not split."""
    cells, cell, code = [], "", False
    for ch in line.strip().removeprefix("|").removesuffix("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return [*cells, cell.strip()]


def sections(text: str) -> dict[str, str]:
    """The body of each "## [name]" section, by name."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    found = {}
    for part in parts:
        heading, _, body = part.partition("\n")
        m = re.fullmatch(r"\[(\w+)\]", heading.strip())
        if m:
            found[m.group(1)] = body
    return found


def key_table(body: str, section: str) -> dict[str, str]:
    """key -> default cell of the section's `| key | default | meaning |` table."""
    lines = body.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith("|") and _cells(line) == HEADER), None)
    assert start is not None, f"[{section}]: no | key | default | meaning | table"
    rows: dict[str, str] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == 3, f"[{section}]: a row without three cells: {line}"
        m = re.fullmatch(r"`([a-z_]+)`", cells[0])
        assert m, f"[{section}]: the key cell should be one `key`, got {cells[0]!r}"
        assert m.group(1) not in rows, f"[{section}] {m.group(1)} is documented twice"
        rows[m.group(1)] = cells[1]
    return rows


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, str]]:
    found = sections(REFERENCE.read_text())
    return {name: key_table(body, name) for name, body in found.items()}


# --- what the loader accepts --------------------------------------------------------------------


def accepted(cls: type) -> dict[str, Any]:
    """The keys a settings class takes from the file, each with its default (REQUIRED when
    there is none), as load._build reads them."""
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("key", True):
            continue
        if f.default is not dataclasses.MISSING:
            keys[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            keys[f.name] = f.default_factory()
        else:
            keys[f.name] = REQUIRED
    return keys


def toml(value: Any) -> str:
    """A default as it would be written in etl-config.toml (for messages)."""
    if value is None:
        return UNSET
    if value == REQUIRED:
        return REQUIRED
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list | frozenset | set):
        items = sorted(value) if isinstance(value, frozenset | set) else value
        return "[" + ", ".join(toml(v) for v in items) + "]"
    return str(value)


def matches(cell: str, default: Any) -> bool:
    """Whether a documented default cell states ``default``: "required", "unset", or a TOML
    value in backticks equal to it (a whole number stands for a float, as in the file)."""
    if default == REQUIRED or default is None:
        return cell == toml(default)
    m = re.fullmatch(r"`(.+)`", cell)
    if not m:
        return False
    try:
        value = tomllib.loads(f"v = {m.group(1)}")["v"]
    except tomllib.TOMLDecodeError:
        return False
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default) and value == default
    if isinstance(default, float):
        return isinstance(value, int | float) and value == default
    if isinstance(default, tuple | list):
        return isinstance(value, list) and value == list(default)
    if isinstance(default, frozenset | set):
        return isinstance(value, list) and sorted(value) == sorted(default)
    return type(value) is type(default) and value == default


def _check(section: str, documented: dict[str, str], keys: dict[str, Any]) -> None:
    undocumented = sorted(set(keys) - set(documented))
    assert not undocumented, (
        f"[{section}] keys the loader accepts but docs/configuration.md does not list: "
        + ", ".join(f"{k} (default {toml(keys[k])})" for k in undocumented))
    unknown = sorted(set(documented) - set(keys))
    assert not unknown, f"[{section}] documented keys the loader refuses: {', '.join(unknown)}"
    wrong = [f"{k}: documented {documented[k]!r}, the code's default is {toml(keys[k])}"
             for k in keys if not matches(documented[k], keys[k])]
    assert not wrong, f"[{section}] defaults that differ from the code: " + "; ".join(wrong)


# --- the tests ----------------------------------------------------------------------------------


def test_every_section_the_loader_reads_has_a_table(reference):
    assert sorted(reference) == sorted(load._ALL_SECTIONS)
    assert set(load._SECTIONS) | {"mappings"} == set(load._ALL_SECTIONS)


@pytest.mark.parametrize("section", sorted(load._SECTIONS))
def test_a_section_lists_every_key_with_its_default(reference, section):
    _check(section, reference[section], accepted(load._SECTIONS[section]))


def test_the_mapping_table_form_lists_every_key_with_its_default(reference):
    documented = reference["mappings"]
    # What a table-form mapping that sets nothing else gets, as the loader builds it.
    source = SourceSettings(host="", port=5432, database="odoo", user="u", password="",
                            publication="p")
    dest = DestinationSettings(host="", port=5432, database="mirror", user="u", password="")
    config = Config(source=source, destination=dest, mappings={"res_partner": {"history": False}})
    assert config.target("public", "res_partner") == (dest.schema, "res_partner")
    assert documented.get("target") == TARGET_DEFAULT, (
        f"[mappings] target: its default should read {TARGET_DEFAULT!r}")
    options = {f.name: getattr(config.options("public", "res_partner"), f.name)
               for f in dataclasses.fields(MappingOptions)}
    assert set(options) | {"target"} == set(MAPPING_KEYS), "MappingOptions and MAPPING_KEYS differ"
    assert options == accepted(MappingOptions)
    _check("mappings", {k: v for k, v in documented.items() if k != "target"}, options)
    assert set(documented) == set(MAPPING_KEYS)


def _shipped_keys() -> dict[str, set[str]]:
    """Keys the shipped etl-config.toml sets, and those it shows commented out, by section
    ("mappings" for the table form's keys; string-form mapping lines are table names)."""
    text = (ROOT / "etl-config.toml").read_text()
    keys: dict[str, set[str]] = {}
    for name, table in tomllib.loads(text).items():
        if name == "mappings":
            for value in table.values():
                if isinstance(value, dict):
                    keys.setdefault("mappings", set()).update(value)
        else:
            keys.setdefault(name, set()).update(table)
    section, table_form = "", False
    for line in text.splitlines():
        if m := re.match(r"#?\s*\[(\w+)(\.[^\]]+)?\]\s*$", line):
            section, table_form = m.group(1), bool(m.group(2))
        elif (m := re.match(r"#\s?([a-z_]+) = ", line)) and (section != "mappings"
                                                             or table_form):
            keys.setdefault(section, set()).add(m.group(1))
    return keys


def test_every_key_of_the_shipped_config_is_documented(reference):
    shipped = _shipped_keys()
    assert {"source", "destination", "logging", "metrics", "mappings"} <= set(shipped)
    for section, keys in shipped.items():
        missing = sorted(keys - set(reference[section]))
        assert not missing, f"etl-config.toml [{section}] sets undocumented keys: {missing}"


def _cell(default: Any) -> str:
    """The default cell docs/configuration.md should have for ``default``."""
    return toml(default) if default == REQUIRED or default is None else f"`{toml(default)}`"


def test_the_key_check_catches_a_missing_row_a_wrong_default_and_a_new_key(reference):
    """The checks above are not vacuous: on a table written from the code itself, a row taken
    out, a default changed or a key added to the settings fails them."""
    keys = accepted(DestinationSettings)
    complete = {k: _cell(v) for k, v in keys.items()}
    _check("destination", complete, keys)   # toml() and matches() agree on every default
    without = {k: v for k, v in complete.items() if k != "batch_size"}
    with pytest.raises(AssertionError, match="batch_size"):
        _check("destination", without, keys)
    with pytest.raises(AssertionError, match="batch_size"):
        _check("destination", {**complete, "batch_size": "`1000`"}, keys)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WithANewKey(DestinationSettings):
        new_knob: float = 1.5

    with pytest.raises(AssertionError, match=r"new_knob \(default 1.5\)"):
        _check("destination", reference["destination"], accepted(WithANewKey))


def test_the_metrics_list_names_every_metric_and_no_other():
    """docs/monitoring.md's list against the names the code exports (the integration test
    test_metrics.py checks the same list against a live /metrics)."""
    page = (ROOT / "docs" / "monitoring.md").read_text()
    section = page.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(etl_[a-z_]+)", section, flags=re.M))
    exported = {v for k, v in vars(metrics).items()
                if k.isupper() and isinstance(v, str) and v.startswith("etl_")}
    assert listed == exported, (sorted(exported - listed), sorted(listed - exported))


# --- links, and what README must keep -----------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", MANUAL, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("path", [*MANUAL, ROOT / "etl-config.toml"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_nobody_is_sent_to_a_document_they_do_not_have(path):
    text = path.read_text().lower()
    for words in ("runbook", "deployment doc"):
        assert words not in text, f"{path.name} mentions the {words}"


def test_readme_starts_with_the_two_commands_and_gives_the_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == [
        "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && .venv/bin/replicator demo",
        "bash .ci/run",
    ]
    assert "`.venv/bin/python -m pytest -q -n 6 --dist worksteal tests`" in readme
    assert len(readme.splitlines()) <= 200, "README is the front door: the manual is in docs/"
