"""Every installed Keras backend: the backend-independent tests run again on each.

Keras picks its backend once, at import, so each backend needs its own
process. From the default run (`python3 -m pytest -q`, TensorFlow), each
other installed backend (JAX, PyTorch) gets one child pytest over the files
in `BACKEND_INDEPENDENT`, with `KERAS_BACKEND` set before Keras is imported
(`conftest.py` only sets a default). A backend that is not installed is
skipped with the extra that installs it. Tests in those files that need
TensorFlow by nature skip themselves on another backend, with a reason.

Also here: `keras_tandem` and the benchmarks on a machine without
TensorFlow (blocked in a child process as if it were not installed), and
`import keras_tandem` under another backend leaving TensorFlow unloaded.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# The tests whose behaviour must not depend on the backend: the Predictor,
# its batching core, versions under training, PublishWeights,
# train_in_background, apredict, REST serving of a .keras model, the demo.
# The one list: keep it in step when a file is added or split.
BACKEND_INDEPENDENT = (
    "test_predictor.py",
    "test_batching.py",
    "test_weights.py",
    "test_training.py",
    "test_apredict.py",
    "test_server.py",
    "test_demo.py",
)
OTHER_BACKENDS = ("jax", "torch")
# A bound for a broken child, not a measurement: the suite runs on 2 loaded cores.
_CHILD_TIMEOUT_S = 1500

# Installed as `sitecustomize` (first on PYTHONPATH) in a child process, and so
# in every process it starts: TensorFlow looks not installed, to `import` and
# to `importlib.util.find_spec` alike.
_NO_TENSORFLOW = '''
import importlib.machinery
import sys

_BLOCKED = ("tensorflow", "tensorflow_serving", "tf_keras")


class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithoutTensorFlow if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
'''


def _current_backend() -> str:
    return keras.backend.backend()


def _require(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed: pip install 'keras-tandem[{backend}]'")


def _child_env(backend: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _tail(proc: subprocess.CompletedProcess, n: int = 6000) -> str:
    return f"--- stdout ---\n{proc.stdout[-n:]}\n--- stderr ---\n{proc.stderr[-n // 2:]}"


def test_keras_runs_on_the_backend_it_was_given():
    # Run inside each child: proves the child's tests ran on the backend asked for.
    assert _current_backend() == os.environ.get("KERAS_BACKEND", "tensorflow")


def test_the_command_reads_the_backend_as_keras_does(tmp_path, monkeypatch):
    from keras_tandem import cli

    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert cli._keras_backend() == "tensorflow"  # no keras.json: Keras' default
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax", "floatx": "float32"}))
    assert cli._keras_backend() == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "torch")  # the variable wins, as in Keras
    assert cli._keras_backend() == "torch"
    (tmp_path / "keras.json").write_text("{not json")
    monkeypatch.delenv("KERAS_BACKEND")
    assert cli._keras_backend() == "tensorflow"


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_backend_independent_tests_pass_on(backend):
    _require(backend)
    if backend == _current_backend():
        pytest.skip(f"this process runs on {backend}: its own run covers these files")
    files = [str(TESTS / f) for f in BACKEND_INDEPENDENT]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
           f"{__file__}::test_keras_runs_on_the_backend_it_was_given"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(backend), capture_output=True,
                          text=True, timeout=_CHILD_TIMEOUT_S)
    assert proc.returncode == 0, (f"the backend-independent tests failed on {backend} "
                                  f"(KERAS_BACKEND={backend} {' '.join(cmd[1:])}):\n"
                                  + _tail(proc))


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_the_tandem_command_leaves_tensorflow_unloaded(backend):
    # The public API's own imports: tests/test_backend_imports.py. Here the command's:
    # every subcommand module, and the models that the demo and the benchmarks build
    # (keras.utils.set_random_seed would import TensorFlow whenever it is installed).
    code = textwrap.dedent("""
        import sys
        import keras
        from keras_tandem import cli, demo
        from keras_tandem.bench import _models
        cli.build_parser()
        assert cli._keras_backend() == keras.backend.backend() == sys.argv[1]
        demo._build_model(0)
        _models.build_model("cnn")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
        assert not loaded, f"TensorFlow was imported: {loaded[:5]}"
    """)
    _require(backend)
    proc = subprocess.run([sys.executable, "-c", code, backend], cwd=ROOT,
                          env=_child_env(backend), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _tail(proc)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_benchmarks_run_without_tensorflow_installed(backend, tmp_path):
    _require(backend)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_TENSORFLOW)
    predict_json, serve_json = tmp_path / "predict.json", tmp_path / "train-serve.json"
    # One process for all of it: each `tandem` run would import Keras again.
    code = textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("tensorflow") is None
        from keras_tandem import cli
        assert cli.main(["bench", "predict", "--quick", "--threads", "1,2", "--coroutines", "2",
                         "--skip-naive", "--json", {str(predict_json)!r}]) == 0
        assert cli.main(["bench", "train-serve", "--quick", "--reps", "1", "--seconds", "0.3",
                         "--threads", "2", "--rate", "200", "--skip-naive",
                         "--json", {str(serve_json)!r}]) == 0
        assert cli.main(["bench", "pipeline", "--quick"]) == 2
        assert cli.main(["bench", "scale", "--quick"]) == 2
        assert "tensorflow" not in sys.modules
    """)
    env = _child_env(backend, PYTHONPATH=os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _tail(proc)
    out = proc.stdout.replace("\n", " ")
    assert f"tandem bench predict backend={backend}" in out
    assert f"tandem bench train-serve backend={backend}" in out
    assert "tandem bench pipeline runs on TensorFlow only" in out
    assert "tandem bench scale runs on TensorFlow only" in out
    for path in (predict_json, serve_json):
        doc = json.loads(path.read_text())
        assert doc["backend"] == backend and doc["machine"]["backend"] == backend
    predict = json.loads(predict_json.read_text())
    served = [r for r in predict["rows"] if r["technique"] == "Predictor"]
    assert served and all(r["requests"] > 0 and r["errors"] == 0 for r in served)
    trained = json.loads(serve_json.read_text())
    open_loop = [r for r in trained["rows"] if r["case"] == "Predictor, open loop"]
    assert open_loop and open_loop[0]["served_rps"] > 0


def test_the_gpu_check_script_parses_and_runs_both_benchmarks_per_backend():
    # scripts/gpu-check.sh runs on a GPU machine only; here: it parses, and runs what it says.
    script = ROOT / "scripts" / "gpu-check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "${GPU_CHECK_BACKENDS:-jax torch}" in text
    assert "bench predict" in text and "--threads 64,256" in text
    assert "bench train-serve" in text and "--threads 64" in text
