"""bench/plot_lag.py, the chart of OLTP lag in BENCHMARKS.md: a smoke run on a small CSV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_draws_a_png_from_the_csv_cdc_oltp_writes(tmp_path):
    data = tmp_path / "lag.csv"
    data.write_text("t,lag_ms,way\n" + "".join(
        f"{i / 10},{5 + i % 7},{way}\n" for way in ("native subscription", "replicator")
        for i in range(50)))
    png = tmp_path / "lag.png"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_lag.py"), str(data),
                           str(png)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_empty_csv_is_one_line(tmp_path):
    data = tmp_path / "lag.csv"
    data.write_text("t,lag_ms,way\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_lag.py"), str(data),
                           str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {data} has no samples"
