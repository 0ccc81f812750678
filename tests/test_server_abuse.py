"""The HTTP server under abuse: bounded memory, timeouts, connection caps, quiet logs, JSON errors.

Every server is started here on 127.0.0.1 (in this process, or in a child
process where the test needs its own file-descriptor limit or its own RSS)
and stopped here. Timeouts are configured small (1 s) and waited for by
polling with a deadline; nothing asserts a duration.
"""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

from _http import read_reply, request
from _poll import wait_until
from keras_tandem import Predictor, serve
from keras_tandem.server._limits import InflightBytes, RateLimitedLog

# ------------------------------------------------------------------ helpers


def identity_model(width=4):
    x = keras.Input((width,), name="x")
    return keras.Model(x, keras.layers.Activation("linear")(x))


def raw_exchange(port, data, timeout=30):
    """Sends raw bytes, returns everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def split_reply(reply):
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    return status, headers, body


def metric(port, name, **labels):
    _, _, text = request(port, "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = dict(p.split("=") for p in line[line.index("{") + 1:line.index("}")]
                       .replace('"', "").split(","))
            if all(got.get(k) == str(v) for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def closed_by_server(sock):
    """True once the server closed `sock` (recv gives EOF or a reset)."""
    try:
        return sock.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except ConnectionError:
        return True


PREDICT = "/v1/models/m:predict"
SLOW_HEADERS = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Le"


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server():
    predictor = Predictor(identity_model(), max_batch_size=8)
    handle = serve(predictor, name="m", port=0, header_timeout_s=1.0, body_timeout_s=1.0)
    yield handle
    handle.stop()
    predictor.close()


# ----------------------------------------------------- errors as JSON


@pytest.mark.parametrize("request_bytes, status, fragment", [
    (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URL"),
    (b"GET /v1/\x00models HTTP/1.1\r\nHost: x\r\n\r\n", 400, "Bad Request"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 431,
     "header"),
    (b"GET /healthz HTTP/1.1\r\nHo st: x\r\n\r\n", 400, "header"),
])
def test_requests_that_fail_http_parsing_get_a_json_error(server, request_bytes, status,
                                                          fragment, caplog):
    before = metric(server.port, "keras_tandem_http_errors_total", kind="bad_http") or 0
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        got, headers, body = split_reply(raw_exchange(server.port, request_bytes))
    assert got == status
    assert headers[b"Content-Type"].startswith(b"application/json")
    doc = json.loads(body)
    assert list(doc) == ["error"] and fragment in doc["error"], doc
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert metric(server.port, "keras_tandem_http_errors_total", kind="bad_http") == before + 1


# ----------------------------------------------------- values: NaN, Infinity, overflow


def post_raw(port, body):
    """(status, raw response body) of one predict request."""
    status, _, raw = request(port, "POST", PREDICT, body, raw=True)
    return status, raw


def test_float32_overflow_becomes_infinity_and_the_answer_shows_it(server):
    body = b'{"instances": [[1e39, -1e39, 1e400, 0.5]]}'
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from the cast
        status, raw = post_raw(server.port, body)
    assert status == 200, raw
    assert raw == b'{"predictions":[[Infinity,-Infinity,Infinity,0.5]]}'


def test_nan_and_infinity_tokens_round_trip_in_both_formats(server):
    for body in (b'{"instances": [[NaN, Infinity, -Infinity, 1.5]]}',
                 b'{"inputs": [[NaN, Infinity, -Infinity, 1.5]]}'):
        status, raw = post_raw(server.port, body)
        assert status == 200, raw
        key = "predictions" if b"instances" in body else "outputs"
        doc = json.loads(raw)  # Python's json reads NaN/Infinity, as TF Serving writes them
        value = doc[key][0]
        assert np.isnan(value[0]) and value[1:] == [float("inf"), float("-inf"), 1.5]
        assert b"NaN" in raw and b"-Infinity" in raw and b"null" not in raw


# ----------------------------------------------------- clients that misbehave


def test_a_client_that_drops_mid_body_is_counted_499_not_500(server):
    before = metric(server.port, "keras_tandem_http_requests_total", endpoint="predict",
                    code=499) or 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"instances\": [[0.1, ")
        wait_until(lambda: server._app.inflight.used >= 1000)  # the body is being read
    wait_until(lambda: (metric(server.port, "keras_tandem_http_requests_total",
                               endpoint="predict", code=499) or 0) == before + 1,
               message="the dropped request was never counted as 499")
    assert metric(server.port, "keras_tandem_http_requests_total", endpoint="predict",
                  code=500) is None
    assert metric(server.port, "keras_tandem_http_errors_total", kind="internal") is None
    assert metric(server.port, "keras_tandem_http_errors_total", kind="client_closed") >= 1
    assert request(server.port, "POST", PREDICT, b'{"instances": [[0, 0, 0, 0]]}')[0] == 200


def test_slowloris_sockets_are_closed_after_the_header_timeout(server):
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30)
             for _ in range(5)]
    try:
        for s in socks:
            s.sendall(SLOW_HEADERS)
            s.setblocking(False)
        # A good client is answered while they hang.
        assert request(server.port, "POST", PREDICT,
                            b'{"instances": [[0, 0, 0, 0]]}')[0] == 200
        wait_until(lambda: all(closed_by_server(s) for s in socks), timeout_s=30,
                   message="slowloris sockets were not closed after the header timeout")
    finally:
        for s in socks:
            s.close()


def test_a_stalled_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 100\r\n\r\n{\"inst")
        reply = b""
        while b"}" not in reply:
            chunk = s.recv(65536)
            assert chunk, "closed without an answer"
            reply += chunk
    status, _, body = split_reply(reply)
    assert status == 408 and "stalled" in json.loads(body)["error"]


def test_bytes_in_flight_past_the_limit_get_503_with_retry_after():
    predictor = Predictor(identity_model(), max_batch_size=8)
    with serve(predictor, name="m", port=0, max_inflight_bytes=1000) as srv:
        body = b'{"instances": [[1, 2, 3, 4]]}'
        padded = body + b" " * (900 - len(body))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as first:
            # 900 bytes announced and half sent: they hold the budget.
            first.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 900\r\n\r\n" + padded[:450])
            wait_until(lambda: srv._app.inflight.used == 900)
            status, headers, doc = request(srv.port, "POST", PREDICT, padded[:500])
            assert status == 503 and headers["Retry-After"] == "1"
            assert "--max-inflight-bytes" in doc["error"]
            first.sendall(padded[450:])
            status, _, doc = split_reply(read_reply(first))
            assert status == 200 and json.loads(doc)["predictions"] == [[1, 2, 3, 4]]
        wait_until(lambda: srv._app.inflight.used == 0)
        assert request(srv.port, "POST", PREDICT, padded[:500])[0] == 200
    predictor.close()


def test_connections_over_the_cap_get_503_at_once_and_the_next_one_gets_in():
    predictor = Predictor(identity_model(), max_batch_size=8)
    with serve(predictor, name="m", port=0, max_connections=3, header_timeout_s=60) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=30)
                for _ in range(3)]
        wait_until(lambda: srv._guard.open == 3)
        status, headers, body = split_reply(raw_exchange(
            srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 503 and headers[b"Retry-After"] == b"1"
        assert "--max-connections" in json.loads(body)["error"]
        for s in idle:
            s.close()
        wait_until(lambda: srv._guard.open == 0)
        assert request(srv.port, "GET", "/healthz")[0] == 200
    predictor.close()


# --------------------------------------------- a server in a child process

SERVER_SCRIPT = textwrap.dedent("""
    import json, logging, os, resource, sys
    import keras
    from keras_tandem import Predictor, serve
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    options = json.loads(sys.argv[1])
    x = keras.Input((options.pop("width"),), name="x")
    predictor = Predictor(keras.Model(x, keras.layers.Dense(3)(x)), max_batch_size=256)
    margin = options.pop("fd_margin", None)
    if margin:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (len(os.listdir("/proc/self/fd")) + margin, hard))
    server = serve(predictor, name="m", port=0, **options)
    print("PORT", server.port, flush=True)
    sys.stdin.read()
    server.stop()
    predictor.close()
