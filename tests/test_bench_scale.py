"""`tandem bench scale` runs end to end (tiny sizes) and reports every named ratio."""

from __future__ import annotations

import argparse
import json

from keras_tandem.bench import scale as bench

RATIOS = ["two_workers_vs_one", "two_workers_same_global_batch_vs_one",
          "step_overhead_ms_same_global_batch", "service_vs_local"]


def test_tiny_run_reports_rows_and_ratios(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--epochs", "2", "--rows", "1024", "--input-batches", "6",
                              "--blur", "1", "--json", str(out)])
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    for name in RATIOS:
        assert f"\n{name}=" in printed
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "scale" and set(doc["ratios"]) == set(RATIOS)
    train, inputs = doc["rows"][:3], doc["rows"][3:]
    assert [(r["workers"], r["global_batch"]) for r in train] == [(1, 64), (2, 64), (2, 128)]
    assert all(r["samples_per_s"] > 0 for r in train)
    # Every sample passes through the service once (DYNAMIC sharding), batches or not.
    assert [r["samples"] for r in inputs] == [6 * 64, 6 * 64]
    assert doc["ratios"]["two_workers_vs_one"] == train[2]["vs_one"]
