"""`replicator init`: what the deployment doc set up by hand in Supabase, done and versioned.

In order, each step only if something differs (a second init changes nothing):

1. the analytics roles ([destination] analytics_roles) exist: created NOLOGIN
   if this role may create roles, else one error line saying how;
2. the state schema and its migrations (as `run`), the freshness table;
3. the mirror schema and the mirror tables, empty, from the source catalog by
   the code path `run` uses (state pending: `run` copies them), so that the
   views have their tables before the first copy;
4. row-level security, the "Analytics access only" policy and the grants on
   every table of the mirror schemas (destination/access.py): readers SELECT, every other
   privilege of every other role revoked;
5. the mirror component's migrations (replicator/sql/mirror/: the views and
   get_pending_expenses), and with [destination] memory_triggers the memory
   component's (replicator/sql/memory/: ipai_memory and the invoice trigger);
6. USAGE, SELECT and EXECUTE on the schemas, views, functions and the
   freshness view for the analytics roles (on the mirror's views nothing
   else for anyone); ipai_memory's tables secured as the mirror's;
7. one warning line for each user trigger on a mirror table but the memory
   trigger: it runs as the replicator's role (init does not drop it).

Safe beside a running `run`: every step is its own short transaction holding
at most one mirror table's lock, migrations take the state schema's advisory
lock, and a mirror table `run` creates meanwhile is left to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from ..classify import classify, classify_connect
from ..config.settings import Config
from ..destination import access, lease, state
from ..destination.mirror_ddl import create_mirror_sql, mirror_exists
from ..errors import ConfigError, ErrorKind, ReplicatorError
from ..pipeline.preflight import discover_tables
from ..schema import MirrorTable, column_origins

log = logging.getLogger(__name__)

MEMORY_SCHEMA = "ipai_memory"
FUNCTIONS = ("get_pending_expenses()",)


@dataclass
class InitResult:
    say: Callable[[str], None] = print
    changes: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        # Said as it is done: a step that fails later leaves the earlier ones reported.
        self.changes.append(what)
        self.say(f"  {what}")


def init(config: Config, say: Callable[[str], None] = print) -> InitResult:
    """Set up (or bring up to date) the mirror's schemas, access, views and triggers."""
    dst = config.destination
    res = InitResult(say)
    try:
        # prepare_threshold=None: the Supabase pooler (transaction mode) cannot keep
        # prepared statements.
        dest = psycopg.connect(dst.conninfo(), autocommit=True, prepare_threshold=None)
    except psycopg.OperationalError as exc:
        raise classify_connect(exc, dst.conninfo(), settings=dst) from None
    with dest:
        try:
            readers = _roles(dest, list(dst.analytics_roles), res)
            for v in state.setup(dest, dst.state_schema):
                res.add(f"state schema {dst.state_schema}: migration {v:03d}")
            for v in state.setup_component(dest, dst.state_schema, "freshness"):
                res.add(f"freshness: migration {v:03d}")
            fence = lease.observe(dest, dst.state_schema, config.source.slot,
                                  "`replicator init`")
            schemas = _mirror_tables(config, dest, readers, res, fence)
            _migrations(config, dest, res)
            _grants(config, dest, readers, res)
            # What init leaves alone but someone should look at (a user trigger).
            for line in access.findings(dest, schemas, readers):
                say(f"  warning: {line}")
        except psycopg.Error as exc:
            raise classify(exc, settings=dst) from None
    say(f"init: {len(res.changes)} change(s) in {dst.describe()}" if res.changes
        else f"init: {dst.describe()} is up to date, nothing changed")
    return res


