"""Loading etl-config.toml: TOML, $VARIABLES from the environment or .env, type coercion.

The file format is the deployment runbook's (``[source]``, ``[destination]``, ``[mappings]``,
``[logging]``, ``[metrics]``), so existing configs keep working. Every problem is reported as a
ConfigError naming the file or ``[section] key``, so an operator never has to guess which line
is wrong. Every password resolved here is registered with ``redact.register_secret`` before
anything else can print it. The settings types and their own checks are in ``settings``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
from dotenv.parser import parse_stream
from psycopg.conninfo import conninfo_to_dict

from ..errors import ConfigError
from ..redact import register_secret
from .settings import (
    MAPPING_KEYS,
    Config,
    ConnectionSettings,
    DestinationSettings,
    LoggingSettings,
    MetricsSettings,
    Secret,
    SourceSettings,
    describe_value,
    did_you_mean,
)

__all__ = ["from_dsns", "load_config"]

_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VAR_RE = re.compile(
    r"\$(?:(?P<escape>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|(?P<open>\{))"
)
# A value made of variable references only ("$ODOO_DB_PASSWORD", "${A}${B}"): naming a
# variable it refers to gives nothing of a password away.
_ONLY_REFERENCES = re.compile(r"(?:\$\{[A-Za-z_][A-Za-z0-9_]*\}|\$[A-Za-z_][A-Za-z0-9_]*)+")
# .env names that hold secrets even if etl-config.toml does not use them (the service role
# key sits in the same .env): mask them in logs too. Short values would mask too much.
_SECRET_NAME_RE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|_KEY\b|PRIVATE", re.IGNORECASE)
_MIN_GUESSED_SECRET = 8


# --- loading --------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "source": SourceSettings,
    "destination": DestinationSettings,
    "logging": LoggingSettings,
    "metrics": MetricsSettings,
}
_ALL_SECTIONS = ["source", "destination", "mappings", "logging", "metrics"]
# Keys accepted for the deployment runbook's files that have no effect (Config.ignored).
_NO_EFFECT = {"source": ("idle_timeout",), "destination": ("idle_timeout",)}


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, substitute and validate a config file; raise ConfigError on any problem.

    ``$NAME`` and ``${NAME}`` in string values come from ``environ`` (default: os.environ),
    then from ``.env`` beside the config file; ``$$`` is a literal ``$``. Substituted text is
    not substituted again, so a password may contain ``$``. Relative paths in the file
    (``sslrootcert``, ``sslcert``, ``sslkey``, ``[logging] output``) are relative to the
    config file's directory; a certificate or key file named there must exist.
    """
    config_path = Path(path).absolute()
    doc = _read_toml(config_path)
    dotenv_path = config_path.parent / ".env"
    resolver = _Resolver(
        os.environ if environ is None else environ, _read_dotenv(dotenv_path), dotenv_path
    )

    unknown = [name for name in doc if name not in _ALL_SECTIONS]
    if unknown:
        raise _unknown_error("", unknown, _ALL_SECTIONS)
    for name, value in doc.items():
        if not isinstance(value, dict):
            raise ConfigError(
                f"{name} must be a section ([{name}]), got {describe_value(value)}",
                f"write [{name}] on a line of its own and put its keys below it",
            )
    missing = [name for name in ("source", "destination") if name not in doc]
    if missing:
        raise ConfigError(
            f"{config_path}: missing section(s) " + ", ".join(f"[{m}]" for m in missing),
            "start from the etl-config.toml that ships with the replicator: it has every "
            "section and key",
        )

    # Resolve and register both passwords before anything else can echo a value.
    for name in ("source", "destination"):
        raw = doc[name].get("password")
        if isinstance(raw, str):
            register_secret(resolver.substitute(f"[{name}] password", raw, secret=True)[0])

    base_dir = config_path.parent
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _build(cls, doc.get(name, {}), resolver)
    sections["source"] = _with_relative_paths(sections["source"], base_dir)
    sections["destination"] = _with_relative_paths(sections["destination"], base_dir)
    output = sections["logging"].output
    if output not in ("stdout", "stderr") and not Path(output).is_absolute():
        sections["logging"] = dataclasses.replace(
            sections["logging"], output=str(base_dir / output)
        )

    mappings = _read_mappings(doc.get("mappings", {}), resolver)
    ignored = tuple(f"[{name}] {key}" for name, keys in _NO_EFFECT.items()
                    for key in keys if key in doc.get(name, {}))
    return Config(mappings=mappings, path=config_path, ignored=ignored, **sections)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found",
            "pass --config PATH, or copy the etl-config.toml that ships with the replicator "
            "there",
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})", "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}", "check the path and its permissions"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11 has no lineno attribute: the position is only in the message.
        reason = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)|\(at end of document\)", reason)
        if m and m.group(1):
            where = f"line {m.group(1)}, column {m.group(2)}"
        else:
            where = f"line {text.count(chr(10)) + 1} (end of file)"
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", reason)
        raise ConfigError(
            f"{path}: invalid TOML at {where}: {reason}",
            'check quotes and brackets on that line; strings need quotes: key = "value"',
        ) from None


