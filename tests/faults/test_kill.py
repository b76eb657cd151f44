"""Exactly once under crashes: the replicator is killed, and the mirror must still end equal
to the source, with no lost change, no duplicate and no half-applied source transaction.

The replicator runs as a real process (`python -m replicator run --config PATH`, through the
`replicator` fixture of tests/plugins/replicator.py: passwords through a $VAR), because a
crash is a process dying: SIGKILL leaves an open destination transaction, a walsender whose
client vanished, a slot that has confirmed whatever the last status update said. Each test
ends with the replicator's own `run --until-caught-up` and a row-for-row comparison of the
six tables (identical column order, `order by id`).

The seeded tests create the tables, the publication and the slot before `seed()` fills the
tables: the seeded rows then reach the replicator twice, through its initial copy and through
the stream (which must drop what the copy already has), and the kills hit both.

Kills at random moments, signals and destination crashes are the replicator's own windows
(ONE_VERSION); a large transaction, streamed differently by each source version, runs on each.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from typing import Any

import psycopg
from plugins.faults import Workload, mirror_diff, seed_source
from plugins.replicator import (
    MIRROR_SCHEMA,
    PUBLICATION,
    STATE_SCHEMA,
    assert_same,
    json_logging,
)
from plugins.servers import ONE_VERSION

from replicator.lsn import parse_lsn

# Frequent batches: many destination commits for the kills and signals to land between.
# Debug logs: each batch's "batch applied" line (info level has a summary every 10 s).
BATCHES = {"batch_size": 1000, "flush_interval": 0.2, "logging": json_logging("debug")}


def dead_letters(dest_db) -> list[tuple]:
    try:
        return dest_db.fetchall(
            f"select mirror_table, lsn::text, reason from {STATE_SCHEMA}.dead_letters order by id limit 10"
        )
    except psycopg.errors.UndefinedTable:
        return []


def applied_lsn(dest_db) -> str | None:
    try:
        return dest_db.scalar(f"select applied_lsn::text from {STATE_SCHEMA}.pipelines")
    except psycopg.errors.UndefinedTable:
        return None


def table_states(dest_db) -> dict[str, int]:
    """How many tables are in each sync state ('copying', 'copied', ...)."""
    try:
        return dict(dest_db.fetchall(f"select state, count(*) from {STATE_SCHEMA}.tables group by 1"))
    except psycopg.errors.UndefinedTable:
        return {}


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def slot_state(source_db, slot: str = PUBLICATION) -> tuple | None:
    """(active, active_pid, confirmed_flush_lsn text) of the slot, or None."""
    return source_db.fetchone(
        "select active, active_pid, confirmed_flush_lsn::text from pg_replication_slots "
        "where slot_name = %s",
        (slot,),
    )


def confirmed_not_beyond_applied(source_db, dest_db) -> str | None:
    """The slot must never confirm what the destination has not durably applied.

    Returns a problem description, or None. Call it while no replicator runs.
    """
    state = slot_state(source_db)
    applied = applied_lsn(dest_db)
    if state is None or applied is None:
        return None
    confirmed = state[2]
    if parse_lsn(confirmed) > parse_lsn(applied):
        return f"slot confirmed {confirmed} but the destination applied only {applied}"
    return None


def assert_mirror_equal(source_db, dest_db, rep, summary: str) -> dict[str, int]:
    problems, counts = mirror_diff(source_db, dest_db)
    letters = dead_letters(dest_db)
    message = (
        f"{summary}\nrows per table: {counts}\n"
        + ("\n".join(problems) if problems else "tables equal")
        + (f"\ndead letters: {letters}" if letters else "")
        + f"\n{rep.logs()}"
    )
    print(f"{summary}; rows per table: {counts}")
    assert not problems and not letters, message
    return counts


# -- a: SIGKILL at random moments during an OLTP workload ------------------------------------


KILLS = 7


@ONE_VERSION
def test_sigkill_during_workload(source_db, dest_db, replicator):
    version = source_db.cluster.version
    seed_source(source_db, scale=0.3)
    rep = replicator(**BATCHES)
    rng = random.Random(f"sigkill-during-workload/{version}")
    workload = Workload(source_db.dsn, seed=version)
    invariant_violations: list[str] = []
    died_by_itself: list[str] = []
    not_streaming: list[str] = []

    started = time.monotonic()
    rep.start()
    workload.start()
    try:
        # The first kill lands in the initial copy (the tables were seeded before the start):
        # the next run must copy again the tables left 'copying', and nothing twice.
        wait_for(lambda: '"initial copy started"' in rep.output()[0] or not rep.alive, 30, 0.005,
                 what="the initial copy to start")
        assert rep.kill(), rep.logs()
        copy_states = table_states(dest_db)
        # Landed inside the copy: a table still copying, the run never streamed.
        assert copy_states.get("copying", 0) >= 1, (copy_states, rep.logs())
        assert '"msg":"streaming"' not in rep.output(rep.runs)[0], rep.logs()
        rep.start()
        for _ in range(KILLS):
            run = rep.runs
            # Mostly counted from the moment the run streams, so that the kill lands while it
            # receives and applies; sometimes from its start, to hit the startup (mirror DDL,
            # slot checks, START_REPLICATION) too.
            if rng.random() < 0.75:
                try:
                    wait_for(lambda: rep.streaming() or not rep.alive, 30, 0.02,
                             what=f"run {run} to start streaming")
                except AssertionError as exc:
                    not_streaming.append(f"run {run}: {exc}")
            time.sleep(rng.uniform(0.3, 2.0))
            if not rep.kill():
                out, err = rep.output(run)
                died_by_itself.append(f"run {run} exited with {rep.proc.returncode}: {err.strip()[-500:]}")
            problem = confirmed_not_beyond_applied(source_db, dest_db)
            if problem:
                invariant_violations.append(f"after kill {rep.kills}: {problem}")
            rep.start()
        # The last incarnation streams and applies for a moment too, then dies like the rest.
        wait_for(lambda: rep.streaming() or not rep.alive, 30, 0.02, what="the last run to stream")
        time.sleep(1.0)
    finally:
        workload.stop()
    rep.kill()
    kill_phase = time.monotonic() - started

    code = rep.run_until_caught_up(timeout=60)
    applied_per_run = [len(rep.batches(r)) for r in range(1, rep.runs)]
    summary = (
        f"pg{version}: {rep.kills} SIGKILLs in {kill_phase:.1f} s, {workload.transactions} workload "
        f"transactions, {rep.runs} runs, final --until-caught-up exit {code}; batches "
        f"applied per killed run: {applied_per_run}; table sync states after the kill in "
        f"the initial copy: {copy_states}"
    )
    assert code == 0, f"{summary}\n{rep.logs()}"
    assert not died_by_itself, f"{summary}: runs ended by themselves:\n" + "\n".join(died_by_itself)
    assert not not_streaming, f"{summary}:\n" + "\n".join(not_streaming) + f"\n{rep.logs()}"
    assert not invariant_violations, f"{summary}:\n" + "\n".join(invariant_violations)
    counts = assert_mirror_equal(source_db, dest_db, rep, summary)
    assert counts["account_move_line"] > 1000  # the comparison compared something
    # The kills hit runs that were applying, not only runs still starting up.
    assert sum(1 for n in applied_per_run if n > 0) >= 3, summary
    assert rep.kills >= 6


# -- a2: SIGKILL while batches grow (the shipped batch_size and flush_interval) -------------


GROW_TABLE = "grow_line"
GROW_WRITERS = 4
OLD_CAP = 1000  # the old default batch_size, and BATCHES': batches must outgrow it here


class Burst(threading.Thread):
    """Small transactions as fast as one connection commits them: 20 rows inserted, three
    updated, one deleted. Several of these outrun a batch, so batches grow while one runs."""

    def __init__(self, dsn: str, writer: int) -> None:
        super().__init__(name=f"burst-{writer}", daemon=True)
        self.dsn, self.writer = dsn, writer
        self.stop_event = threading.Event()
        self.txns = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(self.writer)
        try:
            with psycopg.connect(self.dsn) as conn:
                base = self.writer * 10_000_000
                while not self.stop_event.is_set():
                    first = base + self.txns * 20
                    conn.execute(f"insert into {GROW_TABLE} select g, {self.writer}, md5(g::text) "
                                 "from generate_series(%s::int, %s::int) g", (first, first + 19))
                    if self.txns:
                        old = base + rng.randrange(self.txns * 20)
                        conn.execute(f"update {GROW_TABLE} set n = n + 1 where id between %s and %s",
                                     (old, old + 2))
                        conn.execute(f"delete from {GROW_TABLE} where id = %s",
                                     (base + rng.randrange(self.txns * 20),))
                    conn.commit()
                    self.txns += 1
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert self.error is None, f"writer {self.writer} failed: {self.error!r}"


@ONE_VERSION
def test_sigkill_while_batches_grow(source_db, dest_db, replicator):
    """The shipped defaults (batch_size 10000, a batch closed as soon as the applier is
    free): under writers faster than one batch, and after each restart's backlog, batches
    hold thousands of rows; kills land in them and nothing is lost or applied twice."""
    source_db.execute(f"create table {GROW_TABLE} (id int primary key, n int not null, "
                      "body text not null)")
    source_db.execute(f"create publication {PUBLICATION} for table {GROW_TABLE}")
    # No batch settings: the defaults users run (debug logs: each batch's line).
    rep = replicator(logging=json_logging("debug"))
    rng = random.Random("sigkill-while-batches-grow")
    writers = [Burst(source_db.dsn, w) for w in range(1, GROW_WRITERS + 1)]
    violations: list[str] = []
    rep.start()
    wait_for(lambda: rep.streaming() or not rep.alive, 30, 0.02, what="the first run to stream")
    for w in writers:
        w.start()
    try:
        for _ in range(4):
            # Down for a moment: the next run starts with a backlog, which it applies in
            # batches as large as batch_size allows; the kill lands in them.
            time.sleep(rng.uniform(0.5, 1.0))
            wait_for(lambda: rep.streaming() or not rep.alive, 30, 0.02,
                     what=f"run {rep.runs} to stream")
            time.sleep(rng.uniform(0.2, 1.2))
            assert rep.kill(), rep.logs()
            problem = confirmed_not_beyond_applied(source_db, dest_db)
            if problem:
                violations.append(f"after kill {rep.kills}: {problem}")
            rep.start()
    finally:
        for w in writers:
            w.stop()
    rep.kill()
    code = rep.run_until_caught_up(timeout=90)
    sizes = [b["rows"] for r in range(1, rep.runs) for b in rep.batches(r)]
    summary = (f"{rep.kills} kills, {sum(w.txns for w in writers)} source transactions, "
               f"{len(sizes)} batches in the killed runs, largest {max(sizes, default=0)} rows")
    print(summary)
    assert code == 0, f"{summary}\n{rep.logs()}"
    assert not violations, f"{summary}:\n" + "\n".join(violations)
    assert_same(source_db, dest_db, GROW_TABLE)
    assert not dead_letters(dest_db)
    # Batches grew past the old cap, and kills hit runs that were applying.
    assert max(sizes, default=0) > OLD_CAP, summary
    assert sum(1 for r in range(1, rep.runs) if rep.batches(r)) >= 3, summary


# -- b: SIGKILL while one big source transaction is being applied ----------------------------


BIG_ROWS = 100_000
BIG_TABLE = "big_doc"


def _mirror_count(conn: psycopg.Connection) -> int | None:
    try:
        return conn.execute(f"select count(*) from {MIRROR_SCHEMA}.{BIG_TABLE}").fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return None


class CountWatcher(threading.Thread):
    """Counts the mirror's rows in a loop: a count other than 0 or all is a half-applied
    source transaction, visible to readers."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="count-watcher", daemon=True)
        self.dsn = dsn
        self.seen: set[int | None] = set()
        self.polls = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop_event.is_set():
                    self.seen.add(_mirror_count(conn))
                    self.polls += 1
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def _backends(dest_db) -> list[tuple[int, bool, str]]:
    """(pid, has written in its open transaction, last query) of the replicator's sessions."""
    return dest_db.fetchall(
        "select pid, backend_xid is not null, coalesce(query, '') from pg_stat_activity "
        "where application_name = 'odoo-replicator' and datname = current_database()"
    )


