"""pytest for bench/test_decoder_bench.py: the ratio of the two decoders, printed last."""

from __future__ import annotations

import pytest

TARGET_RATIO = 20     # the target: the decoder >= 20x the pure-Python reference
_RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def decoder_results() -> dict[str, dict]:
    return _RESULTS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    cython, ref = _RESULTS.get("cython"), _RESULTS.get("reference")
    if cython and ref:
        same = cython["output"] == ref["output"]
        write(f"decoders: same staging output on the capture: {same}")
    for name, r in _RESULTS.items():
        if r["median_s"]:
            write(f"{name:>9}: {r['median_s'] * 1000:9.2f} ms median for {r['messages']:,} "
                  f"messages, {r['rows']:,} staging rows ({r['messages'] / r['median_s']:,.0f} "
                  "messages/s)")
    if cython and ref and cython["median_s"] and ref["median_s"]:
        ratio = ref["median_s"] / cython["median_s"]
        best = ref["min_s"] / cython["min_s"]
        verdict = "MET" if ratio >= TARGET_RATIO else "NOT MET"
        write(f"decoder vs pure-Python reference: {ratio:.1f}x faster "
              f"(medians; fastest runs: {best:.1f}x; target >= {TARGET_RATIO}x: {verdict})")
