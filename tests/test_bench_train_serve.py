"""`tandem bench train-serve` runs end to end (tiny settings) and reports its ratios."""

import json

from keras_tandem import cli


def test_train_serve_bench_reports_every_ratio(tmp_path, capsys):
    out = tmp_path / "train-serve.json"
    args = cli.build_parser().parse_args([
        "bench", "train-serve", "--quick", "--skip-naive", "--reps", "1", "--seconds", "0.3",
        "--rate", "200", "--threads", "4", "--json", str(out)])
    assert args.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "train-serve" and doc["config"]["rate"] == 200
    rows = {r["case"]: r for r in doc["rows"]}
    assert set(rows) == {"alone", "Predictor, open loop", "Predictor, closed loop"}
    for case in ("Predictor, open loop", "Predictor, closed loop"):
        assert rows[case]["train_sps"] > 0 and rows[case]["served_rps"] > 0
        assert rows[case]["versions_published"] >= 1 and rows[case]["versions_served"] >= 1
    printed = capsys.readouterr().out
    for name in ("train_vs_alone", "train_vs_alone_naive", "train_vs_alone_closed",
                 "served_fraction", "p99_ms", "p99_sent_ms"):
        assert name in doc["ratios"] and f"\n{name}=" in printed
    assert doc["ratios"]["train_vs_alone"] > 0 and doc["ratios"]["train_vs_alone_naive"] is None
    assert rows["Predictor, open loop"]["mean_batch"] >= 1
    for case in ("Predictor, open loop", "Predictor, closed loop"):  # CPU per answer
        assert rows[case]["cpu_us"] > 0 and rows[case]["serve_cpu_us"] is not None
    assert "cpu_us" in doc["ratios"] and "\ncpu_us=" in printed
    open_loop = rows["Predictor, open loop"]  # thread by thread: the worker's and the clients'
    assert open_loop["worker_cpu_us"] > 0 and open_loop["client_cpu_us"] > 0
    assert "\nworker_cpu_us=" in printed and "\nclient_cpu_us=" in printed
    assert doc["config"]["max_delay_ms"] > 0


def test_ratios_pair_each_case_with_the_alone_runs_beside_it():
    from keras_tandem.bench import train_serve

    # In run order; training alone drifts from 100 to 200 samples/s over the run.
    raw = [{"case": "alone", "rep": 0, "train_sps": 100.0},
           {"case": "Predictor, open loop", "rep": 0, "train_sps": 90.0},
           {"case": "alone", "rep": 0, "train_sps": 200.0},
           {"case": "Predictor, open loop", "rep": 1, "train_sps": 140.0},
           {"case": "alone", "rep": 1, "train_sps": 200.0},
           {"case": "alone (naive process)", "rep": 0, "train_sps": 50.0},
           {"case": "model.predict, open loop", "rep": 0, "train_sps": 5.0},
           {"case": "alone (naive process)", "rep": 0, "train_sps": 50.0}]
    train_serve._pair_with_alone(raw)
    assert raw[1]["train_vs_alone"] == 0.6  # 90 against the mean of 100 and 200
    assert raw[3]["train_vs_alone"] == 0.7  # 140 against 200 and 200
    ratios = train_serve._ratios(train_serve._combine(raw))
    assert abs(ratios["train_vs_alone"] - 0.65) < 1e-9  # the median of 0.6 and 0.7
    assert ratios["train_vs_alone_naive"] == 0.1  # against its own process's alone runs


def test_serve_cpu_takes_off_what_training_alone_spent_per_sample():
    from keras_tandem.bench import train_serve

    raw = [{"case": "alone", "rep": 0, "train_sps": 100.0, "cpu_s": 1.0, "train_samples": 100},
           {"case": "Predictor, open loop", "rep": 0, "train_sps": 90.0, "cpu_s": 1.5,
            "train_samples": 90, "answered": 1000},
           {"case": "alone", "rep": 0, "train_sps": 100.0, "cpu_s": 1.4, "train_samples": 100}]
    train_serve._pair_with_alone(raw)
    # Alone: 0.012 CPU s per sample (the mean of 0.010 and 0.014), so training 90 samples
    # accounts for 1.08 of the case's 1.5 CPU s; 0.42 s over 1,000 answers.
    assert abs(raw[1]["serve_cpu_us"] - 420.0) < 1e-6