def _read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, parsed by python-dotenv: comments, quotes, ``export``, empty values.

    Nothing is expanded (``$NAME`` is etl-config.toml's syntax, and a password may contain
    ``$``) and nothing is written into os.environ. A line python-dotenv cannot parse, a name
    without ``=``, or a name ``$NAME`` could not refer to is an error naming the line, never
    quoting it (it may hold a secret).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path}: {exc}", "check its permissions and encoding"
        ) from None

    values: dict[str, str] = {}
    # parse_stream rather than dotenv_values: the latter skips a bad line with a warning,
    # and a password silently missing is worse than an error naming its line.
    for binding in parse_stream(io.StringIO(text)):
        key, value, line = binding.key, binding.value, binding.original.line
        if key is None and not binding.error:
            continue  # blank line or comment
        if binding.error:
            quoted = _QUOTED_START.match(binding.original.string)
            if quoted:
                key = quoted["key"]
                raise ConfigError(
                    f"{path} line {line}: {key}: unterminated or misplaced quote",
                    f"write {key}=\"value\" with the closing quote at the end of the line",
                )
        if binding.error or value is None or key is None or not _VAR_NAME_RE.fullmatch(key):
            raise ConfigError(
                f"{path} line {line}: expected KEY=VALUE",
                "names are letters, digits and underscores; comment lines start with #",
            )
        values[key] = value
        if _SECRET_NAME_RE.search(key) and len(value) >= _MIN_GUESSED_SECRET:
            register_secret(value)
    return values


# The start of a binding python-dotenv rejected that opens a quote: the quote is the problem.
_QUOTED_START = re.compile(r"\s*(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*['\"]")