def _roles(dest: psycopg.Connection, roles: list[str], res: InitResult) -> list[str]:
    present = access.existing_roles(dest, roles)
    missing = [r for r in roles if r not in present]
    if not missing:
        return roles
    row = dest.execute("select rolsuper or rolcreaterole from pg_roles "
                       "where rolname = current_user").fetchone()
    if not (row and row[0]):
        names = ", ".join(missing)
        raise ConfigError(
            f"[destination] analytics_roles: role(s) {names} do not exist in the destination, "
            "and this role may not create roles",
            f"create them as an administrator (CREATE ROLE {missing[0]} LOGIN PASSWORD '...'), "
            "or remove them from analytics_roles; then run init again")
    for r in missing:
        dest.execute(sql.SQL("create role {} nologin").format(sql.Identifier(r)))
        res.add(f"role {r} created NOLOGIN: for a direct login (Superset) give it one: "
                f"ALTER ROLE {r} LOGIN PASSWORD '...'")
    return roles


def _mirror_tables(config: Config, dest: psycopg.Connection, readers: list[str],
                   res: InitResult, fence: lease.Fence) -> list[str]:
    """Creates the missing mirror tables, secures every table; returns the mirror schemas."""
    src, dst = config.source, config.destination
    try:
        catalog = psycopg.connect(src.conninfo(), autocommit=True, prepare_threshold=None)
    except psycopg.OperationalError as exc:
        raise classify_connect(exc, src.conninfo(), settings=src) from None
    with catalog:
        tables = discover_tables(catalog, config)
        binary = all(c.builtin for t in tables for c in t.columns)
        mirrors = []
        for st in tables:
            target = config.target(st.schema, st.name)
            # With its [mappings] options: no excluded column, _deleted_at if soft deleted.
            mirrors.append(MirrorTable(st, *target, state_schema=dst.state_schema,
                                       binary=binary, options=config.options(st.schema, st.name)))
        schemas = sorted({dst.schema, *(m.dest_schema for m in mirrors)})
        for schema in schemas:
            if dest.execute("select to_regnamespace(%s) is null",
                            [sql.Identifier(schema).as_string(dest)]).fetchone()[0]:  # type: ignore[index]
                dest.execute(sql.SQL("create schema {}").format(sql.Identifier(schema)))
                res.add(f"schema {schema} created")
        for t in mirrors:
            if mirror_exists(dest, t):
                continue
            origins = column_origins(catalog, t.source.oid, t.columns)
            try:
                with dest.transaction():
                    # Not beside a `run` that took the pipeline over since init started.
                    fence.check(dest)
                    # As the first copy creates it (no key until the rows are in), so
                    # the copy into it loads as fast as into a table of its own.
                    for stmt in create_mirror_sql(t, with_key=False, if_not_exists=False):
                        dest.execute(stmt)
                    access.secure_table(dest, t.dest_schema, t.dest_name, readers)
                    state.record_column_attnums(
                        dest, dst.state_schema, src.slot, t.source.qualname,
                        {o.attnum: c.name for c, o in zip(t.columns, origins)
                         if o.attnum is not None})
                    # An empty mirror table is never synced, whatever the state said.
                    state.set_table(dest, dst.state_schema, src.slot, t, state.PENDING)
            except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
                continue   # `run` created it meanwhile: its copy fills it
            res.add(f"mirror table {t.qualname} created (empty; `run` copies it)")
    rows = dest.execute(
        "select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = any(%s) and c.relkind in ('r', 'p') order by 1, 2",
        [schemas]).fetchall()
    for schema, name in rows:
        # One table per transaction: never two mirror tables' locks at once
        # while `run` writes them (no deadlock with a batch).
        with dest.transaction():
            for what in access.secure_table(dest, schema, name, readers):
                res.add(f"{schema}.{name}: {what}")
    return schemas