def test_every_case_runs_between_two_alone_runs():
    from keras_tandem.bench import train_serve

    order = [case for _, case in train_serve._sequence(("alone", "open", "alone", "closed"), 2)]
    assert order == ["alone", "open", "alone", "closed", "alone", "open", "alone", "closed",
                     "alone"]


def test_open_loop_summary_counts_requests_never_answered():
    from keras_tandem.bench import train_serve

    load = train_serve._Load(lambda x: None, [None], threads=2, rate=100.0)  # a request / 10 ms
    load._t0, load._stopped = 0.0, 0.2
    period = 2 / 100.0
    # Client 0 answers each of its requests 1 ms after it is due; client 1 is stuck.
    load.records[0] = [(0.0 + k * period, 0.0 + k * period + 0.001, 1, 0.0 + k * period)
                       for k in range(5)]
    summary = load.summary(0.0, 0.095)
    assert summary["served_fraction"] == 0.5  # 5 of the 10 requests due in the window
    # Client 1's five unanswered requests waited until the load stopped (0.11-0.19 s).
    assert 180 < summary["p99_ms"] < 191
    # Sent, client 1 has one request only (due at 10 ms, waiting 190 ms); the others
    # were never sent. Client 0's five took 1 ms each from sending.
    waits = sorted(load._sent_waits(0.0, 0.095))
    assert len(waits) == 6 and max(waits[:5]) < 0.0011 and abs(waits[5] - 0.19) < 1e-9


def test_open_loop_latency_from_sending_leaves_out_a_client_threads_own_lateness():
    from keras_tandem.bench import train_serve

    load = train_serve._Load(lambda x: None, [None], threads=1, rate=100.0)  # every 10 ms
    load._t0, load._stopped = 0.0, 1.0
    # The thread woke 20 ms late for every request; each answer took 1 ms after sending.
    load.records[0] = [(k * 0.01, k * 0.01 + 0.021, 1, k * 0.01 + 0.02) for k in range(50)]
    summary = load.summary(0.0, 0.49)
    assert 20.9 < summary["p99_ms"] < 21.1  # response time, from the due time
    assert 0.9 < summary["p99_sent_ms"] < 1.1  # service time, from sending


def test_open_loop_latency_from_sending_is_never_negative_when_an_answer_comes_after_stop():
    from keras_tandem.bench import train_serve

    load = train_serve._Load(lambda x: None, [None], threads=1, rate=100.0)  # every 10 ms
    load._t0, load._stopped = 0.0, 0.2
    # A slow (naive) client: its request due at 0 s was answered at 0.3 s, after the
    # load stopped; it then saw the stop and sent none of the requests due since.
    load.records[0] = [(0.0, 0.3, 1, 0.0)]
    assert load._sent_waits(0.0, 0.095) == [0.3]
    assert load.summary(0.0, 0.095)["p99_sent_ms"] == 300.0


def test_progress_line_of_a_row_with_no_request_sent_before_the_stop(capsys):
    # The naive clients can answer nothing they sent in time: no latency from sending.
    from keras_tandem.bench import train_serve

    row = {"case": "model.predict, open loop", "rep": 0, "train_sps": 1234.0,
           "served_rps": 3.0, "p99_ms": 900.0, "p99_sent_ms": None}
    train_serve._progress(row)
    line = capsys.readouterr().out
    assert "served 3 req/s" in line and "p99 900.0 ms" in line and "from sending" not in line
    row["p99_sent_ms"] = 12.5
    train_serve._progress(row)
    assert "(12.5 ms from sending)" in capsys.readouterr().out