def _applying(dest_db, orphans: set[int]) -> bool:
    """The running replicator copies or merges the big table's rows.

    `orphans` are the sessions of killed processes: the server notices that their client is
    gone only when it next talks to it, so a killed run's COPY or MERGE can still be running.
    """
    return any(
        xid and pid not in orphans and re.match(r"\s*(copy|merge)", query, re.I) and BIG_TABLE in query
        for pid, xid, query in _backends(dest_db)
    )


def _write_transaction_open(dest_db, orphans: set[int]) -> bool:
    """The running replicator holds a destination transaction that has written something."""
    return any(xid and pid not in orphans for pid, xid, _ in _backends(dest_db))


def test_sigkill_during_large_transaction(source_db, dest_db, replicator):
    version = source_db.cluster.version
    source_db.execute(
        f"create table {BIG_TABLE} (id integer primary key, n integer not null, body text not null)"
    )
    source_db.execute(f"create publication {PUBLICATION} for table {BIG_TABLE}")
    rep = replicator(**BATCHES)
    rep.start()
    # The replicator creates the slot and starts streaming before the transaction commits.
    wait_for(lambda: (slot_state(source_db) or (False,))[0], 20, what="the slot to be active")
    wait_for(lambda: applied_lsn(dest_db) is not None or _mirror_count_once(dest_db) is not None,
             20, what="the mirror table")

    watcher = CountWatcher(dest_db.dsn)
    watcher.start()
    t0 = time.monotonic()
    source_db.execute(
        f"insert into {BIG_TABLE} select g, g % 977, repeat(md5(g::text), 16) "
        f"from generate_series(1, {BIG_ROWS}) g"
    )
    insert_s = time.monotonic() - t0
    killed_while_applying = 0
    timeline: list[str] = []
    orphans: set[int] = set()
    try:
        # Kill at a few points of the apply: at once, a little later, later still.
        for delay in (0.0, 0.4, 1.2):
            try:
                # wait_for calls the lambda before the loop moves on: it sees this `orphans`.
                wait_for(lambda: _applying(dest_db, orphans) or watcher.seen - {0, None}, 40, 0.01,  # noqa: B023
                         what="the replicator to apply the big transaction")
            except AssertionError:
                timeline.append(f"no apply seen before the kill after {delay} s")
            if watcher.seen - {0, None}:
                timeline.append(f"already applied before the kill planned at +{delay} s")
                break
            time.sleep(delay)
            applying = _write_transaction_open(dest_db, orphans)
            rep.kill()
            after = _mirror_count_once(dest_db)
            left = _backends(dest_db)
            orphans |= {pid for pid, _, _ in left}
            killed_while_applying += applying and after == 0
            timeline.append(
                f"kill {rep.kills} at +{delay} s into the apply "
                f"({'destination transaction open' if applying else 'no open write transaction'}, "
                f"mirror count after the kill {after}, "
                f"{sum(1 for _, xid, _ in left if xid)} orphaned sessions still writing)"
            )
            rep.start()
        rep.kill()
        code = rep.run_until_caught_up(timeout=90)
    finally:
        watcher.stop()
    total_s = time.monotonic() - t0

    big = [b for r in range(1, rep.runs + 1) for b in rep.batches(r) if b.get("rows", 0) >= BIG_ROWS]
    apply_s = big[0].get("seconds") if big else None
    final = dest_db.scalar(f"select count(*) from {MIRROR_SCHEMA}.{BIG_TABLE}")
    summary = (
        f"pg{version}: {BIG_ROWS} rows inserted in one transaction in {insert_s:.1f} s; "
        f"{rep.kills} kills, {killed_while_applying} while a destination transaction was open; "
        f"{'; '.join(timeline)}; the apply that succeeded took {apply_s} s; counts seen by {watcher.polls} polls: "
        f"{sorted(c for c in watcher.seen if c is not None)}; final count {final}; "
        f"total {total_s:.1f} s"
    )
    print(summary)
    assert watcher.error is None, f"{summary}: watcher failed: {watcher.error!r}"
    partial = {c for c in watcher.seen if c not in (None, 0, BIG_ROWS)}
    assert not partial, f"half-applied source transaction visible: {summary}\n{rep.logs()}"
    assert code == 0, f"{summary}\n{rep.logs()}"
    assert final == BIG_ROWS, f"{summary}\n{rep.logs()}"
    mismatches = _compare_big(source_db, dest_db)
    assert mismatches == [], f"{summary}: rows differ: {mismatches[:5]}"
    assert not dead_letters(dest_db)
    assert rep.kills >= 1 and killed_while_applying >= 1, (
        f"no kill landed during the apply, the test proved nothing: {summary}\n{rep.logs()}"
    )


