"""`tandem bench pipeline` runs end to end (tiny sizes) and reports every named ratio."""

from __future__ import annotations

import argparse
import json

from keras_tandem.bench import pipeline as bench

RATIOS = ["pipeline_vs_compute_cpu", "pipeline_vs_compute_io", "pipeline_vs_sequential_cpu",
          "pipeline_vs_sequential_io", "pipeline_per_example_vs_compute_cpu",
          "pipeline_per_example_vs_compute_io", "pipeline_cached_vs_compute_cpu",
          "pipeline_cached_vs_compute_io", "probe_agrees_cpu", "probe_agrees_io", "probe_agrees"]


def test_tiny_run_reports_rows_ratios_and_probes(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--steps", "3", "--repeats", "1", "--blur", "1", "--io-ms", "0.2",
                              "--json", str(out)])
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    for name in RATIOS:
        assert f"\n{name}=" in printed
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "pipeline"
    assert [(r["preprocess"], r["technique"][:4]) for r in doc["rows"]] == [
        (case, t) for case in ("cpu", "io") for t in ("(a) ", "(b) ", "(b1)", "(b')", "(c) ")]
    assert all(r["min_s"] > 0 and r["min_s"] <= r["median_s"] for r in doc["rows"])
    assert set(doc["ratios"]) == set(RATIOS)
    assert doc["ratios"]["probe_agrees"] in (0.0, 1.0)
    assert set(doc["probes"]) == {"cpu", "io"}
    assert all(p["verdict"] for p in doc["probes"].values())


def test_probe_agreement_compares_verdict_with_measurement():
    class Probe:
        def __init__(self, bound):
            self.input_bound = bound

    def rows(case, a, b, b1, b2, c):
        return [{"preprocess": case, "technique": t, "min_s": v, "vs_compute": v / c} for t, v in
                (("(a) s", a), ("(b) p", b), ("(b1) p", b1), ("(b') p", b2), ("(c) c", c))]

    measured = rows("cpu", 4.0, 1.5, 3.0, 1.0, 1.0) + rows("io", 8.0, 1.05, 2.0, 1.0, 1.0)
    ratios = bench._ratios(measured, {"cpu": Probe(True), "io": Probe(False)})
    assert ratios["pipeline_vs_compute_cpu"] == 1.5
    assert ratios["pipeline_per_example_vs_compute_io"] == 2.0
    assert ratios["pipeline_vs_sequential_io"] == 1.05 / 8.0
    assert ratios["probe_agrees"] == 1.0
    ratios = bench._ratios(measured, {"cpu": Probe(False), "io": Probe(False)})
    assert ratios["probe_agrees_cpu"] == 0.0 and ratios["probe_agrees"] == 0.0


def test_vs_compute_pairs_each_round_with_its_own_compute_only_epoch():
    # Round 3 ran slower for both: paired ratios see through it, minima do not.
    times, compute = [1.3, 1.1, 1.4], [1.0, 1.0, 1.2]
    assert bench._vs_compute(times, compute, paired=True) == 1.4 / 1.2  # median of 1.3, 1.1, 1.17
    assert bench._vs_compute(times, compute, paired=False) == 1.1
