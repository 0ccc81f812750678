"""Multi-worker training: two real worker processes on 127.0.0.1 (`keras_tandem.cluster.job`).

Each test starts its cluster with `LocalCluster` (its own process groups) and
stops it in a `finally`. Synthetic-free: the bundled 8x8 digits, 1792 rows
(28 global batches of 2 x 32), a small MLP, so a run takes seconds.
"""

import json
import os
import signal
import sys

import numpy as np
import pytest

from _poll import wait_until
from keras_tandem.cluster.launcher import LocalCluster, describe_exit, tf_configs

ROWS = 1792
JOB = [sys.executable, "-m", "keras_tandem.cluster.job", "--model", "mlp", "--rows", str(ROWS),
       "--lr", "0.003"]
WAIT_S = 120


def _weights(path):
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]


def _report(folder, i):
    return json.loads((folder / f"worker_{i}.json").read_text())


def _run_cluster(args, env=None):
    return _run_cluster_command([*JOB, *args], env)


def _run_cluster_command(command, env=None):
    cluster = LocalCluster(command, 2, env=env, out=None)
    try:
        failed, code = cluster.wait(WAIT_S)
    finally:
        cluster.stop()
    lines = "\n".join(f"[{i}] {line}" for i, ls in enumerate(cluster.lines) for line in ls)
    assert (failed, code) == (-1, 0), f"worker {failed}: {describe_exit(code)}\n{lines}"
    return cluster


def _wait_for_line(cluster, worker, prefix):
    """Waits until `worker` prints a line starting with `prefix`, while every worker lives."""
    def printed() -> bool:
        assert all(p.poll() is None for p in cluster.procs), cluster.lines
        return any(line.startswith(prefix) for line in cluster.lines[worker])

    wait_until(printed, WAIT_S, f"worker {worker} never printed {prefix!r}")


def _survivor_after_signal(argv, collective_timeout_s, line, sig):
    """Runs `argv` as a 2-worker cluster; once worker 1 prints `line`, sends it `sig`.

    Returns worker 0's exit code (waited for up to 60 s) and its output. The
    cluster is stopped either way (its SIGKILL ends a stopped process too).
    """
    cluster = LocalCluster(argv, 2, out=None,
                           env={"KERAS_TANDEM_COLLECTIVE_TIMEOUT_S": str(collective_timeout_s)})
    try:
        _wait_for_line(cluster, 1, line)
        cluster.procs[1].send_signal(sig)
        code = cluster.procs[0].wait(60)
    finally:
        cluster.stop()
    return code, "\n".join(cluster.lines[0])


def test_tf_configs_name_every_worker_and_this_task():
    configs = [json.loads(c) for c in tf_configs([1111, 2222])]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": 0},
                                            {"type": "worker", "index": 1}]
    assert configs[0]["cluster"] == {"worker": ["127.0.0.1:1111", "127.0.0.1:2222"]}