def _mirror_count_once(dest_db) -> int | None:
    with dest_db.connect() as conn:
        return _mirror_count(conn)


def _compare_big(source_db, dest_db) -> list:
    """Row-for-row via a digest per 1000-id block (100k rows of 512 bytes stay on the servers)."""
    q = (
        "select id / 1000, count(*), md5(string_agg(id::text || ':' || n::text || ':' || body, "
        "',' order by id)) from {} group by 1 order by 1"
    )
    src = source_db.fetchall(q.format(f"public.{BIG_TABLE}"))
    dst = dest_db.fetchall(q.format(f"{MIRROR_SCHEMA}.{BIG_TABLE}"))
    if src == dst:
        return []
    return [(a, b) for a, b in zip(src, dst) if a != b] or [("blocks", len(src), len(dst))]


# -- c: SIGTERM finishes the batch in flight and confirms exactly what it applied -----------


@ONE_VERSION
def test_sigterm_finishes_batch(source_db, dest_db, replicator):
    version = source_db.cluster.version
    seed_source(source_db, scale=0.2)
    rep = replicator(**BATCHES)
    workload = Workload(source_db.dsn, seed=100 + version)
    rep.start()
    workload.start()
    try:
        wait_for(lambda: applied_lsn(dest_db) is not None, 20, what="a first applied batch")
        time.sleep(1.5)  # changes keep arriving while the signal lands
        t0 = time.monotonic()
        code = rep.terminate(timeout=10)
        exit_s = time.monotonic() - t0
        # What the source has confirmed, right after the exit, while the workload still runs.
        observed: list[tuple[str, str]] = []

        def settled() -> bool:
            confirmed, applied = slot_state(source_db)[2], applied_lsn(dest_db)
            observed.append((confirmed, applied))
            return confirmed == applied

        try:
            wait_for(settled, 5, 0.05, what="confirmed_flush_lsn to reach the applied LSN")
            settle_error = None
        except AssertionError as exc:
            settle_error = str(exc)
    finally:
        workload.stop()
    summary = (
        f"pg{version}: SIGTERM -> exit {code} in {exit_s:.2f} s; (confirmed, applied) "
        f"observed: {observed[:3]}...{observed[-1:]}"
    )
    print(summary)
    assert code == 0, f"{summary}\n{rep.logs()}"
    assert exit_s < 5, summary
    beyond = [(c, a) for c, a in observed if parse_lsn(c) > parse_lsn(a)]
    assert not beyond, f"the slot confirmed beyond what was applied: {beyond}; {summary}"
    assert settle_error is None, f"{settle_error}; {summary}\n{rep.logs()}"
    assert "stopped" in rep.output()[0], rep.logs()

    code = rep.run_until_caught_up(timeout=60)
    assert code == 0, rep.logs()
    assert_mirror_equal(source_db, dest_db, rep, summary)


