"""Would a failover of the source keep the slot? What `check` and `status` say about it.

PostgreSQL 17 added failover slots: a logical slot created with FAILOVER is copied to
standbys that run with sync_replication_slots = on, and the copy can be used once the
standby is promoted. Two things must hold for the mirror to survive a failover unharmed:

- the standby has a copy of the slot (synced = true on the standby), or the new primary
  has no slot to resume from and the mirror needs `replicator resync --all`;
- the replicator never receives a transaction the standby does not have yet: the primary's
  synchronized_standby_slots names the standby's physical slot, so logical walsenders wait
  for it. Without that, a failover can lose at the source what the mirror already applied.

Nothing here changes anything: each finding names the step that fixes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..config.settings import SourceSettings
from ..lsn import parse_lsn
from .catalog import Slot, replication_slot
from .connection import quote_ident

log = logging.getLogger(__name__)

FAILOVER_SLOTS_VERSION = 170000

PRIMARY_SQL = "select current_setting('synchronized_standby_slots', true)"
STANDBY_SLOTS_SQL = """
select slot_name::text, slot_type, active from pg_replication_slots where slot_name = any(%s)
"""
STANDBY_SQL = """
select pg_is_in_recovery(), current_setting('sync_replication_slots', true),
       current_setting('hot_standby_feedback'), current_setting('primary_slot_name'),
       (select setting from pg_settings where name = 'primary_conninfo')
"""
SYNCED_SLOT_SQL = """
select (to_jsonb(s) ->> 'synced')::boolean, confirmed_flush_lsn::text,
       to_jsonb(s) ->> 'invalidation_reason', temporary
