"""`replicator drop`: remove a pipeline: its slot on the source, its rows in the state.

As PeerDB's DROP MIRROR, but asked twice: without --yes it only says what it would
remove. The mirror tables stay unless --mirror asks for them too (analysts' views over
them are never dropped with them: a view in the way stops that part, and says which). The
publication is the operator's and stays. Refused while a replicator runs the pipeline: the
command takes the pipeline's lease first, so no `run` starts writing while it removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from ..classify import classify
from ..config.settings import Config, ConnectionSettings
from ..destination import lease, state
from ..errors import ErrorKind, ReplicatorError
from ..source import catalog

# How long the lease this command takes lasts if it dies before removing it: a `run`
# started meanwhile waits that long as a standby, then takes over.
LEASE_SECONDS = 120.0


@dataclass
class Plan:
    """What the pipeline has, as found before anything is removed."""

    slot: str
    publication: str
    slot_exists: bool = False
    slot_pid: int | None = None          # the source process streaming from it
    retained_bytes: int | None = None    # WAL the slot keeps on the source
    state_rows: dict[str, int] = field(default_factory=dict)   # state table -> rows
    mirror: list[tuple[str, str]] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return self.slot_exists or any(self.state_rows.values())


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024 / 1024:,.1f} MB"


def slot_line(p: Plan) -> str:
    return (f"replication slot {p.slot} on the source (it keeps {_mb(p.retained_bytes)} of "
            "WAL there)")


def state_line(p: Plan) -> str:
    parts = ", ".join(f"{n} in {name}" for name, n in p.state_rows.items() if n)
    return f"the pipeline's rows in the state schema ({parts})"


def mirror_line(p: Plan) -> str:
    return "the mirror tables " + (", ".join(f"{s}.{t}" for s, t in p.mirror + p.history)
                                   or "(none left)")


def describe(p: Plan, drop_mirror: bool) -> list[str]:
    """What drop(p, drop_mirror) removes, one line per part."""
    lines = [slot_line(p)] if p.slot_exists else []
    if any(p.state_rows.values()):
        lines.append(state_line(p))
    if drop_mirror:
        lines.append(mirror_line(p))
    return lines


def plan(config: Config) -> Plan:
    src, dst = config.source, config.destination
    p = Plan(slot=src.slot, publication=src.publication)
    with _connect(src) as source:
        found = catalog.slot_holder(source, src.slot)
        if found is not None:
            p.slot_exists = True
            p.slot_pid, p.retained_bytes = found
    with _connect(dst) as dest:
        if state.exists(dest, dst.state_schema):
            p.state_rows = state.pipeline_rows(dest, dst.state_schema, src.slot)
            p.mirror = state.mirror_tables(dest, dst.state_schema, src.slot)
            p.history = _history_tables(dest, config, p.mirror)
    return p


def drop(config: Config, drop_mirror: bool) -> list[str]:
    """Remove the pipeline (and with ``drop_mirror`` its mirror tables); what was removed,
    one line per part (none: there was nothing)."""
    dst = config.destination
    p = plan(config)
    if p.slot_pid is not None:
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP,
            f"replication slot {p.slot} is in use on the source (process {p.slot_pid} "
            "streams from it): nothing was removed",
            "stop the replicator that reads it first (`replicator status` shows the writer)")
    removed: list[str] = []
    with _connect(dst) as dest:
        views = _views_over(dest, p.mirror + p.history) if drop_mirror else []
        if views:
            raise ReplicatorError(
                ErrorKind.CONFIG,
                f"--mirror: {', '.join(views)} read(s) the mirror tables, and a view is never "
                "dropped with them: nothing was removed",
                "drop those views first (or drop without --mirror: the tables stay)")
        has_state = state.exists(dest, dst.state_schema)
        claim = lease.Lease(dst.conninfo(), dst.state_schema, p.slot, LEASE_SECONDS)
        if has_state:
            try:
                # An older state (before 006_exit_reasons, say) as `run` would find it.
                state.setup(dest, dst.state_schema)
            except psycopg.Error as exc:
                raise classify(exc, settings=dst) from None
            holder = claim.try_take(dest)
            if holder is not None:
                raise ReplicatorError(
                    ErrorKind.SUPERSEDED,
                    f"pipeline {p.slot!r} is running: {holder.describe()} holds its lease "
                    f"for {max(0.0, holder.expires_in):.0f} s more: nothing was removed",
                    "stop it first (a stopped replicator lets go at once; a killed one's "
                    "lease runs out after [destination] lease_timeout)")
        try:
            if p.slot_exists:
                _drop_slot(config, p.slot)
                removed.append(slot_line(p))
            if has_state:
                assert claim.fence is not None   # try_take took it
                with dest.transaction():
                    # Under the lease (a standby `run` waits meanwhile), the state and the
                    # mirror together: no new pipeline writes into tables being dropped.
                    claim.fence.check(dest)
                    state.delete_pipeline(dest, dst.state_schema, p.slot)
                    if drop_mirror:
                        for schema, table in p.history + p.mirror:
                            dest.execute(sql.SQL("drop table {}").format(
                                sql.Identifier(schema, table)))
                if any(p.state_rows.values()):
                    removed.append(state_line(p))
                if drop_mirror and (p.mirror or p.history):
                    removed.append(mirror_line(p))
        except psycopg.errors.DependentObjectsStillExist as exc:
            # A view made since the look above: the state is as it was, the slot is gone.
            done = "; ".join(removed) or "nothing"
            raise ReplicatorError(
                ErrorKind.CONFIG,
                f"removed {done}; the pipeline's state and mirror tables were kept: "
                f"{exc.diag.message_detail or exc.diag.message_primary}",
                "drop the views over them, then drop --mirror again") from None
        finally:
            if has_state and claim.fence is not None:
                # The lease row stays, released, with its generation: a standby takes over
                # at once and starts a new pipeline, and no writer of an older generation
                # can pass the fence of a row numbered anew.
                claim.release(lambda: _connect(dst), reason="the pipeline was dropped "
                              "(`replicator drop`)", announce=False)
    return removed


def _views_over(dest: psycopg.Connection, tables: list[tuple[str, str]]) -> list[str]:
    """The views (and materialized views) that read any of the tables, by name."""
    if not tables:
        return []
    names = [sql.Identifier(s, t).as_string(dest) for s, t in tables]
    return [r[0] for r in dest.execute(
        "select distinct v.oid::regclass::text from pg_depend d "
        "join pg_rewrite r on r.oid = d.objid and d.classid = 'pg_rewrite'::regclass "
        "join pg_class v on v.oid = r.ev_class "
        "where d.refclassid = 'pg_class'::regclass and v.oid <> d.refobjid "
        "and d.refobjid = any (select to_regclass(n) from unnest(%s::text[]) n) "
        "order by 1", [names]).fetchall()]


def _drop_slot(config: Config, slot: str) -> None:
    src = config.source
    with _connect(src) as source:
        try:
            source.execute("select pg_drop_replication_slot(%s)", [slot])
        except psycopg.errors.UndefinedObject:
            pass      # dropped meanwhile: what was wanted
        except psycopg.errors.ObjectInUse:
            raise ReplicatorError(
                ErrorKind.SOURCE_SETUP,
                f"replication slot {slot} came into use on the source: nothing was removed",
                "stop the process that reads it, then drop again") from None
        except psycopg.Error as exc:
            raise classify(exc, settings=src) from None


def _history_tables(dest: psycopg.Connection, config: Config,
                    mirror: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The change histories beside mirror tables ([mappings] history = true) that exist."""
    wanted = {f"{s}.{t}" for s, t in (config.target(*key.split(".", 1))
                                      for key, o in config.mapping_options.items() if o.history)}
    found = []
    for schema, table in mirror:
        if f"{schema}.{table}" in wanted:
            row = dest.execute("select to_regclass(%s) is not null", [
                sql.Identifier(schema, table + "_history").as_string(dest)]).fetchone()
            if row and row[0]:
                found.append((schema, table + "_history"))
    return found


def _connect(side: ConnectionSettings) -> psycopg.Connection:
    try:
        return psycopg.connect(side.conninfo(), autocommit=True, prepare_threshold=None)
    except psycopg.Error as exc:
        raise classify(exc, settings=side) from None
