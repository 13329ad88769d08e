"""bench.accelerator_check --cpu-smoke: every section of the prepared device check at the tiny config,
so the script keeps running until a device is lent."""

import json
import math

from bench import accelerator_check


def test_cpu_smoke_runs_every_section(tmp_path):
    results, raw = tmp_path / "RESULTS.md", tmp_path / "check.json"
    assert accelerator_check.main(["--cpu-smoke", "--results", str(results), "--json", str(raw)]) == 0
    res = json.loads(raw.read_text())
    assert res["failed"] == {} and res["skipped"] == []
    s = res["sections"]
    # the chooser on this host: xla for every model and dtype, nothing passed over
    assert {row[5] for row in s["device"]["rows"]} == {"xla"}
    # implementations: the host's run and match the full-logits formula; the device kernels are
    # rejected by the chooser and fail when forced: the declared constraints agree with what ran
    rows = {(r[0], r[2]): r for r in s["attention"]["rows"]}
    assert set(rows) == set(accelerator_check.CASES)
    for case, tol in ((("xla", "float32"), 1e-5), (("naive", "float32"), 1e-5), (("xla", "bfloat16"), 5e-2)):
        assert rows[case][3] == "fits" and rows[case][4] == "ran"
        assert rows[case][5] < tol and rows[case][6] < tol, rows[case]
    assert rows[("xla", "bfloat16")][5] > 1e-4          # really ran in bf16
    for case in rows:
        if case[0] in ("cudnn", "cudnn-bf16", "pallas"):
            assert rows[case][4].startswith("fails") and "not cpu" in rows[case][3], rows[case]
    assert all(r[8] == "yes" for r in rows.values())
    # edits: bf16 at batches 1 and 2, float32 at batch 1; every time positive
    assert [(e[0], e[1]) for e in res["edits"]] == [("bfloat16", 1), ("bfloat16", 2), ("float32", 1)]
    assert all(e[3] > 0 and e[4] > 0 for e in res["edits"])
    train = s["train"]
    assert train[0] == "tiny" and train[4] > 0 and 0 < train[8] < 1 and math.isfinite(train[8])
    text = results.read_text()
    assert accelerator_check.HEADING in text and "| xla | 16 | float32 | fits | ran |" in text
    assert "Train step" in text and "| bfloat16 | 2 | 2 |" in text