@ONE_VERSION
def test_second_signal_exits_at_once(source_db, dest_db, replicator):
    """A first SIGTERM waits for the batch in flight; a second one does not: the process
    exits 130 at once, before the first signal's own deadline (SHUT_AFTER) could end it, and
    the batch it dropped is neither applied nor confirmed, so the next run applies it."""
    from replicator.pipeline.supervisor import SHUT_AFTER

    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t values (1, 'a')")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    rep = replicator(**BATCHES)
    # The first batch of changes waits before its transaction: the batch a first signal
    # lets finish, and a second one leaves.
    rep.start(env={"REPLICATOR_FAILPOINTS": "apply.batch_before_begin=sleep:60"})
    wait_for(lambda: rep.streaming() or not rep.alive, 60, what="streaming")
    source_db.execute("update t set v = 'b' where id = 1")
    wait_for(lambda: '"failpoint":"apply.batch_before_begin"' in rep.current()
             or not rep.alive, 30, what="the batch to wait at its failpoint")
    assert rep.alive, rep.logs()
    rep.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: '"msg":"stop requested' in rep.current() or not rep.alive, 10,
             what="the first signal to be heard")
    time.sleep(0.5)
    assert rep.alive, f"the first signal did not wait for the batch in flight\n{rep.logs()}"
    rep.proc.send_signal(signal.SIGTERM)
    code = rep.wait(SHUT_AFTER - 1.5)
    assert code == 130, f"exit {code} after the second signal\n{rep.logs()}"
    out = rep.current()
    assert "second stop signal" in out and "still not stopped" not in out, rep.logs()
    problem = confirmed_not_beyond_applied(source_db, dest_db)
    assert problem is None, f"{problem}\n{rep.logs()}"
    assert dest_db.scalar(f"select v from {MIRROR_SCHEMA}.t where id = 1") == "a"
    assert rep.run_until_caught_up(timeout=60) == 0, rep.logs()
    assert dest_db.scalar(f"select v from {MIRROR_SCHEMA}.t where id = 1") == "b"