def _migrations(config: Config, dest: psycopg.Connection, res: InitResult) -> None:
    dst = config.destination
    names = {"mirror": dst.schema}
    components = ["mirror"]
    if dst.memory_triggers:
        table = sql.Identifier(dst.schema, "account_move").as_string(dest)
        if dest.execute("select to_regclass(%s) is null", [table]).fetchone()[0]:  # type: ignore[index]
            raise ConfigError(
                f"[destination] memory_triggers: the mirror has no table {table} for the "
                "invoice trigger",
                "add account_move to the publication (and [mappings]), or set "
                "memory_triggers = false")
        components.append("memory")
    for component in components:
        try:
            ran = state.setup_component(dest, dst.state_schema, component, names)
        except psycopg.errors.RaiseException as exc:
            raise ReplicatorError(
                ErrorKind.CONFIG, f"{component} migrations: {exc.diag.message_primary or exc}",
                f"add the columns to the existing {MEMORY_SCHEMA} tables (see "
                f"replicator/sql/memory/), or set memory_triggers = false") from None
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise ReplicatorError(
                ErrorKind.CONFIG,
                f"the {component} migrations do not fit the mirror tables: "
                f"{exc.diag.message_primary or exc}",
                f"the views need the six Odoo 17 tables under their own names in schema "
                f"{dst.schema} (publication and [mappings])" if component == "mirror" else
                f"the invoice trigger needs {dst.schema}.account_move with Odoo 17's "
                f"columns and {MEMORY_SCHEMA} as in replicator/sql/memory/") from None
        for v in ran:
            res.add(f"{component}: migration {v:03d}")


def _secure_memory(dest: psycopg.Connection, readers: list[str], res: InitResult) -> None:
    """ipai_memory's tables as the mirror's: RLS, the policy, SELECT for the readers,
    nothing for anyone else (an agent's memory is not for every role with a login)."""
    for name in ("sessions", "chunks"):
        owner = dest.execute(
            "select pg_get_userbyid(c.relowner), pg_has_role(c.relowner, 'usage') "
            "from pg_class c where c.oid = %s::regclass",
            [sql.Identifier(MEMORY_SCHEMA, name).as_string(dest)]).fetchone()
        assert owner is not None  # the memory migrations made it or checked it exists
        if not owner[1]:
            # A deployment's own ipai_memory: only its owner can change it. (Owned, RLS
            # does not restrict the trigger's writes: it runs as the replicator's role.)
            res.say(
                f"  warning: {MEMORY_SCHEMA}.{name} is owned by {owner[0]}, so init cannot "
                "secure it: "
                f"as {owner[0]}, run `alter table {MEMORY_SCHEMA}.{name} enable row level "
                f"security` and revoke what roles but the readers hold on it")
            continue
        with dest.transaction():
            for what in access.secure_table(dest, MEMORY_SCHEMA, name, readers):
                res.add(f"{MEMORY_SCHEMA}.{name}: {what}")


def _grants(config: Config, dest: psycopg.Connection, readers: list[str],
            res: InitResult) -> None:
    dst = config.destination
    views = dest.execute(
        "select c.oid, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = %s and c.relkind in ('v', 'm') order by 2", [dst.schema]).fetchall()
    for oid, name in views:
        # Readers select, nobody else holds anything (default privileges hand out more).
        with dest.transaction():
            revoked, granted = access.restrict_privileges(
                dest, oid, sql.Identifier(dst.schema, name), readers)
        for what in revoked:
            res.add(f"{dst.schema}.{name}: {what}")
        if granted:
            res.add(f"select on view {dst.schema}.{name}")
    if dst.memory_triggers:
        _secure_memory(dest, readers, res)
    if not readers:
        return
    if access.grant_usage(dest, dst.schema, readers):
        res.add(f"usage on schema {dst.schema}")
    for fn in FUNCTIONS:
        signature = sql.Identifier(dst.schema).as_string(dest) + "." + fn
        if access.grant_execute(dest, signature, readers):
            res.add(f"execute on {dst.schema}.{fn}")
    if access.grant_usage(dest, dst.state_schema, readers):
        res.add(f"usage on schema {dst.state_schema}")
    if access.grant_select(dest, sql.Identifier(dst.state_schema, "freshness"), readers):
        res.add(f"select on view {dst.state_schema}.freshness")
    if dst.memory_triggers:
        if access.grant_usage(dest, MEMORY_SCHEMA, readers):
            res.add(f"usage on schema {MEMORY_SCHEMA}")
