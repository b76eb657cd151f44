"""Who may read and write the mirror: row-level security, the analytics policy, grants.

Every mirror table has row-level security enabled and one policy, the
deployment doc's "Analytics access only", written for the roles of
[destination] analytics_roles: ``for select to <roles> using (true)``. The
doc's ``using (auth.role() in (...))`` reads the JWT claim PostgREST sets, so
it is NULL for a direct database login (Superset's superset_readonly) and
would hide every row from it; naming the roles in ``to`` works for both ways
in (a login role and PostgREST's ``set role service_role``). Those roles get
SELECT and nothing else; every other privilege of every other role (PUBLIC,
and those default privileges hand out, as Supabase's do to anon and
authenticated: TRIGGER and REFERENCES too) is revoked. Only the owner (the
replicator's role, which RLS does not restrict) writes, and no one else may
put a trigger on a mirror table: it would run as the replicator's role.

`run` secures each table it creates in a mirror schema (mirror tables, their
history tables) in the transaction that creates it (a table added to the
publication later gets the same policy); `init` brings every existing one to
it, and `init` and `check` report what else is there (`findings`): a role
with more than that, a user trigger. Each step first reads the catalog and
changes only what differs, so a second `init` changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

POLICY = "Analytics access only"
# (table, trigger, function) of the invoice-to-memory trigger `init` creates in the
# mirror schema (replicator/sql/memory/): the one user trigger that belongs there.
MEMORY_TRIGGER = ("account_move", "invoice_to_memory", "on_invoice_insert")


def existing_roles(conn: psycopg.Connection[Any] | psycopg.Cursor[Any],
                   roles: Sequence[str]) -> list[str]:
    """Those of roles that exist, in the given order (a policy cannot name a missing one)."""
    if not roles:
        return []
    found = {r[0] for r in conn.execute(
        "select rolname from pg_roles where rolname = any(%s)", [list(roles)]).fetchall()}
    return [r for r in roles if r in found]


def secure_table(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], schema: str, name: str,
                 roles: Sequence[str]) -> list[str]:
    """RLS on, the policy for the roles that exist, SELECT for them, nothing for others.

    In the caller's transaction; returns what it changed, one line each (empty:
    nothing). Roles that do not exist are left out (`init` reports them; `run`
    logs them once per session).
    """
    table = sql.Identifier(schema, name)
    readers = existing_roles(conn, roles)
    row = conn.execute(
        "select c.oid, c.relrowsecurity, "
        "(select array_agg(r.rolname::text order by r.rolname) from pg_policy p "
        "  cross join unnest(p.polroles) pr(oid) join pg_roles r on r.oid = pr.oid "
        "  where p.polrelid = c.oid and p.polname = %s), "
        "exists (select 1 from pg_policy p where p.polrelid = c.oid and p.polname = %s) "
        "from pg_class c where c.oid = %s::regclass",
        [POLICY, POLICY, table.as_string(conn)]).fetchone()
    assert row is not None  # the regclass cast raises if the table is missing
    oid, rls_on, policy_roles, has_policy = row
    changed = False
    if not rls_on:
        conn.execute(sql.SQL("alter table {} enable row level security").format(table))
        changed = True
    role_list = sql.SQL(", ").join(sql.Identifier(r) for r in readers)
    if readers and not has_policy:
        conn.execute(sql.SQL("create policy {} on {} for select to {} using (true)").format(
            sql.Identifier(POLICY), table, role_list))
        changed = True
    elif readers and sorted(policy_roles or []) != sorted(readers):
        conn.execute(sql.SQL("alter policy {} on {} to {}").format(
            sql.Identifier(POLICY), table, role_list))
        changed = True
    revoked, granted = restrict_privileges(conn, oid, table, readers)
    if changed or granted:
        revoked.insert(0, f"row-level security, policy \"{POLICY}\", grants")
    return revoked


def _privileges(conn: psycopg.Connection[Any] | psycopg.Cursor[Any],
                oid: int) -> list[tuple[str, str, bool, bool]]:
    """(grantee, privilege, grantable, on a column) held on a relation by all but its owner.

    Column privileges count too: a column's INSERT or UPDATE writes the table.
    """
    rows = conn.execute(
        "select coalesce(g.rolname, 'public'), a.privilege_type, a.is_grantable, false "
        "from pg_class c cross join lateral aclexplode(c.relacl) a "
        "left join pg_roles g on g.oid = a.grantee where c.oid = %(oid)s "
        "and a.grantee <> c.relowner "
        "union select coalesce(g.rolname, 'public'), a.privilege_type, a.is_grantable, true "
        "from pg_attribute t join pg_class c on c.oid = t.attrelid "
        "cross join lateral aclexplode(t.attacl) a left join pg_roles g on g.oid = a.grantee "
        "where t.attrelid = %(oid)s and t.attnum > 0 and a.grantee <> c.relowner "
        "order by 1, 4, 2", {"oid": oid}).fetchall()
    return [(g, p, bool(o), bool(c)) for g, p, o, c in rows]


def extra_privileges(held: list[tuple[str, str, bool, bool]],
                     readers: Sequence[str]) -> dict[str, list[str]]:
    """grantee -> what it holds beyond a reader's SELECT (all that anyone but the owner may)."""
    out: dict[str, list[str]] = {}
    for grantee, privilege, grantable, on_column in held:
        if grantee in readers and privilege == "SELECT" and not grantable:
            continue
        what = privilege + (" on a column" if on_column else "") + \
            (" with grant option" if grantable else "")
        if what not in out.setdefault(grantee, []):
            out[grantee].append(what)
    return out