class _Resolver:
    """$NAME lookup: the environment first, then .env (so a deployment can override a file)."""

    def __init__(
        self, environ: Mapping[str, str] | None, dotenv: Mapping[str, str], dotenv_path: Path | None
    ) -> None:
        self.environ = environ
        self.dotenv = dotenv
        self.dotenv_path = dotenv_path

    @classmethod
    def none(cls) -> _Resolver:
        """No substitution at all (values from DSNs and Python code are taken literally)."""
        return cls(None, {}, None)

    def substitute(self, where: str, text: str, *, secret: bool = False) -> tuple[str, list[str]]:
        """``text`` with variables replaced, and descriptions of where each one came from.

        For a ``secret`` value (a password) an error never quotes the text: it runs before
        the password is known, so redaction cannot catch it, and a literal password with a
        ``$`` in it ("Tr0ub4dor${and 3}xkcd") is exactly what fails here. A variable that is
        not set is named only when the value is nothing but references.
        """
        if self.environ is None or "$" not in text:
            return text, []
        origins: list[str] = []
        literal = "a literal $ (in a password, say) is written $$"

        def replace(m: re.Match[str]) -> str:
            if m["escape"]:
                return "$"
            name = m["braced"] if m["braced"] is not None else m["bare"]
            default: str | None = None
            if m["braced"] is not None and ":-" in m["braced"]:
                # ${NAME:-default}, as in a shell or a compose file: the default when NAME
                # is unset or empty (a host that differs inside a container, say).
                name, default = m["braced"].split(":-", 1)
            if m["open"] is not None or not _VAR_NAME_RE.fullmatch(name or ""):
                problem = ("a ${ without its closing }" if m["open"] is not None
                           else "a ${...} whose name is not letters, digits and underscores")
                shown = f" {m.group(0)!r}" if not secret else \
                    f": {problem} (not shown: the value may be a password)"
                raise ConfigError(
                    f"{where}: invalid variable reference{shown}",
                    f"write $NAME, ${{NAME}} or ${{NAME:-default}} (a name of letters, digits "
                    f"and underscores); {literal}",
                )
            assert self.environ is not None
            if default is not None and not (self.environ.get(name) or self.dotenv.get(name)):
                origins.append(f"the default of {m.group(0)}")
                return default
            if name in self.environ:
                origins.append(f"{m.group(0)} in the environment")
                return self.environ[name]
            if name in self.dotenv:
                origins.append(f"{m.group(0)} in {self.dotenv_path}")
                return self.dotenv[name]
            if secret and not _ONLY_REFERENCES.fullmatch(text):
                raise ConfigError(
                    f"{where}: refers to a variable that is not set (its name is not shown: "
                    "with text around it, it may be part of a literal password)",
                    f"add the variable to the environment or to {self.dotenv_path}; {literal}",
                )
            raise ConfigError(
                f"{where}: {m.group(0)} is not set",
                f"add it to the environment or to {self.dotenv_path}",
            )

        # One pass: substituted text is never scanned again.
        return _VAR_RE.sub(replace, text), origins


def _keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)}


def _build(
    cls: type[Any],
    table: Mapping[str, Any],
    resolver: _Resolver,
    literal_origin: str = "",
) -> Any:
    """One settings object from one TOML table: names, presence, types, then the class's checks.

    ``literal_origin`` says where a password written without variables came from.
    """
    section = cls.section
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("key", True)}
    unknown = [key for key in table if key not in fields]
    if unknown:
        raise _unknown_error(section, unknown, list(fields))
    missing = [
        name
        for name, f in fields.items()
        if name not in table
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"[{section}] missing required key(s): {', '.join(missing)}",
            f"add {' and '.join(f'{m} = ...' for m in missing)} to the [{section}] section",
        )

    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        where = f"[{section}] {key}"
        secret = fields[key].metadata.get("secret", False)
        value, origins = (resolver.substitute(where, raw, secret=secret) if isinstance(raw, str)
                          else (raw, []))
        if secret:
            register_secret(value)
            if origins:
                values["password_source"] = ", ".join(origins)
            elif isinstance(value, str) and value:
                values["password_source"] = (
                    literal_origin or f"[{section}] password in the config file"
                )
        values[key] = _coerce(where, value, hints[key], origins, raw, secret)
    return cls(**values)


