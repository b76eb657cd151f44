"""What `replicator verify` found, table by table, and how it reads on a terminal.

The results are plain data (``--json`` prints them as they are); verify.py finds them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_KEYS = 1_000      # differing keys narrowed per table; past it, ranges only


@dataclass
class DriftRange:
    start: dict[str, Any] | None     # first key of the range (None: the table's start)
    end: dict[str, Any] | None       # first key after it (None: the table's end)
    source_rows: int
    mirror_rows: int


@dataclass
class TableResult:
    source_table: str
    mirror_table: str
    verdict: str                     # ok | drift | skipped
    reason: str | None = None        # why it was skipped
    source_rows: int | None = None
    mirror_rows: int | None = None
    ranges: int = 0                  # ranges of the first pass
    rounds: int = 0                  # snapshot pairs read (1 + re-checks)
    compared_columns: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)
    drift_ranges: list[DriftRange] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)   # {"key": {...}, "kind": ...}
    keys_total: int = 0
    narrowing_stopped: bool = False  # more than MAX_KEYS keys differed: ranges only past it
    unsettled: int = 0               # kept changing in every re-check: in flight, not drift
    repaired: int | None = None      # --repair: keys re-copied (None: no repair asked for)
    repair_skipped: int = 0          # --repair: keys that changed since they were verified


@dataclass
class Report:
    slot: str
    tables: list[TableResult]

    @property
    def drift(self) -> bool:
        return any(t.verdict == "drift" for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "drift": self.drift,
                "tables": [asdict(t) for t in self.tables]}


# -- text --------------------------------------------------------------------------------------

SHOW_KEYS = 20   # keys listed per table in the text output (--json lists them all)


def _key(k: dict[str, Any] | None, edge: str) -> str:
    if k is None:
        return edge
    return ", ".join(f"{n}={v}" for n, v in k.items())


def describe_range(d: DriftRange) -> str:
    return f"[{_key(d.start, 'start')} .. {_key(d.end, 'end')})"


def render(report: Report) -> str:
    """A table per run, then one block per drifted table: its ranges and keys."""
    def val(v: Any) -> str:
        return "-" if v is None else str(v)

    head = ("source table", "mirror table", "source rows", "mirror rows", "ranges", "verdict")
    rows = []
    for t in report.tables:
        verdict = {"ok": "ok", "drift": f"DRIFT ({t.keys_total} keys)",
                   "skipped": f"skipped: {t.reason}"}[t.verdict]
        if t.unsettled:
            verdict += f", {t.unsettled} keys still changing"
        if t.repaired is not None:
            verdict += f" after repairing {t.repaired} keys"
            if t.repair_skipped:
                verdict += f" ({t.repair_skipped} changed meanwhile, left alone)"
        rows.append((t.source_table, t.mirror_table, val(t.source_rows), val(t.mirror_rows),
                     str(t.ranges) if t.verdict != "skipped" else "-", verdict))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    for t in report.tables:
        if t.not_compared and t.verdict != "skipped":
            lines.append(f"{t.source_table}: not compared: {', '.join(t.not_compared)}")
        if t.verdict != "drift":
            continue
        lines.append("")
        lines.append(f"DRIFT in {t.source_table} -> {t.mirror_table}:")
        for d in t.drift_ranges:
            lines.append(f"  range {describe_range(d)}: {d.source_rows} rows at the source, "
                         f"{d.mirror_rows} in the mirror")
        for k in t.keys[:SHOW_KEYS]:
            what = {"changed": "changed", "missing": "missing in the mirror",
                    "extra": "extra in the mirror"}[k["kind"]]
            lines.append(f"  key {_key(k['key'], '')}: {what}")
        if t.keys_total > SHOW_KEYS:
            lines.append(f"  ... and {t.keys_total - SHOW_KEYS} more keys (--json lists all)")
        if t.narrowing_stopped:
            lines.append(f"  more than {MAX_KEYS} keys differ: only the first were narrowed")
    lines.append("")
    lines.append("drift found" if report.drift else "no drift")
    return "\n".join(lines)
