"""`tandem` prints TensorFlow's start-up lines at most once, and never hides a crash's reason."""

import os
import subprocess
import sys
import textwrap

# Stands in for TensorFlow: logs its start-up line twice with different timestamps,
# as TensorFlow 2.21's two shared libraries do, around a line of its own.
FAKE_TENSORFLOW = textwrap.dedent("""
    import os
    notice = b"WARNING: All log messages before absl::InitializeLog() is called are written" \\
        b" to STDERR\\n"
    line = b"I0000 00:00:1700000000.100000   123 port.cc:153] oneDNN custom operations are on.\\n"
    os.write(2, notice + line + b"a line of its own\\n")
    os.write(2, notice + line.replace(b"0.100000", b"1.900000"))
    if os.environ.get("FAKE_TF_ABORT"):
        os.write(2, b"F0000 00:00:1700000002.0   123 cpu_feature_guard.cc:1] needs AVX\\n")
        os.abort()
""")


def _import_fake(tmp_path, **env):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    code = "from keras_tandem import cli; cli._import_tensorflow_once_logged(); print('imported')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path), **env})


def test_each_startup_line_is_printed_once_and_other_lines_pass(tmp_path):
    proc = _import_fake(tmp_path)
    assert proc.returncode == 0 and proc.stdout == "imported\n", proc.stderr
    assert proc.stderr.count("oneDNN custom operations are on") == 1
    assert "a line of its own\n" in proc.stderr
    assert "absl::InitializeLog" not in proc.stderr


def test_a_crash_during_the_import_still_prints_why(tmp_path):
    proc = _import_fake(tmp_path, FAKE_TF_ABORT="1")
    assert proc.returncode != 0 and "imported" not in proc.stdout
    assert "needs AVX" in proc.stderr
    assert proc.stderr.count("oneDNN custom operations are on") == 1


def test_a_tandem_command_prints_tensorflows_startup_lines_at_most_once(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "keras_tandem.cli", "data-service", "dispatcher", "--port", "0",
         "--for", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tf.data service dispatcher at" in proc.stdout
    output = proc.stdout + proc.stderr
    assert output.count("oneDNN custom operations") <= 1, output
    assert "absl::InitializeLog" not in output


# Stands in for TensorFlow's CUDA build on a machine without a GPU driver: it
# says so at import, and again as an ERROR when it first looks for a GPU.
FAKE_CUDA_TENSORFLOW = textwrap.dedent("""
    import os, types
    os.write(2, b"I0000 00:00:1700000000.1   1 cudart_stub.cc:31] Could not find cuda drivers"
                b" on your machine, GPU will not be used.\\n")

    def list_physical_devices(kind):
        os.write(2, b"E0000 00:00:1700000001.2   1 cuda_platform.cc:52] failed call to cuInit:"
                    b" INTERNAL: CUDA error\\n")
        return []

    config = types.SimpleNamespace(list_physical_devices=list_physical_devices)
""")


def _import_fake_cuda_build(tmp_path, driver_file):
    (tmp_path / "tensorflow").mkdir(exist_ok=True)
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_CUDA_TENSORFLOW)
    code = (f"from keras_tandem import cli; cli._NVIDIA_DRIVER = {str(driver_file)!r}; "
            "cli._import_tensorflow_once_logged(); print('imported')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})


def test_the_no_gpu_driver_lines_are_dropped_only_when_there_is_no_driver(tmp_path):
    quiet = _import_fake_cuda_build(tmp_path, tmp_path / "no-such-driver")
    assert quiet.returncode == 0 and quiet.stdout == "imported\n", quiet.stderr
    assert "cuda" not in quiet.stderr.lower()
    (tmp_path / "driver").write_text("NVRM version: 999\n")
    told = _import_fake_cuda_build(tmp_path, tmp_path / "driver")
    assert told.returncode == 0 and "Could not find cuda drivers" in told.stderr, told.stderr
