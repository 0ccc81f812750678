"""`tandem bench predict` end to end, tiny: the table, ratio lines and JSON."""

import json
import os
import subprocess
import sys


def test_bench_predict_writes_ratios_and_machine(tmp_path):
    out = tmp_path / "predict.json"
    plot = tmp_path / "predict.png"
    proc = subprocess.run(
        [sys.executable, "-m", "keras_tandem.cli", "bench", "predict", "--threads", "1,4",
         "--coroutines", "2,8", "--duration", "0.3", "--skip-naive", "--json", str(out),
         "--plot", str(plot)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("throughput_vs_handoff=", "throughput_vs_offline=", "latency_vs_direct=",
                 "async_vs_threads="):
        assert name in proc.stdout
    assert "tandem bench predict backend=tensorflow" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["tensorflow"].startswith("2.")
    assert doc["backend"] == doc["machine"]["backend"] == "tensorflow"
    assert doc["call_path"]  # which forward pass the Predictor ran
    techniques = {r["technique"] for r in doc["rows"]}
    assert {"hand-off ceiling", "lock + predict_on_batch", "Predictor"} <= techniques
    predictor = [r for r in doc["rows"] if r["technique"] == "Predictor"]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in predictor)
    assert doc["ratios"]["throughput_vs_handoff"] > 0
    aio = {r["threads"]: r for r in doc["rows"] if r["technique"] == "Predictor apredict (asyncio)"}
    assert set(aio) == {2, 8} and all(r["requests"] > 0 and r["errors"] == 0 for r in aio.values())
    assert doc["ratios"]["async_vs_threads"] > 0
    # CPU per answered request, measured in this process, beside req/s.
    assert all(r["cpu_us"] > 0 for r in [*predictor, *aio.values()])
    assert plot.stat().st_size > 10_000