@ONE_VERSION
def test_sigterm_during_initial_copy(source_db, dest_db, replicator):
    """A stop requested while the existing rows are being copied is a stop, not an error: exit 0
    (the copy restarts on the next run), and the next run makes the mirror equal."""
    from replicator.devtools.seed import seed

    version = source_db.cluster.version
    seed(source_db.dsn, scale=1, publication=PUBLICATION)
    rep = replicator(**BATCHES)
    rep.start()
    wait_for(lambda: '"initial copy started"' in rep.output()[0] or not rep.alive, 30, 0.005,
             what="the initial copy to start")
    states_at_signal = table_states(dest_db)
    t0 = time.monotonic()
    code = rep.terminate(timeout=15)
    exit_s = time.monotonic() - t0
    out, err = rep.output()
    summary = (
        f"pg{version}: SIGTERM during the initial copy (table states at the signal: "
        f"{states_at_signal}, after the exit: {table_states(dest_db)}) -> exit {code} in "
        f"{exit_s:.2f} s, stderr: {err.strip()!r}"
    )
    print(summary)
    # The signal landed inside the copy: a table was copying, and the run never streamed.
    assert states_at_signal.get("copying", 0) >= 1, summary
    assert '"msg":"streaming"' not in out, f"{summary}\n{rep.logs()}"
    code_after = rep.run_until_caught_up(timeout=60)
    assert code_after == 0, f"{summary}\n{rep.logs()}"
    assert_mirror_equal(source_db, dest_db, rep, summary)
    assert code == 0, f"{summary}\n{rep.logs()}"


