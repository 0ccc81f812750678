"""`tandem demo --quick` runs end to end: exit 0, a summary, and the PNG plot.

It runs on the backend of this process's `KERAS_BACKEND` (tests/test_backends.py
runs this file again on each other installed backend).
"""

import os
import re
import subprocess
import sys


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "plots" / "demo.png"
    out.parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "keras_tandem.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    assert f"(Keras backend {backend})" in proc.stdout, proc.stdout[:500]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert str(out) in proc.stdout.replace("\n", "")
    assert "summary" in proc.stdout and "client errors" in proc.stdout
    assert not (tmp_path / "tandem-demo.png").exists()  # --out was honoured
    # New versions reached the clients, and they answer better than version 0.
    found = re.search(r"held-out accuracy ([\d.]+)% -> ([\d.]+)% over (\d+) weight versions",
                      proc.stdout)
    assert found, proc.stdout[-2000:]
    before, after, versions = float(found[1]), float(found[2]), int(found[3])
    assert versions >= 2 and after > before + 20
