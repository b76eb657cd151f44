"""etl-config.toml text for the dev tooling: the demo, the benchmarks and the tests write theirs here.

The replicator itself only reads the file; what writes one is a person, or this.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


def config_text(sections: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """One [section] per entry, in order; a key whose value is None is left out.

    ``header``: comment lines above the first section (without their "# ")."""
    parts = ["".join(f"# {line}\n" for line in header.splitlines())] if header else []
    for name, keys in sections.items():
        lines = [f"[{name}]"]
        lines.extend(f"{key} = {toml_value(value)}" for key, value in keys.items()
                     if value is not None)
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]],
                 header: str = "") -> Path:
    path.write_text(config_text(sections, header))
    return path