# -- d: the destination server crashes and comes back -------------------------------------------


@ONE_VERSION
def test_destination_restart(source_db, dest_db, replicator):
    version = source_db.cluster.version
    cluster = dest_db.cluster
    seed_source(source_db, scale=0.2)
    rep = replicator(**BATCHES)
    workload = Workload(source_db.dsn, seed=200 + version)
    rep.start()
    workload.start()
    down_s = 0.0
    try:
        wait_for(lambda: applied_lsn(dest_db) is not None, 20, what="a first applied batch")
        time.sleep(1.0)
        t0 = time.monotonic()
        cluster.kill()  # immediate shutdown: open transactions are lost, as in a crash
        time.sleep(2.5)  # the workload goes on, the replicator cannot apply
        assert rep.alive, f"the replicator died while the destination was down\n{rep.logs()}"
        cluster.start()
        down_s = time.monotonic() - t0
        time.sleep(1.5)
    finally:
        workload.stop()
        if not cluster.is_running:  # the cluster is shared by the whole session
            cluster.start()

    problems: list[str] = []

    def equal() -> bool:
        nonlocal problems
        assert rep.alive, f"the replicator exited after the destination came back\n{rep.logs()}"
        problems, _ = mirror_diff(source_db, dest_db)
        return not problems

    try:
        wait_for(equal, 30, 0.5, what="the mirror to catch up after the destination restart")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {problems}\n{rep.logs()}") from None
    out = rep.output()[0]
    retried = out.count("retrying")
    code = rep.terminate(timeout=10)
    summary = (
        f"pg{version}: destination down for {down_s:.1f} s, {retried} retry log lines, "
        f"replicator exit on SIGTERM {code}"
    )
    assert code == 0, f"{summary}\n{rep.logs()}"
    assert retried >= 1, f"no retry logged, did the destination outage hit? {summary}\n{rep.logs()}"
    assert_mirror_equal(source_db, dest_db, rep, summary)


