"""Just enough PromQL reading for the monitoring tests: which metric names and which label names
an alert rule or a dashboard query uses, and which ones a replicator's /metrics page exports.

Not a parser: a tokenizer that knows which identifiers are not metric names (functions,
aggregations, keywords, label names inside {...} and in by/without/on/ignoring(...)) and skips
strings, numbers, durations, [range] and [subquery:step] brackets and Grafana $variables. An
identifier before "(" that is no PromQL function is an error, so a query it cannot read fails
the test instead of passing unread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FUNCTIONS = frozenset("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase irate
    label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time
    min_over_time minute month pi predict_linear present_over_time quantile_over_time rad rate
    resets round scalar sgn sin sinh sort sort_desc sqrt stddev_over_time stdvar_over_time
    sum_over_time tan tanh time timestamp vector year start end
""".split())
AGGREGATIONS = frozenset("""
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
    limit_ratio
""".split())
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
# Series Prometheus itself writes for each target, next to what the target exports.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped",
                           "scrape_samples_post_metric_relabeling", "scrape_series_added"})

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}\[\]:@])
""", re.VERBOSE)


def tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup != "space":
            out.append((m.lastgroup, m.group()))
    return out


@dataclass
class Query:
    """What one PromQL expression refers to."""

    metrics: set[str] = field(default_factory=set)
    # (metric name, label names it matches on) for each selector with a name
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)   # by / without / on / ignoring / group_x


def read(expr: str) -> Query:
    q = Query()
    toks = tokens(expr)
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if text == "[":                                   # range or subquery: durations only
            while toks[i][1] != "]":
                i += 1
        elif text == "{":                                 # a selector with no metric name
            labels, i = _matchers(toks, i)
            q.selectors.append(("", labels))
            continue
        elif kind == "ident" and text in GROUPING:
            if nxt == "(":
                i += 2
                while toks[i][1] != ")":
                    if toks[i][0] == "ident":
                        q.grouping.add(toks[i][1])
                    i += 1
        elif kind == "ident" and nxt == "(":
            if text not in FUNCTIONS and text not in AGGREGATIONS:
                raise ValueError(f"{text}(...) is no PromQL function, in {expr!r}")
        elif kind == "ident" and text not in KEYWORDS and text not in AGGREGATIONS:
            q.metrics.add(text)
            labels: set[str] = set()
            if nxt == "{":
                labels, i = _matchers(toks, i + 1)
                q.selectors.append((text, labels))
                continue
            q.selectors.append((text, labels))
        i += 1
    return q


def _matchers(toks: list[tuple[str, str]], i: int) -> tuple[set[str], int]:
    """Label names in the {...} starting at toks[i]; the index after its "}"."""
    labels = set()
    i += 1
    while toks[i][1] != "}":
        if toks[i][0] == "ident" and toks[i + 1][1] in ("=", "!=", "=~", "!~"):
            labels.add(toks[i][1])
        i += 1
    return labels, i + 1


# -- what a target exports ---------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"),
             "counter": ("_total", "_created")}


def exported(text: str) -> dict[str, set[str]]:
    """Metric name -> label names, from a Prometheus text-format page.

    Every family declared by a `# TYPE` line counts (with its histogram or counter suffixes),
    even one with no series yet; labels are known only from the series present.
    """
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.setdefault(name, set())
            base = name.removesuffix("_total") if kind == "counter" else name
            for suffix in _SUFFIXES.get(kind, ()):
                names.setdefault(base + suffix, set())
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            if m is None:
                raise ValueError(f"cannot read the metrics line {line!r}")
            names.setdefault(m.group(1), set()).update(_LABEL.findall(m.group(2) or ""))
    return names
