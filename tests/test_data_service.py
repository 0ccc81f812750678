"""`make_pipeline(..., service=...)` on a tf.data service: a dispatcher and two workers.

The servers run in this process (one set for the module); the pipeline's
elements come back through the service's gRPC endpoints on 127.0.0.1.
"""

import numpy as np
import pytest

N = 600  # elements per epoch


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from keras_tandem.data.service import start_dispatcher, start_worker

    dispatcher = start_dispatcher(0, tmp_path_factory.mktemp("dispatcher"))
    port = dispatcher.target.rsplit(":", 1)[-1]
    address = f"grpc://127.0.0.1:{port}"
    workers = [start_worker(address) for _ in range(2)]
    try:
        yield address
    finally:
        del workers, dispatcher  # their destructors shut the servers down


def _epoch(dataset):
    return np.concatenate([np.asarray(b[0]) for b in dataset])


def test_dynamic_sharding_yields_every_element_exactly_once_per_epoch(service):
    from keras_tandem.data.pipeline import make_pipeline

    x = np.arange(N, dtype=np.int64)
    ds = make_pipeline((x, x % 7), batch_size=16, preprocess=lambda a, b: (a * 3, b),
                       shuffle=True, seed=1, service=service)
    for _ in range(2):
        got = _epoch(ds)
        assert len(got) == N
        np.testing.assert_array_equal(np.sort(got), x * 3)


def test_without_sharding_each_of_the_two_workers_yields_the_whole_dataset(service):
    from keras_tandem.data.pipeline import make_pipeline

    x = np.arange(N, dtype=np.int64)
    ds = make_pipeline((x, x), batch_size=16, service=service, service_sharding="off")
    got = _epoch(ds)
    # Two workers each produce every element: proof that both serve the pipeline.
    np.testing.assert_array_equal(np.sort(got), np.repeat(x, 2))


def test_a_shared_job_splits_one_pass_between_two_consumers(service):
    from keras_tandem.data.pipeline import make_pipeline

    x = np.arange(N, dtype=np.int64)
    a, b = (make_pipeline((x, x), batch_size=10, service=service, service_job_name="shared")
            for _ in range(2))
    ia, ib = iter(a), iter(b)
    got: list[np.ndarray] = []
    for it in [ia, ib] * N:  # alternate until both are exhausted
        try:
            got.append(np.asarray(next(it)[0]))
        except StopIteration:
            continue
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), x)


def test_service_refuses_generators_and_unknown_sharding(service):
    import tensorflow as tf

    from keras_tandem.data.pipeline import make_pipeline

    with pytest.raises(ValueError, match="generator"):
        make_pipeline(lambda: iter([1, 2]), batch_size=2, service=service,
                      output_signature=tf.TensorSpec((), tf.int32))
    with pytest.raises(ValueError, match="service_sharding"):
        make_pipeline(np.arange(4), batch_size=2, service=service, service_sharding="random")


def test_worker_address_with_uppercase_port_is_refused():
    from keras_tandem.data.service import start_dispatcher, start_worker

    with pytest.raises(ValueError, match="lowercase"):
        start_worker("127.0.0.1:1", worker_address="127.0.0.1:%PORT%")
    with pytest.raises(ValueError, match="work_dir"):
        start_dispatcher(0, fault_tolerant=True)


def _serve(*args):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "keras_tandem.cli", "data-service", *args,
                             "--for", "120"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill(procs):
    import contextlib
    import os
    import signal

    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def test_tandem_data_service_processes_survive_a_dispatcher_restart(tmp_path):
    from keras_tandem.cluster.launcher import free_ports
    from keras_tandem.data.pipeline import make_pipeline

    port = free_ports(1)[0]
    work = tmp_path / "journal"
    dispatcher = ["dispatcher", "--port", str(port), "--work-dir", str(work)]
    procs = [_serve(*dispatcher)]
    procs += [_serve("worker", "--dispatcher", f"127.0.0.1:{port}") for _ in range(2)]
    try:
        x = np.arange(N, dtype=np.int64)
        ds = make_pipeline((x, x), batch_size=16, service=f"grpc://127.0.0.1:{port}")
        np.testing.assert_array_equal(np.sort(_epoch(ds)), x)
        assert any(work.iterdir())  # the journal
        # Kill the dispatcher; a new one with the same port and journal carries on.
        _kill(procs[:1])
        procs[0] = _serve(*dispatcher)
        np.testing.assert_array_equal(np.sort(_epoch(ds)), x)
    finally:
        _kill(procs)


def test_a_worker_advertises_the_address_on_its_route_to_the_dispatcher():
    from keras_tandem import cli
    from keras_tandem.data.service import _reachable_host

    # A local dispatcher: loopback. (Another machine's: this machine's address towards it.)
    assert _reachable_host("grpc://127.0.0.1:5050") == "127.0.0.1"
    assert _reachable_host("localhost:5050") in {"127.0.0.1", "[::1]"}
    args = cli.build_parser().parse_args(["data-service", "worker", "--dispatcher", "h:5050"])
    assert args.host is None  # derived from the dispatcher, not a fixed 127.0.0.1