@ONE_VERSION
def test_destination_crash_loses_only_unconfirmed_commits(source_db, dest_db, replicator):
    # Batches commit with synchronous_commit off: a destination crash loses the commits its
    # WAL writer had not flushed yet. The slot must never have been told of those, so the
    # source sends them again. The WAL writer is slowed down (10 s, its maximum), so that
    # the crash finds unflushed commits; immediate shutdown loses WAL not yet written.
    version = source_db.cluster.version
    cluster = dest_db.cluster
    seed_source(source_db, scale=0.2)
    dest_db.execute("alter system set wal_writer_delay = '10s'")
    dest_db.execute("select pg_reload_conf()")
    rep = replicator(**BATCHES)
    workload = Workload(source_db.dsn, seed=300 + version)
    rep.start()
    workload.start()
    crashes: list[tuple[str, str, str]] = []   # (confirmed, applied before, applied after)
    try:
        wait_for(lambda: applied_lsn(dest_db) is not None, 20, what="a first applied batch")
        # Until a crash has lost a commit (the WAL writer still flushes every filled page,
        # and the replicator forces a flush when one waits long): at least 3, at most 12.
        while len(crashes) < 12:
            time.sleep(1.5)  # the replicator is back and applying
            before = applied_lsn(dest_db)
            confirmed = slot_state(source_db)[2]
            cluster.kill()
            cluster.start()
            crashes.append((confirmed, before, applied_lsn(dest_db)))
            assert rep.alive, f"the replicator died after a destination crash\n{rep.logs()}"
            if len(crashes) >= 3 and any(parse_lsn(a) < parse_lsn(b) for _c, b, a in crashes):
                break
    finally:
        workload.stop()
        if not cluster.is_running:  # the cluster is shared by the whole session
            cluster.start()
        dest_db.execute("alter system reset wal_writer_delay")
        dest_db.execute("select pg_reload_conf()")
    summary = (f"pg{version}: (slot confirmed, applied before the crash, applied after "
               f"recovery): {crashes}")
    print(summary)
    beyond = [c for c in crashes if parse_lsn(c[0]) > parse_lsn(c[2])]
    assert not beyond, f"the slot confirmed commits the crash lost: {beyond}; {summary}"
    assert any(parse_lsn(a) < parse_lsn(b) for _c, b, a in crashes), (
        f"no crash lost a commit: the test proved nothing; {summary}")

    def equal() -> bool:
        assert rep.alive, f"the replicator exited after the destination came back\n{rep.logs()}"
        return not mirror_diff(source_db, dest_db)[0]

    try:
        wait_for(equal, 60, 0.5, what="the mirror to catch up after the destination crashes")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {mirror_diff(source_db, dest_db)[0]}; {summary}\n"
                             f"{rep.logs()}") from None
    code = rep.terminate(timeout=10)
    assert code == 0, f"{summary}\n{rep.logs()}"
    assert_mirror_equal(source_db, dest_db, rep, summary)
