"""`tandem bench http` end to end, tiny: rows with CPU per answered request."""

import json
import subprocess
import sys

from _poll import wait_until
from keras_tandem.bench.http import child_cpu_s


def test_bench_http_reports_cpu_per_answered_request(tmp_path):
    out = tmp_path / "http.json"
    proc = subprocess.run(
        [sys.executable, "-m", "keras_tandem.cli", "bench", "http", "--quick", "--skip-naive",
         "--connections", "4", "--duration", "0.3", "--loadgen", "python", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["technique"] == "keras-tandem" and row["requests"] > 0 and row["errors"] == 0
    assert row["cpu_us"] > 0


def test_child_cpu_counts_the_cpu_a_child_process_burns():
    # The child spins until it has used 0.3 s of CPU, then waits for its stdin to close.
    spin = ("import sys, time\n"
            "while time.process_time() < 0.3: pass\n"
            "print('spun', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "spun"
        assert wait_until(lambda: child_cpu_s(child.pid) >= 0.25, 10)
    finally:
        child.stdin.close()
        child.wait(30)
