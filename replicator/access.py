"""Who may read and write the mirror: row-level security, the analytics policy, grants.

Every mirror table has row-level security enabled and one policy, the
deployment doc's "Analytics access only", written for the roles of
[destination] analytics_roles: ``for select to <roles> using (true)``. The
doc's ``using (auth.role() in (...))`` reads the JWT claim PostgREST sets, so
it is NULL for a direct database login (Superset's superset_readonly) and
would hide every row from it; naming the roles in ``to`` works for both ways
in (a login role and PostgREST's ``set role service_role``). Those roles get
SELECT; nobody but the owner (the replicator's role, which RLS does not
restrict) may insert, update, delete or truncate.

`run` secures each mirror table it creates in the transaction that creates
it (a table added to the publication later gets the same policy); `init`
brings every existing one to it. Each step first reads the catalog and
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
# What no reader (and not PUBLIC) may hold on a mirror table.
WRITES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")


def existing_roles(conn: psycopg.Connection[Any] | psycopg.Cursor[Any],
                   roles: Sequence[str]) -> list[str]:
    """Those of roles that exist, in the given order (a policy cannot name a missing one)."""
    if not roles:
        return []
    found = {r[0] for r in conn.execute(
        "select rolname from pg_roles where rolname = any(%s)", [list(roles)]).fetchall()}
    return [r for r in roles if r in found]


def secure_table(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], schema: str, name: str,
                 roles: Sequence[str]) -> bool:
    """RLS on, the policy for the roles that exist, SELECT for them, no writes for others.

    In the caller's transaction; True if anything changed. Roles that do not
    exist are left out (`init` reports them; `run` logs them once per session).
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
    held = conn.execute(
        "select coalesce(g.rolname, 'public'), a.privilege_type from pg_class c "
        "cross join lateral aclexplode(c.relacl) a left join pg_roles g on g.oid = a.grantee "
        "where c.oid = %s and a.grantee <> c.relowner", [oid]).fetchall()
    for role in ["public", *readers]:
        writes = sorted({p for g, p in held if g == role and p in WRITES})
        if writes:
            grantee = sql.SQL("public") if role == "public" else sql.Identifier(role)
            conn.execute(sql.SQL("revoke {} on {} from {}").format(
                sql.SQL(", ").join(sql.SQL(p) for p in writes), table, grantee))
            changed = True
    missing = [r for r in readers if (r, "SELECT") not in held]
    if missing:
        conn.execute(sql.SQL("grant select on {} to {}").format(
            table, sql.SQL(", ").join(sql.Identifier(r) for r in missing)))
        changed = True
    return changed


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