def _coerce(
    where: str, value: Any, hint: Any, origins: list[str], raw: Any, secret: bool
) -> Any:
    """Check a value's type; a string that came from a variable may stand for a number/bool."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    expected = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    from_var = bool(origins) and isinstance(value, str)
    via = f" (from {raw})" if from_var else ""

    if typing.get_origin(expected) is tuple:
        # A list of strings (analytics_roles); TOML has no tuples.
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(
            f"{where}: expected an array of strings, got {describe_value(value, secret=secret)}",
            f'write {where.split("] ")[1]} = ["name", ...]',
        )
    if expected is Secret:
        # Written as a string like any other; wrapped so that only conninfo() reveals it.
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            return Secret(value)
        expected = str
    elif expected is str:
        if isinstance(value, str):
            return value
    elif expected is bool:
        if isinstance(value, bool):
            return value
        if from_var and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_var:
            try:
                return int(value.strip(), 10)
            except ValueError:
                pass
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_var:
            try:
                number = float(value.strip())
            except ValueError:
                pass
            else:
                if number == number and abs(number) != float("inf"):  # no NaN / inf
                    return number
    else:  # pragma: no cover - a settings class declared a type this loader does not know
        raise TypeError(f"{where}: unsupported setting type {hint!r}")

    got = describe_value(value, secret=secret)
    fix = ""
    if isinstance(value, str) and not from_var and expected is not str:
        fix = "write it without quotes"
    elif expected is str and not isinstance(value, str):
        fix = "put the value in double quotes"
    raise ConfigError(
        f"{where}: expected {_TYPE_NAMES[expected]}, got {got}{via}",
        fix or f"set {where.split('] ')[1]} to {_TYPE_NAMES[expected]}",
    )


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
          "on": True, "off": False}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def from_dsns(source_dsn: str, dest_dsn: str, publication: str, **overrides: Any) -> Config:
    """A Config from two connection strings (tests, the demo).

    ``overrides`` are setting names: source-only (``slot``) and destination-only ones
    (``schema``, ``batch_size``, ...) by name; shared connection settings with a prefix
    (``source_max_connections``, ``destination_sslmode``); and ``mappings``, ``logging``,
    ``metrics`` (a settings object or a dict). Metrics are disabled unless overridden,
    so that parallel tests do not fight over port 9090.
    """
    source_table = {**_dsn_table("source", source_dsn), "publication": publication}
    dest_table = _dsn_table("destination", dest_dsn)
    extra: dict[str, Any] = {"metrics": MetricsSettings(enabled=False)}
    source_keys = _keys(SourceSettings)
    dest_keys = _keys(DestinationSettings)
    shared = _keys(ConnectionSettings)
    for name, value in overrides.items():
        if name in ("mappings", "logging", "metrics"):
            extra[name] = value
        elif name.startswith("source_") and name[7:] in source_keys:
            source_table[name[7:]] = value
        elif name.startswith("destination_") and name[12:] in dest_keys:
            dest_table[name[12:]] = value
        elif name in source_keys and name not in shared:
            source_table[name] = value
        elif name in dest_keys and name not in shared:
            dest_table[name] = value
        else:
            choices = (
                ["mappings", "logging", "metrics"]
                + [k for k in source_keys | dest_keys if k not in shared]
                + [f"source_{k}" for k in shared]
                + [f"destination_{k}" for k in shared]
            )
            raise ConfigError(
                f"from_dsns: unknown setting {name!r}", did_you_mean([name], sorted(choices))
            )
    for name in ("logging", "metrics"):
        if isinstance(extra.get(name), Mapping):
            settings_cls = LoggingSettings if name == "logging" else MetricsSettings
            extra[name] = _build(settings_cls, dict(extra[name]), _Resolver.none())
    source = _build(SourceSettings, source_table, _Resolver.none(), "the source DSN")
    destination = _build(
        DestinationSettings, dest_table, _Resolver.none(), "the destination DSN"
    )
    for settings in (source, destination):
        _check_tls_files(settings, "the working directory")
    return Config(source=source, destination=destination, path=None, **extra)


_TLS_FILES = ("sslrootcert", "sslcert", "sslkey")


def _with_relative_paths(settings: ConnectionSettings, base_dir: Path) -> ConnectionSettings:
    changes: dict[str, Any] = {}
    for key in _TLS_FILES:
        path = getattr(settings, key)
        # "system" is libpq's keyword for the OS trust store, not a file.
        if path and not (key == "sslrootcert" and path == "system") \
                and not Path(path).is_absolute():
            changes[key] = str(base_dir / path)
    settings = dataclasses.replace(settings, **changes) if changes else settings
    _check_tls_files(settings, f"the config file's directory, {base_dir}")
    return settings


def _check_tls_files(settings: ConnectionSettings, relative_to: str) -> None:
    """A named certificate or key that is not there: libpq would say so only at connect time,
    and for a missing sslcert not at all (it connects without one)."""
    for key in _TLS_FILES:
        path = getattr(settings, key)
        if not path or (key == "sslrootcert" and path == "system") or Path(path).is_file():
            continue
        what = "is not a file" if Path(path).exists() else "does not exist"
        raise ConfigError(
            f"[{settings.section}] {key}: {path} {what}",
            f"fix {key} in [{settings.section}] (a relative path is relative to "
            f"{relative_to})",
        )


def _read_mappings(table: Mapping[str, Any], resolver: _Resolver) -> dict[str, Any]:
    """Flatten [mappings] and substitute variables in its values.

    A bare dotted key (public.account_move = ...) is a nested table in TOML; accept it as if
    it had been quoted, since that is what the author meant. A table whose keys are mapping
    options ([mappings.res_partner] target = ..., exclude = [...]) is the table form.
    """
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and not _is_table_form(value):
            for sub_key, sub_value in value.items():
                if isinstance(sub_value, dict) and not _is_table_form(sub_value):
                    raise ConfigError(
                        f"[mappings] {key}.{sub_key}: too many dots",
                        'keys are "table" or "schema.table"',
                    )
                flat[f"{key}.{sub_key}"] = sub_value
        else:
            flat[key] = value

    def substitute(key: str, value: Any) -> Any:
        if isinstance(value, str):
            return resolver.substitute(f"[mappings] {key}", value)[0]
        if isinstance(value, dict):
            return {k: resolver.substitute(f"[mappings.{key}] {k}", v)[0]
                    if isinstance(v, str) else v for k, v in value.items()}
        return value

    return {key: substitute(key, value) for key, value in flat.items()}


def _is_table_form(value: dict[str, Any]) -> bool:
    # A schema's tables are strings (or tables of options); options are named or not strings.
    return any(k in MAPPING_KEYS or not isinstance(v, (str, dict)) for k, v in value.items())


def _dsn_table(section: str, dsn: str) -> dict[str, Any]:
    """The settings a connection string carries, named as etl-config.toml names them."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"{section} DSN: {exc}", "pass a libpq connection string or URI"
        ) from None
    register_secret(params.get("password"))
    renames = {"dbname": "database", "host": "host", "user": "user", "password": "password",
               "sslmode": "sslmode", "sslrootcert": "sslrootcert", "sslcert": "sslcert",
               "sslkey": "sslkey"}
    ignored = {"application_name", "connect_timeout"}  # conninfo() sets its own
    unsupported = sorted(k for k in params if k not in renames and k not in ignored and k != "port")
    if unsupported:
        raise ConfigError(
            f"{section} DSN: unsupported parameter(s) {', '.join(unsupported)}",
            "the replicator only takes host, port, dbname, user, password, sslmode, "
            "sslrootcert, sslcert, sslkey",
        )
    table: dict[str, Any] = {
        "host": "", "database": "", "user": "", "password": "",
        **{renames[k]: str(v) for k, v in params.items() if k in renames},
    }
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    try:
        table["port"] = int(str(port))
    except ValueError:
        raise ConfigError(f"{section} DSN: port {port!r} is not a number", "fix the DSN") from None
    return table


def _unknown_error(section: str, unknown: list[str], known: list[str]) -> ConfigError:
    label = f"[{section}] unknown key" if section else "unknown section"
    label += "s" if len(unknown) > 1 else ""
    hint = did_you_mean(unknown, known)
    # A key that belongs to another section is a more useful pointer than a spelling guess.
    homes = []
    for key in unknown:
        for name, cls in _SECTIONS.items():
            if name != section and key in _keys(cls) and key not in _keys(ConnectionSettings):
                homes.append(f"{key} belongs in [{name}]")
                break
    if homes:
        hint = "; ".join(homes)
    return ConfigError(f"{label}: {', '.join(unknown)}", hint)
