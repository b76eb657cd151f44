"""The decoder against the pure-Python reference, on the six Odoo tables' captured stream.

    python -m pytest bench/test_decoder_bench.py --benchmark-only

Both decoders replay bench/data/pgoutput_15_v3_binary_odoo.json.gz (tools/capture_pgoutput.py
--odoo: the devtools OLTP workload and a bulk insert and update of journal items, protocol 3,
binary) as XLogData frames through pgoutput_replay.replay(), the receive loop's calls
(feed_frame, define on Relation, take at a commit once 1,000 rows are pending). Their output
is identical (tests/unit/test_reference_decoder.py), so the times compare the same work. The
ratio (reference / Cython, medians) is printed at the end; the target is >= 20x.

Not collected by the test suite (`pytest tests`); tests/integration/test_bench_smoke.py runs
this file with --benchmark-disable (each decoder once, no timing).
"""

from __future__ import annotations

import pytest

from replicator._decode import Decoder
from replicator.devtools.pgoutput_replay import ODOO_CAPTURE, frames, load_capture, replay
from replicator.devtools.reference_decoder import ReferenceDecoder

DECODERS = {"cython": Decoder, "reference": ReferenceDecoder}


@pytest.fixture(scope="module")
def stream() -> list[bytes]:
    return frames(load_capture(ODOO_CAPTURE))


@pytest.mark.parametrize("name", list(DECODERS))
def test_decode_odoo_capture(benchmark, stream, name, decoder_results):
    decoder = DECODERS[name]
    taken = benchmark(lambda: replay(decoder(), stream))
    rows = sum(counts[0] for _relid, _data, counts in taken)
    assert rows > 0
    benchmark.extra_info.update(messages=len(stream), rows=rows,
                                bytes=sum(len(f) for f in stream))
    stats = getattr(benchmark, "stats", None)
    decoder_results[name] = {"median_s": stats.stats.median if stats is not None else None,
                             "min_s": stats.stats.min if stats is not None else None,
                             "messages": len(stream), "rows": rows,
                             "output": taken}
