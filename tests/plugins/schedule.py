"""pytest plugin: the order tests are handed to xdist's workers, the longest modules first.

With `--dist worksteal` (README's command) each worker starts on an even, contiguous share of
the collection and, once done, takes half of what another has left, from its end.
Alphabetically the longest modules (a wheel build, 96 MB values, black holes the watchdog must
find) came last and one worker ran them alone for minutes after the others had finished;
first, they start at once and the short ones are what moves between workers. (xdist's default
`load` hands out contiguous chunks and never takes back: there, long ones first put them all
on one worker.) Modules stay whole (their module-scoped fixtures start once); the rest keeps
its order, unit tests last. Seconds per module from `pytest -n 4 --durations=0`.
"""

from __future__ import annotations

import pytest

# Longest first (seconds summed over a module's tests, on 2 CPUs with four workers).
LONGEST = (
    "faults/test_dead_connections.py",      # 270
    "integration/test_memory.py",           # 97
    "integration/test_package.py",          # 86, one test: a wheel built and installed
    "faults/test_kill.py",                  # 81
    "faults/test_backfill_kill.py",         # 77
    "faults/test_stream_kill.py",           # 73
    "integration/test_streaming.py",        # 71
    "integration/test_bench_smoke.py",      # 68
    "integration/test_replication.py",      # 53
    "integration/test_verify.py",           # 50
    "integration/test_lifecycle_review.py",  # 47
    "integration/test_init.py",             # 32
    "integration/test_tls.py",              # 32
)


def _rank(item: pytest.Item) -> int:
    path = item.path.as_posix()
    for i, module in enumerate(LONGEST):
        if path.endswith(module):
            return i
    if "/tests/unit/" in path:
        return len(LONGEST) + 1
    return len(LONGEST)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)   # stable: each module keeps its own order