""")


class ChildServer:
    """`SERVER_SCRIPT` in a child process; its log goes to `log_path`."""

    def __init__(self, tmp_path, **options):
        self.log_path = tmp_path / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, json.dumps(options)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT"):
            self.stop()
            raise AssertionError(f"the server did not start: {line!r} "
                                 f"{self.log_path.read_text()[-2000:]}")
        self.port = int(line.split()[1])

    def status(self, field):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak(self):
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.mark.parametrize("max_connections", [None, 100_000],
                         ids=["default cap", "no cap: accept() hits EMFILE"])
def test_at_an_fd_limit_exhausted_by_slowloris_a_good_client_is_answered(tmp_path,
                                                                          max_connections):
    child = ChildServer(tmp_path, width=4, fd_margin=100, header_timeout_s=1.0,
                        max_connections=max_connections)
    slow = []
    try:
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", child.port), timeout=30)
            with contextlib.suppress(ConnectionError):  # refused at the cap: answered, closed
                s.sendall(SLOW_HEADERS)
            slow.append(s)

        def good_answer():
            # Each try is answered at once (200, or 503 at the cap, or a reset when
            # refusals come faster than they can linger), never left hanging.
            try:
                status, _, _ = request(child.port, "POST", PREDICT,
                                            b'{"instances": [[0, 0, 0, 0]]}', timeout=30)
            except ConnectionError:  # reset, or broken pipe while sending
                return False
            assert status in (200, 503)
            return status == 200

        wait_until(good_answer, timeout_s=60, message="the good client was never served")
        assert child.proc.poll() is None
        log = child.log_path.read_bytes()
        assert len(log) < 64 * 1024, log[-3000:]
        accept_errors = log.count(b"out of system resource")
        if max_connections is None:  # the cap kept descriptors free
            assert accept_errors == 0, log[-3000:]
        else:  # accept() failed many times a second; the log says so once per interval
            assert 1 <= accept_errors <= 10, log[-3000:]
    finally:
        for s in slow:
            s.close()
        child.stop()


def test_a_large_body_keeps_peak_memory_within_three_times_its_size(tmp_path):
    width = 784
    child = ChildServer(tmp_path, width=width)
    try:
        rng = np.random.default_rng(0)
        row = json.dumps(np.round(rng.random(width), 4).tolist()).encode()
        rows = 24 * 2**20 // (len(row) + 1)
        body = b'{"instances": [' + b",".join([row] * rows) + b"]}"
        small = b'{"instances": [' + b",".join([row] * 300) + b"]}"
        assert request(child.port, "POST", PREDICT, small)[0] == 200  # warm every path
        base = child.status("VmRSS")
        child.reset_peak()
        status, _, doc = request(child.port, "POST", PREDICT, body, timeout=120)
        assert status == 200 and len(doc["predictions"]) == rows
        peak = child.status("VmHWM") - base
        assert peak <= 3 * len(body), f"peak {peak / 2**20:.0f} MiB over the baseline " \
                                      f"for a {len(body) / 2**20:.0f} MiB body"
    finally:
        child.stop()


# ----------------------------------------------------- the small parts


def test_rate_limited_log_writes_one_line_with_a_count_per_interval(caplog):
    now = [0.0]
    logs = RateLimitedLog(logging.getLogger("keras_tandem.test"), interval_s=10.0,
                          clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="keras_tandem.test"):
        for _ in range(1000):
            logs.log("accept", logging.ERROR, "accept failed: %s", "EMFILE")
        logs.log("other", logging.INFO, "another kind")
        now[0] = 10.0
        logs.flush()
        logs.flush()  # nothing more to say
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["accept failed: EMFILE", "another kind",
                     "accept failed: EMFILE (999 more like this in the last 10 s)"]


def test_tandem_serve_takes_the_limits_and_serve_refuses_nonsense():
    from keras_tandem.cli import build_parser

    args = build_parser().parse_args(["serve", "m.keras", "--max-inflight-bytes", "1000",
                                      "--max-connections", "7", "--header-timeout-s", "2",
                                      "--body-timeout-s", "3"])
    assert (args.max_inflight_bytes, args.max_connections) == (1000, 7)
    assert (args.header_timeout_s, args.body_timeout_s) == (2.0, 3.0)
    defaults = build_parser().parse_args(["serve", "m.keras"])
    assert defaults.max_inflight_bytes is None and defaults.header_timeout_s == 60.0
    with pytest.raises(ValueError, match="max_connections"):
        serve(object(), name="m", max_connections=0)
    with pytest.raises(ValueError, match="header_timeout_s"):
        serve(object(), name="m", header_timeout_s=0)


def test_inflight_budget_admits_a_lone_request_of_any_size():
    budget = InflightBytes(100)
    assert budget.take(500)  # alone: admitted even over the limit
    assert not budget.take(1)
    budget.give(500)
    assert budget.take(60) and budget.take(40) and not budget.take(1)
