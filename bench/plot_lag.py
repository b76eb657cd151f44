"""Draw the OLTP lag over time, ours against native, from `cdc_oltp.py --csv` (a PNG).

    pip install -e '.[bench]'
    python bench/cdc_oltp.py --csv lag.csv
    python bench/plot_lag.py lag.csv bench/oltp_lag.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def read(path: Path) -> dict[str, list[tuple[float, float]]]:
    ways: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            ways[row["way"]].append((float(row["t"]), float(row["lag_ms"])))
    return ways


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="the file cdc_oltp.py --csv wrote")
    ap.add_argument("png", type=Path, help="where to write the chart")
    ap.add_argument("--title", default="Odoo-invoicing OLTP: marker lag, sampled every 100 ms")
    args = ap.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        print("error: matplotlib is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = read(args.csv)
    if not ways:
        print(f"error: {args.csv} has no samples", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    for way, points in sorted(ways.items()):
        points.sort()
        t0 = points[0][0]
        ax.plot([t - t0 for t, _ in points], [lag for _, lag in points], label=way,
                linewidth=0.8)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("lag (ms): marker commit -> visible in the mirror")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
