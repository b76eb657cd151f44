"""`replicator check` against real servers: what it prints, and that it changes nothing."""

from __future__ import annotations

from plugins.replicator import PUBLICATION, write_config

from replicator.commands.cli import main


def test_check_reports_tables_and_changes_nothing(source_db, dest_db, tmp_path, capsys):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db)
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "source OK" in out and "public.t" in out and "odoo_mirror.t" in out
    assert "will be created" in out and "destination OK" in out
    assert source_db.scalar("select count(*) from pg_replication_slots") == 0
    assert dest_db.scalar("select count(*) from pg_namespace where nspname in "
                          "('odoo_mirror', 'replicator')") == 0


def test_check_refuses_a_table_without_key(source_db, dest_db, tmp_path, capsys):
    source_db.execute("create table nokey (v text)")
    source_db.execute(f"create publication {PUBLICATION} for table nokey")
    config = write_config(tmp_path, source_db, dest_db)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ALTER TABLE" in err[0] and "nokey" in err[0]
