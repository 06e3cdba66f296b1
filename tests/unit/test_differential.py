"""The Cython decoder and the pure-Python baseline agree byte for byte on generated valid streams."""

from __future__ import annotations

from typing import List, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgrepl._core import Decoder
from pgrepl.bench.baseline.decoder import PyDecoder
from pgrepl.testing import pgoutput as m

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
VALUE = st.one_of(st.none(), TEXT)
TOPIC_MAP = {
    "t0": {"name": "topic0", "partition_key": ["c0"]},
    "t1": {"name": "topic1", "partition_key": ["c1", "c0"]},
    "t2": {"name": "topic2"},
}


@st.composite
def streams(draw: st.DrawFn) -> List[bytes]:
    widths = [draw(st.integers(min_value=2, max_value=5)) for _ in range(3)]
    payloads = [m.relation(100 + i, "public", f"t{i}", [f"c{j}" for j in range(w)]) for i, w in enumerate(widths)]
    lsn = 1000
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        payloads.append(m.begin(lsn))
        for _ in range(draw(st.integers(min_value=0, max_value=6))):
            table = draw(st.integers(min_value=0, max_value=2))
            width = widths[table]

            def row() -> List[Optional[str]]:
                values = draw(st.lists(VALUE, min_size=width, max_size=width))
                # c0 and c1 are partition-key columns: never NULL
                return [v if v is not None or j >= 2 else "k" for j, v in enumerate(values)]

            kind = draw(st.sampled_from(["I", "U", "D"]))
            if kind == "I":
                payloads.append(m.insert(100 + table, row()))
            elif kind == "U":
                old, new = row(), row()
                new = [m.UNCHANGED if (j >= 2 and draw(st.booleans())) else v for j, v in enumerate(new)]
                payloads.append(m.update(100 + table, old, new))
            else:
                payloads.append(m.delete(100 + table, row()))
        payloads.append(m.commit(lsn, lsn + 50))
        lsn += draw(st.integers(min_value=51, max_value=1 << 40))
    return payloads


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_cython_and_baseline_agree(payloads: List[bytes]) -> None:
    fast = Decoder(TOPIC_MAP, split_key_changes=False).decode_batch(payloads)  # the baseline is the original's semantics
    slow = PyDecoder(TOPIC_MAP).decode_batch(payloads)
    assert fast.values == slow.values
    assert fast.keys == slow.keys
    assert fast.topics == slow.topics
    assert [(c.commit_lsn, c.end_lsn, c.record_end) for c in fast.commits] == [
        (c.commit_lsn, c.end_lsn, c.record_end) for c in slow.commits]