def restrict_privileges(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], oid: int,
                        relation: sql.Composable,
                        readers: Sequence[str]) -> tuple[list[str], list[str]]:
    """Every privilege revoked from everyone but the owner, then SELECT for the readers.

    Default privileges (Supabase's for anon and authenticated on an exposed
    schema) give roles INSERT, TRIGGER, REFERENCES... on each table the
    replicator creates, and a trigger of theirs would run as the replicator's
    role at the next applied change. The replicator alone writes; readers
    read. Returns (one line per grantee whose privileges went, the readers
    newly granted SELECT).
    """
    held = _privileges(conn, oid)
    revoked = []
    again = []
    for grantee, what in extra_privileges(held, readers).items():
        role = sql.SQL("public") if grantee == "public" else sql.Identifier(grantee)
        # cascade: what the grantee passed on with a grant option goes with it.
        conn.execute(sql.SQL("revoke all on {} from {} cascade").format(relation, role))
        revoked.append(f"revoked {', '.join(what)} from {grantee}: only the replicator "
                       "writes" + (", readers select" if readers else ""))
        if grantee in readers:
            again.append(grantee)
    having = {g for g, p, _o, on_column in held if p == "SELECT" and not on_column}
    missing = [r for r in readers if r not in having]
    if missing or again:
        conn.execute(sql.SQL("grant select on {} to {}").format(
            relation, sql.SQL(", ").join(
                sql.Identifier(r) for r in [*again, *(m for m in missing if m not in again)])))
    return revoked, missing


def grant_select(conn: psycopg.Connection[Any], relation: sql.Composable,
                 readers: Sequence[str]) -> bool:
    """SELECT on a view for the readers that lack it; True if anything changed."""
    missing = [r for r in readers if not conn.execute(
        "select has_table_privilege(%s, %s, 'select')",
        [r, relation.as_string(conn)]).fetchone()[0]]  # type: ignore[index]
    if missing:
        conn.execute(sql.SQL("grant select on {} to {}").format(
            relation, sql.SQL(", ").join(sql.Identifier(r) for r in missing)))
    return bool(missing)


def grant_usage(conn: psycopg.Connection[Any], schema: str, readers: Sequence[str]) -> bool:
    missing = [r for r in readers if not conn.execute(
        "select has_schema_privilege(%s, %s, 'usage')", [r, schema]).fetchone()[0]]  # type: ignore[index]
    if missing:
        conn.execute(sql.SQL("grant usage on schema {} to {}").format(
            sql.Identifier(schema), sql.SQL(", ").join(sql.Identifier(r) for r in missing)))
    return bool(missing)


def grant_execute(conn: psycopg.Connection[Any], function: str,
                  readers: Sequence[str]) -> bool:
    """EXECUTE on a function (signature text, e.g. "odoo_mirror.f()") for readers lacking it."""
    missing = [r for r in readers if not conn.execute(
        "select has_function_privilege(%s, %s, 'execute')", [r, function]).fetchone()[0]]  # type: ignore[index]
    if missing:
        conn.execute(sql.SQL("grant execute on function {} to {}").format(
            sql.SQL(function), sql.SQL(", ").join(sql.Identifier(r) for r in missing)))
    return bool(missing)


def findings(conn: psycopg.Connection[Any], schemas: Sequence[str], readers: Sequence[str],
             memory_trigger: tuple[str, str, str] | None = MEMORY_TRIGGER) -> list[str]:
    """One line per thing on the tables of the mirror schemas that secure_table would not
    leave: row-level security off, a role holding more than a reader's SELECT, a user
    trigger (it runs as the replicator's role at every change applied to the table).

    memory_trigger: (table, trigger, function) of one not reported.
    """
    out = []
    tables = conn.execute(
        "select c.oid, n.nspname, c.relname, c.relrowsecurity from pg_class c "
        "join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = any(%s) and c.relkind in ('r', 'p') order by 2, 3",
        [list(schemas)]).fetchall()
    for oid, schema, name, rls_on in tables:
        where = f"{schema}.{name}"
        if not rls_on:
            out.append(f"{where}: row-level security is off, every role with a grant reads "
                       "every row: run `replicator init` to turn it on")
        for grantee, what in extra_privileges(_privileges(conn, oid), readers).items():
            out.append(f"{where}: role {grantee} holds {', '.join(what)}; only the "
                       "replicator may write and readers only select: run `replicator init` "
                       "to revoke it")
    triggers = conn.execute(
        "select n.nspname, c.relname, t.tgname, format('%%I.%%I(%%s)', pn.nspname, p.proname, "
        "pg_get_function_identity_arguments(p.oid)), "
        "pg_get_userbyid(p.proowner), p.prosecdef, p.pronamespace = n.oid, p.proname "
        "from pg_trigger t "
        "join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace "
        "join pg_proc p on p.oid = t.tgfoid join pg_namespace pn on pn.oid = p.pronamespace "
        "where n.nspname = any(%s) and not t.tgisinternal order by 1, 2, 3",
        [list(schemas)]).fetchall()
    for schema, name, trigger, function, owner, definer, beside, proname in triggers:
        if memory_trigger is not None and beside and (name, trigger, proname) == memory_trigger:
            continue
        runs_as = f"as its owner {owner}" if definer else "as the replicator's role"
        out.append(f"{schema}.{name}: user trigger {trigger} calls {function} {runs_as} at "
                   "every change the replicator applies (and a failing one stops it): drop "
                   f"it (drop trigger {sql.Identifier(trigger).as_string(conn)} on "
                   f"{sql.Identifier(schema, name).as_string(conn)}) unless you trust it")
    return out
