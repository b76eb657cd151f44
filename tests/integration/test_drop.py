"""`replicator drop`: a pipeline removed as an operator removes it, through the CLI.

Its slot must go from the source (a forgotten one keeps WAL for ever), its state rows from
the destination, the mirror only when asked; never while a replicator runs it, never
without --yes; and a `run` afterwards starts a new pipeline that ends equal to the source.
"""

from __future__ import annotations

from plugins.replicator import (
    PUBLICATION,
    assert_same,
    cli,
    cli_config,
    error_line,
    wait_for,
)
from plugins.servers import ONE_VERSION

pytestmark = ONE_VERSION

STATE_TABLES = ("pipelines", "tables", "columns", "dead_letters", "index_builds")


def _source(source_db) -> None:
    source_db.execute("create table res_partner (id integer primary key, name text)")
    source_db.execute("insert into res_partner select g, 'p' || g from generate_series(1, 50) g")
    source_db.execute(f"create publication {PUBLICATION} for table res_partner")


def _slot(source_db) -> bool:
    return bool(source_db.scalar("select count(*) from pg_replication_slots "
                                 "where slot_name = %s", [PUBLICATION]))


def _state_rows(dest_db) -> dict[str, int]:
    return {t: dest_db.scalar(f"select count(*) from replicator.{t} where slot = %s",
                              [PUBLICATION]) for t in STATE_TABLES}


def test_drop_says_what_it_would_remove_and_removes_it_with_yes(source_db, dest_db, tmp_path):
    _source(source_db)
    config = str(cli_config(tmp_path, source_db, dest_db))
    first = cli("run", "--config", config, "--until-caught-up", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = _state_rows(dest_db)
    assert _slot(source_db) and before["pipelines"] == 1 and before["tables"] == 1

    asked = cli("drop", "--config", config, cwd=tmp_path)
    assert asked.returncode == 2, asked.stderr
    assert error_line(asked) == "nothing was removed: run it again with --yes"
    assert f"replication slot {PUBLICATION} on the source" in asked.stdout
    assert "the mirror tables stay (--mirror drops them)" in asked.stdout
    assert _slot(source_db) and _state_rows(dest_db) == before

    done = cli("drop", "--config", config, "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert f"pipeline {PUBLICATION}: removed" in done.stdout
    assert not _slot(source_db)
    assert _state_rows(dest_db) == dict.fromkeys(STATE_TABLES, 0)
    # The lease row stays, released, its generation kept: a writer of an older generation
    # can never pass the fence of a row numbered anew.
    assert dest_db.fetchall("select released_at is not null, exit_reason, generation >= 2 "
                            "from replicator.leases where slot = %s", [PUBLICATION]) == [
        (True, "the pipeline was dropped (`replicator drop`)", True)]
    # The mirror stays for its readers.
    assert dest_db.scalar("select count(*) from odoo_mirror.res_partner") == 50

    again = cli("drop", "--config", config, "--yes", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to remove" in again.stdout, again.stdout

    # A new pipeline: a new slot, the table copied again, changes since then streamed.
    source_db.execute("update res_partner set name = 'changed' where id <= 10")
    rerun = cli("run", "--config", config, "--until-caught-up", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert _slot(source_db)
    assert_same(source_db, dest_db, "res_partner")


def test_drop_mirror_drops_the_tables_but_not_the_views_over_them(source_db, dest_db,
                                                                   tmp_path):
    _source(source_db)
    config = str(cli_config(tmp_path, source_db, dest_db))
    assert cli("run", "--config", config, "--until-caught-up", cwd=tmp_path).returncode == 0
    dest_db.execute("create view public.partners as select * from odoo_mirror.res_partner")
    refused = cli("drop", "--config", config, "--yes", "--mirror", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert error_line(refused) == (
        "error: --mirror: partners read(s) the mirror tables, and a view is never dropped "
        "with them: nothing was removed — drop those views first (or drop without --mirror: "
        "the tables stay)")
    assert _slot(source_db) and _state_rows(dest_db)["pipelines"] == 1

    dest_db.execute("drop view public.partners")
    done = cli("drop", "--config", config, "--yes", "--mirror", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "the mirror tables odoo_mirror.res_partner" in done.stdout
    assert dest_db.scalar("select to_regclass('odoo_mirror.res_partner') is null") is True
    assert not _slot(source_db)
    assert _state_rows(dest_db) == dict.fromkeys(STATE_TABLES, 0)


def test_drop_is_refused_while_a_replicator_runs_the_pipeline(source_db, dest_db, tmp_path,
                                                               replicator):
    _source(source_db)
    proc = replicator(batch_size=50, flush_interval=0.05)
    proc.start()
    try:
        wait_for(lambda: dest_db.scalar(
            "select count(*) from replicator.tables where state = 'streaming'") == 1,
            what="the table streaming")
        refused = cli("drop", "--config", str(proc.config), "--yes", cwd=tmp_path)
        assert refused.returncode in (2, 5), refused.stderr
        line = error_line(refused)
        assert "nothing was removed" in line and "stop" in line, line
        assert _slot(source_db)
        assert _state_rows(dest_db)["pipelines"] == 1
        source_db.execute("insert into res_partner values (51, 'still replicated')")
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.res_partner") == 51,
                 what="the pipeline still applying")
    finally:
        proc.stop()


def test_drop_removes_the_slot_a_failed_first_run_left(source_db, dest_db, tmp_path):
    # A first run that made its slot and stopped before writing any state (here: the
    # slot made by hand, as that run would): the slot alone holds WAL.
    _source(source_db)
    source_db.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')",
                      [PUBLICATION])
    config = str(cli_config(tmp_path, source_db, dest_db))
    done = cli("drop", "--config", config, "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"replication slot {PUBLICATION} on the source" in done.stdout
    assert not _slot(source_db)
    # Nothing was created on the destination by a command that removes.
    assert dest_db.scalar("select to_regnamespace('replicator') is null") is True
