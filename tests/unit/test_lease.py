"""When a standby may take over at once: the lease's holder is a process of this host that no
longer runs (replicator/destination/lease.py). A wrong "gone" would cost a live writer its lease (never
data: the fence stops it); a wrong "alive" makes a crash restart wait out lease_timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from replicator.destination.lease import Fence, _process_gone

HOST = socket.gethostname()


def test_another_host_is_never_judged_from_here():
    assert not _process_gone("some-other-host", 1, "me", "them")


def test_our_own_pid_under_another_owner_is_an_earlier_process():
    # A restarted container's pid 1 finds the lease of the pid 1 before it.
    assert _process_gone(HOST, os.getpid(), "me", "an earlier me")
    assert not _process_gone(HOST, os.getpid(), "me", "me")


def test_a_running_process_is_alive_and_an_exited_one_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not _process_gone(HOST, child.pid, "me", "child")
    finally:
        child.kill()
    # Killed but not yet reaped: a zombie holds nothing.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert _process_gone(HOST, child.pid, "me", "child")
    child.wait()
    assert _process_gone(HOST, child.pid, "me", "child")


def test_no_pid_recorded_is_not_gone():
    # The placeholder row a command writes before any `run` (pid 0) expires instead.
    assert not _process_gone(HOST, 0, "me", "")


def test_the_fence_locks_the_row_of_its_generation_only():
    text = Fence("replicator", "odoo_pub", 7).statement().as_string(None)
    assert text == ('select 1 from "replicator"."leases" where slot = \'odoo_pub\' '
                    "and generation = 7 for key share")


def test_a_commands_fence_locks_the_row_of_any_generation():
    text = Fence("replicator", "odoo_pub", None).statement().as_string(None)
    assert text == 'select 1 from "replicator"."leases" where slot = \'odoo_pub\' for key share'