def test_two_workers_end_identical_and_train_like_one_process_of_the_global_batch(tmp_path):
    cluster = _run_cluster(["--epochs", "2", "--batch-size", "32", "--no-shuffle",
                            "--serve", "--report", str(tmp_path)])
    # The chief served the model while it trained: one version per epoch end.
    assert any(line.startswith("served version 2") for line in cluster.lines[0]), cluster.lines
    assert not any("served" in line for line in cluster.lines[1])
    reports = [_report(tmp_path, i) for i in range(2)]
    assert [r["workers"] for r in reports] == [2, 2]
    assert [r["chief"] for r in reports] == [True, False]
    assert [r["steps"] for r in reports] == [2 * ROWS // 64] * 2  # global batch 2 x 32
    w0, w1 = (_weights(tmp_path / f"worker_{i}.npz") for i in range(2))
    assert len(w0) == len(w1) > 0
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    loss = reports[0]["loss"]
    assert reports[1]["loss"] == loss
    assert loss[1] < loss[0]

    # The same rows in the same order, one process, batches of 64 (Keras's own fit).
    import keras

    from keras_tandem import train_in_background
    from keras_tandem.cluster.job import build_model, make_data

    x, y = make_data("digits", ROWS, 0)
    model = build_model("mlp", 0.003, 0)
    history = train_in_background(model, (x, y), epochs=2, batch_size=64,
                                  shuffle=False).join(WAIT_S)
    np.testing.assert_allclose(loss, history.history["loss"], rtol=2e-3)
    single = model.get_weights()
    for a, b in zip(w0, single):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    keras.backend.clear_session()


def test_sigkill_stops_the_survivor_with_a_message_and_a_restart_resumes(tmp_path):
    ckpt, report = tmp_path / "ckpt", tmp_path / "report"
    args = ["--epochs", "4", "--checkpoint-dir", str(ckpt), "--validation-split", "0.2"]
    # Slow steps (28 per epoch), so that the run is still in epoch 3 when the kill lands.
    # "epoch 2/4" is printed after worker 1 saved epoch 2 (its steps, validation and
    # saves are collectives with worker 0): whenever the kill lands, the survivor's next
    # collective is in epoch 3 and it has saved epoch 2. The survivor stops by itself
    # (no launcher kills it here), with a clear message.
    code, survivor = _survivor_after_signal([*JOB, *args, "--step-delay", "0.03"], 20,
                                            "epoch 2/4", signal.SIGKILL)
    assert code == 3, survivor
    # Epochs counted from 1, as the progress lines count them.
    assert "lost a worker or timed out in epoch 3/4" in survivor, survivor
    assert "training resumes at epoch 3" in survivor, survivor
    # Only the chief's backup and model are kept; worker 1 wrote to its scratch folder only.
    assert sorted(p.name for p in ckpt.iterdir()) == [".worker_1_scratch", "backup",
                                                     "best.keras", "last.keras"]
    assert any(p.name.startswith("ckpt-") for p in (ckpt / "backup").iterdir())

    _run_cluster([*args, "--report", str(report)])
    reports = [_report(report, i) for i in range(2)]
    assert [r["start_epoch"] for r in reports] == [2, 2]
    train_rows = int(ROWS * 0.8)
    assert [r["steps"] for r in reports] == [2 * (train_rows // 64)] * 2  # epochs 3, 4 only
    for a, b in zip(_weights(report / "worker_0.npz"), _weights(report / "worker_1.npz")):
        np.testing.assert_array_equal(a, b)
    # Completed: the backup is gone (as with Keras's BackupAndRestore), the models stay.
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.keras", "last.keras"]
    # Validation ran over the whole global batches of the last 20 % of the rows, on
    # both workers alike: the chief's saved model gives the same figures here.
    import keras

    from keras_tandem.cluster.job import make_data

    history = reports[0]["history"]
    assert history == reports[1]["history"] and len(history["val_loss"]) == 2
    x, y = make_data("digits", ROWS, 0)
    val = slice(train_rows, train_rows + (ROWS - train_rows) // 64 * 64)
    model = keras.models.load_model(ckpt / "last.keras")
    got = model.evaluate(x[val], y[val], batch_size=64, verbose=0, return_dict=True)
    np.testing.assert_allclose(got["loss"], history["val_loss"][-1], rtol=1e-4)
    np.testing.assert_allclose(got["accuracy"], history["val_accuracy"][-1], rtol=1e-4)


def test_local_cluster_stops_the_others_when_one_worker_fails():
    code = ("import json, os, sys, time\n"
            "task = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
            "print('task', task, flush=True)\n"
            "sys.exit(5) if task == 1 else time.sleep(60)\n")
    cluster = LocalCluster([sys.executable, "-c", code], 2, out=None)
    try:
        failed, exit_code = cluster.wait(60)  # (-1, None) had it waited out the sleeping one
    finally:
        cluster.stop()
    assert (failed, exit_code) == (1, 5)
    assert cluster.procs[0].poll() == -signal.SIGTERM
    assert cluster.lines == [["task 0"], ["task 1"]]


def test_describe_exit():
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(3) == "exit code 3"


@pytest.mark.parametrize("bad", ['{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}}'])
def test_parameter_server_clusters_are_refused(monkeypatch, bad):
    from keras_tandem.cluster.strategy import choose_strategy

    monkeypatch.setenv("TF_CONFIG", bad)
    with pytest.raises(ValueError, match="parameter servers"):
        choose_strategy()


STOP_SCRIPT = """
import json, time
from keras_tandem import choose_strategy, cluster_position, train_in_background
strategy = choose_strategy()
from keras_tandem.cluster.job import build_model, make_data
index, workers, chief = cluster_position(strategy)
x, y = make_data("digits", 1792, 0)
with strategy.scope():
    model = build_model("mlp", 1e-3, 0)
run = train_in_background(model, (x, y), epochs=50, batch_size=32)
if index == 1:
    while run.progress.total_steps < 10 and not run.done:
        time.sleep(0.005)
    run.stop()
run.join(120)
print(json.dumps({"steps": run.progress.total_steps, "epoch": run.progress.epoch}))
"""


def test_stop_on_one_worker_stops_every_worker_at_the_same_step(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    cluster = _run_cluster_command([sys.executable, str(script)])
    done = [json.loads(lines[-1]) for lines in cluster.lines]
    assert done[0] == done[1], done
    assert 10 <= done[0]["steps"] < 50 * 28


def test_tandem_worker_reports_the_failed_worker_and_stops_the_rest(tmp_path, capsys):
    from keras_tandem.cli import main

    script = tmp_path / "fail.py"
    # Worker 0 would sleep for a minute; worker 1 fails once worker 0 has said where it is.
    script.write_text("import json, os, pathlib, sys, time\n"
                      "task = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
                      f"folder = pathlib.Path({str(tmp_path)!r})\n"
                      "(folder / f'pid_{task}').write_text(str(os.getpid()))\n"
                      "print('hello from', task, flush=True)\n"
                      "for _ in range(6000):  # poll, at most a minute\n"
                      "    if task != 1 or (folder / 'pid_0').exists():\n"
                      "        break\n"
                      "    time.sleep(0.01)\n"
                      "sys.exit(4) if task == 1 else time.sleep(60)\n")
    assert main(["worker", "--num-workers", "2", "--script", str(script)]) == 1
    out, err = capsys.readouterr()
    assert "[worker 1] hello from 1" in out and "[worker 0] hello from 0" in out
    assert "worker 1 failed (exit code 4): stopped the other workers" in err
    # Stopped and reaped, not left to sleep: its process is gone.
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid_0").read_text()), 0)


def test_a_frozen_worker_makes_the_other_time_out_instead_of_hanging(tmp_path):
    # SIGSTOP keeps the peer's connections open: the survivor's step deadline (5 s here)
    # or TensorFlow's coordination-service heartbeats end the wait, whichever comes
    # first; the survivor then exits with the job's code for WorkerLost (3), not by a
    # crash (TensorFlow's own collective timeout, which it used to rely on, could
    # make it die by SIGSEGV under load).
    code, survivor = _survivor_after_signal([*JOB, "--epochs", "50", "--step-delay", "0.02"],
                                            5, "epoch 1/", signal.SIGSTOP)
    assert code == 3, f"{describe_exit(code)}\n{survivor}"
    assert "DeadlineExceededError" in survivor or "UnavailableError" in survivor, survivor
    assert "without checkpoint_dir it starts again at epoch 1" in survivor, survivor


def test_a_model_built_outside_the_strategy_warns_that_it_trains_alone(monkeypatch):
    from keras_tandem import train_in_background
    from keras_tandem.cluster.job import build_model

    monkeypatch.setenv("TF_CONFIG", tf_configs([1, 2])[1])
    model = build_model("mlp", 1e-3, 0)
    data = (np.zeros((64, 8, 8, 1), "float32"), np.zeros(64, "int32"))
    with pytest.warns(RuntimeWarning, match="trains alone"):
        run = train_in_background(model, data, epochs=1)
    run.join(60)