from pg_replication_slots s where slot_name = %s
"""


@dataclass
class Readiness:
    """``ready``: a failover keeps the slot and nothing the mirror has (None: not known, no
    standby to ask). ``summary`` is one line; ``findings`` each say what to change."""
    ready: bool | None
    summary: str
    findings: list[str] = field(default_factory=list)


def alter_step(settings: SourceSettings, slot: str) -> str:
    """The command converting an existing slot into a failover slot (the walsender's own)."""
    return (f"psql \"dbname={settings.database} replication=database\" -c "
            f"'ALTER_REPLICATION_SLOT {quote_ident(slot)} (FAILOVER true)'")


def primary(catalog: psycopg.Connection,
            settings: SourceSettings) -> tuple[list[str], list[str], Slot | None]:
    """What is missing on a 17+ primary; with the names in its synchronized_standby_slots
    and the slot (None: not created yet)."""
    slot_name = settings.slot
    findings = []
    slot = replication_slot(catalog, slot_name)
    if slot is not None and not slot.failover:
        findings.append(
            f"slot {slot_name} is not a failover slot (made before PostgreSQL 17, or by "
            "hand): no standby gets a copy of it. With no replicator running, convert it "
            f"on the primary: {alter_step(settings, slot_name)}")
    row = catalog.execute(PRIMARY_SQL).fetchone()
    names = [n.strip().strip('"') for n in (row[0] if row and row[0] else "").split(",")
             if n.strip()]
    if not names:
        findings.append(
            "synchronized_standby_slots is not set on the primary: the replicator may be sent "
            "transactions no standby has yet, which a failover loses at the source but not "
            "in the mirror. Set it to the standby's physical slot: alter system set "
            "synchronized_standby_slots = '<slot>'; select pg_reload_conf()")
    found = {n: (kind, active) for n, kind, active in
             catalog.execute(STANDBY_SLOTS_SQL, [names]).fetchall()} if names else {}
    for n in names:
        kind, active = found.get(n, (None, False))
        if kind is None:
            findings.append(f"synchronized_standby_slots names {n}, which is no slot on "
                            "the primary: logical decoding waits for it, so the "
                            "replicator stalls; create it or take it out of the setting")
        elif kind != "physical":
            findings.append(f"synchronized_standby_slots names {n}, a {kind} slot: it "
                            "must name the standbys' physical slots")
        elif not active:
            findings.append(f"synchronized_standby_slots names {n}, whose standby is not "
                            "connected: the replicator receives nothing until it is (or "
                            "until it is taken out of the setting)")
    return findings, names, slot


def standby(conn: psycopg.Connection, settings: SourceSettings, names: list[str],
            primary_slot: Slot | None) -> tuple[list[str], int | None]:
    """What is missing on the standby for it to keep a usable copy of the slot; and how far
    its copy trails the primary's slot, in bytes (None: no copy to compare)."""
    where = f"[source] standby_host {settings.standby_host}"
    row = conn.execute(STANDBY_SQL).fetchone()
    assert row is not None   # a select without from: one row
    in_recovery, sync_slots, feedback, primary_slot_name, conninfo = row
    if not in_recovery:
        return [f"{where} is not a standby (pg_is_in_recovery() is false): point it at "
                "one"], None
    findings = []
    if sync_slots != "on":
        findings.append(f"{where} has sync_replication_slots {sync_slots or 'unknown'}: "
                        "set sync_replication_slots = on there")
    if feedback != "on":
        findings.append(f"{where} has hot_standby_feedback off: set it on there (the slot "
                        "copy needs the catalog rows the primary would otherwise vacuum)")
    if not primary_slot_name:
        findings.append(f"{where} streams without a physical slot: set primary_slot_name "
                        "there, and name that slot in the primary's synchronized_standby_slots")
    elif names and primary_slot_name not in names:
        findings.append(f"{where} streams through slot {primary_slot_name}, which the "
                        "primary's synchronized_standby_slots does not name: add it there")
    if conninfo is not None and "dbname" not in psycopg.conninfo.conninfo_to_dict(conninfo):
        findings.append(f"{where} has no dbname in primary_conninfo: slot synchronization "
                        "needs one; add dbname=<the Odoo database> there")
    slot_name = settings.slot
    copy = conn.execute(SYNCED_SLOT_SQL, [slot_name]).fetchone()
    if copy is None:
        findings.append(f"{where} has no copy of slot {slot_name} yet: it appears once the "
                        "slot is a failover slot and the standby has caught up with it (its "
                        "log says why not)")
        return findings, None
    synced, confirmed, invalidated, temporary = copy
    if invalidated is not None:
        findings.append(f"{where} has an invalidated copy of slot {slot_name} "
                        f"({invalidated}): a failover would need `replicator resync --all`")
    elif not synced or temporary:
        findings.append(f"{where} has a slot {slot_name} that is not a synced copy yet")
    behind = None
    if confirmed is not None and primary_slot is not None and primary_slot.confirmed:
        behind = max(0, parse_lsn(primary_slot.confirmed) - parse_lsn(confirmed))
    return findings, behind


def _not_ready(findings: list[str]) -> Readiness:
    return Readiness(False, "a failover of the source may cost the slot or the mirror's "
                     f"agreement with it ({len(findings)} finding(s))", findings)


def readiness(catalog: psycopg.Connection, settings: SourceSettings,
              connect_options: str = "") -> Readiness:
    """Whether a failover would keep the slot: the primary's side, and the standby's when
    [source] standby_host names it (connected to with the source's user and password)."""
    version = catalog.info.server_version
    if version < FAILOVER_SLOTS_VERSION:
        return Readiness(False, f"PostgreSQL {version // 10000} has no failover slots: a "
                         f"failover of the source loses slot {settings.slot}, and the mirror "
                         "then needs `replicator resync --all` (PostgreSQL 17+ keeps the slot)")
    findings, names, slot = primary(catalog, settings)
    if not settings.standby_host:
        if findings:
            return _not_ready(findings)
        kind = "is" if slot is not None else "will be created as"
        return Readiness(None, f"slot {settings.slot} {kind} a failover slot and the primary "
                         f"waits for {', '.join(names)} (set [source] standby_host to check "
                         "the standby's copy)")
    host, port = settings.standby_hosts[0]
    extra: dict[str, Any] = {"host": host, "port": port, "target_session_attrs": None}
    if connect_options:
        extra["options"] = connect_options
    try:
        conn = psycopg.connect(settings.conninfo(**extra), autocommit=True,
                               prepare_threshold=None)
    except psycopg.Error as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        findings.append(f"cannot connect to [source] standby_host {settings.standby_host}: "
                        f"{message}")
        return Readiness(None, "whether a failover keeps the slot is not known: the standby "
                         "cannot be reached", findings)
    with conn:
        on_standby, behind = standby(conn, settings, names, slot)
    if findings or on_standby:
        return _not_ready(findings + on_standby)
    return Readiness(True, f"ready: slot {settings.slot} is a failover slot, synced to "
                     f"{settings.standby_host}"
                     + (f" ({behind} bytes behind the primary's)" if behind is not None else "")
                     + f", and the primary waits for {', '.join(names)}")
