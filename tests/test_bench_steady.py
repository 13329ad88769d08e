"""bench/steady.py on the tiny fixture model: many edits in one process, none compiling after the
warm-up, with the machine's matmul speed recorded after each edit."""

import math

from bench import steady


def test_tiny_editor_edits_are_steady_and_carry_the_control(tmp_path):
    report = steady.measure("editor", 10, 1, log=lambda s: None, checkpoint="tiny", control=True, control_n=256,
                            fresh=True)
    rows = report["rows"]
    assert len(rows) == 10
    # the Editor keeps one compiled program: a new seed per call neither traces nor compiles
    assert report["compiles"] == 0 and report["traces"] == 0
    assert rows[0]["programs"] == rows[-1]["programs"] >= 1
    assert all(r["wall"] > 0 and r["cpu"] >= 0 for r in rows)
    assert all(math.isfinite(r["control_gflops"]) and r["control_gflops"] > 0 for r in rows)
    assert report["control_n"] == 256 and math.isfinite(report["control_last10_vs_first10"])
    # the same edit in a fresh process before the first edit: one block of ten, same work
    (block,) = report["fresh_blocks"]
    assert block["start"] == 0 and block["fresh_cpu"] > 0 and block["ratio"] == block["ours_cpu"] / block["fresh_cpu"]
    text = steady.results_text([report], "python -m bench.steady --mode editor --checkpoint tiny --control")
    assert "control, the machine's 256^3 float32 matmul" in text
    assert "0 / 0 |" in text   # compiles / traces after the warm-up
    assert "| 1-10 |" in text and "resident MiB after each edit" in text


def test_verdict_names_each_kind_of_drift():
    base = dict(cpu_last10_vs_first10=1.0, rss_mib_per_edit=0.0, compiles=0)
    assert steady.verdict(base) == []
    bad = steady.verdict({**base, "cpu_last10_vs_first10": 1.2, "rss_mib_per_edit": 5.0, "compiles": 3})
    assert len(bad) == 3 and "drifted" in bad[0] and "resident memory" in bad[1] and "3 XLA" in bad[2]
