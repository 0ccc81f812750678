"""`tandem check MODEL`: will this model serve, with the right answers, and how fast?

A user's first command before `tandem serve`. Separation of concerns:
- `run` wires the steps and decides the exit code: find and load the model
  as the server does (`server.locate_model`, `server.load_keras_model`),
  build a `Predictor`, compare, time, report.
- `InputMaker` generates valid inputs: it reads the layers that consume each
  input (an `Embedding`'s `input_dim`, a lookup's or `TextVectorization`'s
  vocabulary) to stay inside what the model accepts.
- `compare_outputs` compares one answer with `model.predict`'s, output by
  output, and reports the largest differences.
- `check_answers` runs the three cases (one example, a batch, 8 threads at
  once) and `measure_speed` the closed-loop runs (`bench.run_clients`).
- `print_report` shows it all with rich; `--json` writes the same report.

TensorFlow and Keras are imported inside `run`, so `tandem --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_RTOL = 1e-4
REDUCED_PRECISION_RTOL = 1e-2  # mixed_float16, mixed_bfloat16, float16, bfloat16 layers
THREADS_AT_ONCE = 8
_WORDS = ("the", "a", "model", "serves", "short", "text", "of", "words", "fast", "answer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `tandem check` to `parser`."""
    parser.add_argument("model", help="a .keras file, or a base directory with numbered version "
                                      "subdirectories as `tandem serve` takes it (the newest "
                                      "complete version is checked)")
    parser.add_argument("--json", metavar="PATH", help="write the whole report here as JSON")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per speed measurement (default 1, or 0.2 with --quick)")
    parser.add_argument("--threads", type=_thread_counts, default=[1, 64],
                        help="comma-separated client thread counts to time (default 1,64)")
    parser.add_argument("--quick", action="store_true",
                        help="short speed measurements (0.2 s each)")
    parser.add_argument("--no-speed", action="store_true",
                        help="check the answers only, time nothing")
    parser.add_argument("--rtol", type=float, default=None,
                        help=f"relative tolerance against model.predict (default {DEFAULT_RTOL:g}, "
                             f"or {REDUCED_PRECISION_RTOL:g} for float16/bfloat16 models)")
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="the Predictor's max_batch_size, as for `tandem serve` (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,64; got {text!r}")
    return counts


# ---------------------------------------------------------------- the inputs


@dataclass
class Domain:
    """Which values one input takes.

    Args:
        kind: "float", "int", "bool", "text" (sentences) or "token" (single words).
        low: smallest integer (ints).
        high: one past the largest integer (ints).
        values: the values to draw from (a vocabulary), or None.
        source: what decided it, for the report.
    """

    kind: str
    low: int = 0
    high: int = 10
    values: Sequence[Any] | None = None
    source: str = "default"

    def describe(self) -> str:
        """A short description for the report."""
        if self.values is not None:
            what = "sentences of" if self.kind == "text" else "values from"
            return f"{what} {len(self.values)} vocabulary entries ({self.source})"
        if self.kind == "int":
            return f"integers in [{self.low}, {self.high}) ({self.source})"
        if self.kind == "float":
            return "standard normal"
        if self.kind == "bool":
            return "random booleans"
        return f"short words ({self.source})"


def _all_layers(model: Any) -> list[Any]:
    try:
        return list(model._flatten_layers(include_self=False, recursive=True))
    except (AttributeError, TypeError):
        return list(getattr(model, "layers", []))


def _consumers(model: Any, index: int) -> list[tuple[Any, int]] | None:
    """The layers the model's input `index` feeds directly, with its position among theirs.

    None when the model has no graph to follow (a subclassed model).
    """
    import keras

    try:
        tensor = model.inputs[index]
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    found = []
    for layer in _all_layers(model):
        for node in getattr(layer, "_inbound_nodes", []):
            try:
                tensors = keras.tree.flatten(node.input_tensors)
            except (AttributeError, TypeError, ValueError):
                continue
            positions = [i for i, t in enumerate(tensors) if t is tensor]
            if positions:
                found.append((layer, positions[0]))
                break
    return found


def _vocabulary(layer: Any) -> list[Any]:
    special = {getattr(layer, "oov_token", None), getattr(layer, "mask_token", None),
               "", "[UNK]"}
    try:
        vocab = layer.get_vocabulary()
    except Exception:  # noqa: BLE001 - an unadapted layer has none
        return []
    return [v for v in vocab if not _is_special(v, special)]


def _is_special(value: Any, special: set) -> bool:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        return value in special
    except TypeError:
        return False


def _domain_from_layer(layer: Any, string_input: bool) -> Domain | None:
    from keras import layers

    name = f"{type(layer).__name__} '{layer.name}'"
    if string_input:
        if isinstance(layer, layers.TextVectorization):
            vocab = _vocabulary(layer)
            return Domain("text", values=vocab or None, source=name)
        if isinstance(layer, (layers.StringLookup,)) and not layer.invert:
            vocab = _vocabulary(layer)
            return Domain("token", values=vocab or None, source=name)
        return None
    if isinstance(layer, layers.Embedding):
        return Domain("int", 0, int(layer.input_dim), source=name)
    if isinstance(layer, layers.CategoryEncoding):
        return Domain("int", 0, int(layer.num_tokens), source=name)
    if isinstance(layer, (layers.StringLookup, layers.IntegerLookup)):
        if layer.invert:
            return Domain("int", 0, int(layer.vocabulary_size()), source=name)
        if isinstance(layer, layers.IntegerLookup):
            vocab = _vocabulary(layer)
            if vocab:
                return Domain("int", values=[int(v) for v in vocab], source=name)
    return None


def _narrowest(domains: list[Domain]) -> Domain | None:
    """The domain every candidate accepts: a vocabulary, else the smallest range."""
    if not domains:
        return None
    with_values = [d for d in domains if d.values is not None]
    if with_values:
        return min(with_values, key=lambda d: len(d.values))
    return min(domains, key=lambda d: d.high - d.low)


def domain_of(model: Any, index: int, dtype: np.dtype) -> Domain:
    """The values input `index` of `model` takes, judged by the layers that consume it.

    The layers fed directly by the input decide; where the model has no graph
    to follow (a subclassed model), every layer of the model is considered.

    Args:
        model: the Keras model.
        index: the input's position in `Predictor.inputs`.
        dtype: the input's NumPy dtype.

    Returns:
        The `Domain` to draw values from.
    """
    kind = np.dtype(dtype).kind
    if kind == "b":
        return Domain("bool")
    string_input = kind in "OSU"
    if kind not in "iu" and not string_input:
        return Domain("float")
    found = _domain_from_layers(model, index, string_input)
    if found is not None:
        return found
    if string_input:
        return Domain("token", source="no vocabulary in the model")
    info = np.iinfo(dtype)
    if info.bits == 8 and info.min == 0:
        return Domain("int", 0, 256, source="uint8: image pixels")
    return Domain("int", 0, min(10, int(info.max) + 1), source="no layer bounds them")


def _domain_from_layers(model: Any, index: int, string_input: bool) -> Domain | None:
    consumers = _consumers(model, index)
    if consumers is None:
        candidates = [_domain_from_layer(layer, string_input) for layer in _all_layers(model)]
    else:  # a model used as a layer is looked into
        candidates = [_domain_from_layers(layer, position, string_input)
                      if hasattr(layer, "inputs") and hasattr(layer, "layers")
                      else _domain_from_layer(layer, string_input)
                      for layer, position in consumers]
    return _narrowest([d for d in candidates if d is not None])


class InputMaker:
    """Generates valid inputs for a model, as the Predictor describes them.

    Args:
        model: the Keras model.
        specs: `Predictor.inputs` (name, per-example shape, dtype of each).
        seed: seed of the random values.
    """

    def __init__(self, model: Any, specs: Sequence[Any], seed: int = 0):
        self.specs = tuple(specs)
        self.domains = [domain_of(model, i, s.dtype) for i, s in enumerate(self.specs)]
        self.structure = _structure_of(model, len(self.specs))
        self._rng = np.random.default_rng(seed)

    def batch(self, n: int) -> list[np.ndarray]:
        """n examples: one array of shape `(n, *shape)` per input, flat."""
        return [self._draw(d, s, (n, *s.shape)) for d, s in zip(self.domains, self.specs)]

    def _draw(self, domain: Domain, spec: Any, shape: tuple[int, ...]) -> np.ndarray:
        rng = self._rng
        if domain.kind == "float":
            return rng.standard_normal(shape).astype(spec.dtype)
        if domain.kind == "bool":
            return rng.random(shape) < 0.5
        if domain.kind == "int":
            if domain.values is not None:
                return rng.choice(np.asarray(domain.values), size=shape).astype(spec.dtype)
            return rng.integers(domain.low, domain.high, size=shape).astype(spec.dtype)
        words = [str(w.decode() if isinstance(w, bytes) else w)
                 for w in (domain.values or _WORDS)]
        size = int(np.prod(shape, dtype=np.int64))
        if domain.kind == "text":
            flat = [" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(size)]
        else:
            flat = [str(w) for w in rng.choice(words, size=size)]
        out = np.empty(size, dtype=object)
        out[:] = flat
        return out.reshape(shape)

    def for_keras(self, flat: Sequence[np.ndarray]) -> Any:
        """The structure `model.predict` takes, string arrays as TensorFlow tensors.

        Keras' data adapters refuse NumPy string arrays of more than one axis
        ("Invalid dtype: object"); a `tf.string` tensor is what Keras takes.
        """
        if any(a.dtype.kind in "OSU" for a in flat):
            import tensorflow as tf

            flat = [tf.constant(a.astype(str)) if a.dtype.kind in "OSU" else a for a in flat]
        return self.pack(flat)

    def pack(self, flat: Sequence[Any]) -> Any:
        """Arranges flat per-input values in the structure the model takes."""
        from keras_tandem.serving.specs import pack_inputs

        return pack_inputs(self.structure, self.specs, flat)


def _structure_of(model: Any, count: int) -> str:
    try:
        spec = model.input
    except (AttributeError, ValueError):
        spec = None
    if isinstance(spec, dict):
        return "dict"
    if isinstance(spec, list) or count > 1:
        return "list"
    return "single"


def _rows(flat: Sequence[np.ndarray], index: Any) -> list[np.ndarray]:
    return [a[index] for a in flat]


# ---------------------------------------------------------------- comparing


def compare_outputs(actual: Any, expected: Any, rtol: float) -> dict[str, Any]:
    """Compares an answer with `model.predict`'s, output by output.

    Floats agree when `|actual - expected| <= rtol * (|expected| + max|expected|)`
    (`numpy.testing.assert_allclose`'s rule with the output's scale as `atol`,
    so values near zero are not held to an impossible relative bound); NaN
    matches NaN; integers, booleans and strings must be equal.

    Args:
        actual: the Predictor's answer (any structure of arrays).
        expected: `model.predict`'s answer for the same rows, same structure.
        rtol: the relative tolerance.

    Returns:
        `ok`, `max_abs_diff`, `max_rel_diff` (relative to each output's
        scale) and `message` (what differs, empty when `ok`).
    """
    import keras

    got = keras.tree.flatten_with_path(actual)
    want = keras.tree.flatten_with_path(expected)
    result = {"ok": True, "max_abs_diff": 0.0, "max_rel_diff": 0.0, "message": ""}
    if [p for p, _ in got] != [p for p, _ in want]:
        return {**result, "ok": False, "message": (
            f"the outputs are structured differently: {[p for p, _ in got]}, model.predict "
            f"gives {[p for p, _ in want]}")}
    problems = []
    for (path, a), (_, e) in zip(got, want):
        name = "output " + ("/".join(map(str, path)) if path else "0")
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape:
            problems.append(f"{name}: shape {a.shape}, model.predict gives {e.shape}")
            continue
        if e.dtype.kind in "OSU" or a.dtype.kind in "OSU":
            same = _as_text(a) == _as_text(e)
            if not np.all(same):
                problems.append(f"{name}: {int(np.size(same) - np.sum(same))} of "
                                f"{np.size(same)} strings differ")
            continue
        if e.dtype.kind in "iub" and a.dtype.kind in "iub":
            diff = np.abs(a.astype(np.int64) - e.astype(np.int64))
            worst = float(diff.max()) if diff.size else 0.0
            result["max_abs_diff"] = max(result["max_abs_diff"], worst)
            if worst:
                problems.append(f"{name}: {int(np.count_nonzero(diff))} of {diff.size} "
                                f"integers differ (max difference {worst:g})")
            continue
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        finite = np.abs(e64[np.isfinite(e64)])
        scale = float(finite.max()) if finite.size else 0.0
        atol = rtol * scale if scale > 0 else rtol
        # numpy.testing.assert_allclose's rule, with the output's scale as atol.
        close = np.isclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True)
        diff = np.where(np.isnan(a64) & np.isnan(e64), 0.0, np.abs(a64 - e64))
        worst = float(np.nanmax(diff)) if diff.size else 0.0
        worst = float("inf") if np.isnan(worst) else worst
        result["max_abs_diff"] = max(result["max_abs_diff"], worst)
        result["max_rel_diff"] = max(result["max_rel_diff"], worst / scale if scale else worst)
        if not np.all(close):
            at = np.unravel_index(int(np.argmax(np.where(close, -1.0, np.nan_to_num(
                diff, nan=np.inf)))), diff.shape)
            where = [int(i) for i in at]
            problems.append(
                f"{name}: {int(np.size(close) - np.sum(close))} of {close.size} values differ "
                f"beyond rtol={rtol:g} (atol={atol:.3g}); the largest at {where}: Predictor "
                f"{a64[at]:.7g}, model.predict {e64[at]:.7g}")
    if problems:
        result.update(ok=False, message="; ".join(problems))
    return result


def _as_text(x: np.ndarray) -> np.ndarray:
    flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in x.ravel()]
    return np.array(flat, dtype=object).reshape(x.shape)


def _index(answer: Any, i: Any) -> Any:
    import keras

    return keras.tree.map_structure(lambda a: np.asarray(a)[i], answer)


def check_answers(predictor: Any, model: Any, maker: InputMaker,
                  rtol: float) -> list[dict[str, Any]]:
    """Compares the Predictor with `model.predict`: one example, a batch, 8 threads at once.

    Args:
        predictor: the Predictor under test.
        model: the Keras model it serves.
        maker: generates the inputs.
        rtol: the relative tolerance.

    Returns:
        One dict per case: `case`, `requests`, and `compare_outputs`'s fields.
        A case whose requests raise fails with the error as its message.
    """
    cases = []
    batch_rows = 5  # not a power of two: the Predictor pads it to a bucket
    per_thread = 6
    flat = maker.batch(1 + batch_rows + THREADS_AT_ONCE * per_thread)
    expected = model.predict(maker.for_keras(flat), verbose=0)

    def record(case: str, requests: int, run: Callable[[], list[tuple[Any, Any]]]) -> None:
        try:
            pairs = run()
        except Exception as e:  # noqa: BLE001 - the reason is the report
            cases.append({"case": case, "requests": requests, "ok": False, "max_abs_diff": None,
                          "max_rel_diff": None, "message": f"{type(e).__name__}: {e}"})
            return
        results = [compare_outputs(a, e, rtol) for a, e in pairs]
        bad = [r["message"] for r in results if not r["ok"]]
        cases.append({
            "case": case, "requests": requests, "ok": not bad,
            "max_abs_diff": max(r["max_abs_diff"] for r in results),
            "max_rel_diff": max(r["max_rel_diff"] for r in results),
            "message": bad[0] if bad else "",
        })

    def one_example():
        x = maker.pack(_rows(flat, 0))
        return [(predictor.predict(x), _index(expected, 0))]

    def a_batch():
        rows = slice(1, 1 + batch_rows)
        return [(predictor.predict(maker.pack(_rows(flat, rows))), _index(expected, rows))]

    def threads():
        start = 1 + batch_rows
        plans = []  # per thread: (rows index or int for one example) of each request
        for t in range(THREADS_AT_ONCE):
            base = start + t * per_thread
            sizes = [1 + (t + r) % 4 for r in range(3)]
            plans.append([base] + [slice(base, base + k) for k in sizes])
        answers: list[list[Any]] = [[] for _ in plans]
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(plans))

        def client(t: int) -> None:
            try:
                barrier.wait(predictor.timeout_s)
                for rows in plans[t]:
                    answers[t].append(predictor.predict(maker.pack(_rows(flat, rows))))
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the checking thread
                errors.append(e)

        pool = [threading.Thread(target=client, args=(t,), daemon=True)
                for t in range(len(plans))]
        for th in pool:
            th.start()
        for th in pool:
            th.join(predictor.timeout_s * 4 + 30)
        if any(th.is_alive() for th in pool):
            raise TimeoutError("a client thread got no answer")
        if errors:
            raise errors[0]
        return [(a, _index(expected, rows)) for plan, got in zip(plans, answers)
                for rows, a in zip(plan, got)]

    record("one example", 1, one_example)
    record(f"a batch of {batch_rows}", 1, a_batch)
    record(f"{THREADS_AT_ONCE} threads at once", THREADS_AT_ONCE * 4, threads)
    return cases


# ---------------------------------------------------------------- speed


def measure_speed(predictor: Any, model: Any, maker: InputMaker, thread_counts: Sequence[int],
                  seconds: float) -> list[dict[str, Any]]:
    """Closed-loop requests/s of one example each: the Predictor and two baselines.

    The baselines are `model.predict` per request and a lock around
    `predict_on_batch`. `model.predict` calls are serialised too: Keras does not
    promise it is thread-safe, and many threads calling it at once have aborted
    the process (`tandem bench predict` runs that case in a child process).

    Args:
        predictor: the Predictor.
        model: the Keras model.
        maker: generates the inputs.
        thread_counts: client thread counts.
        seconds: how long each measurement runs.

    Returns:
        One row per technique and thread count: `technique`, `threads`,
        `rps`, `p50_ms`, `p99_ms`, `errors`.
    """
    from keras_tandem.bench import run_clients

    flat = maker.batch(16)
    singles = [maker.pack(_rows(flat, i)) for i in range(16)]
    batches = [maker.for_keras(_rows(flat, slice(i, i + 1))) for i in range(16)]
    lock = threading.Lock()

    def predict_locked(x):
        with lock:
            return model.predict(x, verbose=0)

    def on_batch_locked(x):
        with lock:
            return model.predict_on_batch(x)

    predict_locked(batches[0])
    on_batch_locked(batches[0])
    techniques = [("Predictor", predictor.predict, singles),
                  ("model.predict per request", predict_locked, batches),
                  ("lock + predict_on_batch", on_batch_locked, batches)]
    rows = []
    for threads in thread_counts:
        for name, call, data in techniques:
            row = run_clients(call, data, threads, seconds)
            rows.append({"technique": name, "threads": threads, **row})
    return rows


# ---------------------------------------------------------------- report


def print_report(report: dict[str, Any]) -> None:
    """Prints the report with rich: inputs, outputs, answers, speed, verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=150)
    console.print(f"[bold]tandem check[/] {escape(report['model'])}"
                  + (f"  (version {report['version']}: {escape(report['file'])})"
                     if report.get("version") is not None else ""))
    for title, key in (("Inputs", "inputs"), ("Outputs", "outputs")):
        if report.get(key):
            table = Table(title=title)
            for c in ("name", "shape", "dtype") + (("values",) if key == "inputs" else ()):
                table.add_column(c)
            for spec in report[key]:
                table.add_row(escape(spec["name"]), str(tuple(spec["shape"])), spec["dtype"],
                              *((escape(spec.get("values", "")),) if key == "inputs" else ()))
            console.print(table)
    if report.get("call_path") is not None:
        console.print(f"call path: [bold]{report['call_path']}[/]")
    if report.get("answers"):
        table = Table(title=f"Predictor vs model.predict (rtol {report['rtol']:g})")
        for c in ("case", "requests", "max abs diff", "max rel diff", "result"):
            table.add_column(c, justify="left" if c in ("case", "result") else "right")
        for c in report["answers"]:
            table.add_row(c["case"], str(c["requests"]), _fmt(c["max_abs_diff"]),
                          _fmt(c["max_rel_diff"]),
                          "[green]equal[/]" if c["ok"] else f"[red]{escape(c['message'])}[/]")
        console.print(table)
    if report.get("speed"):
        lock_rps = {r["threads"]: r["rps"] for r in report["speed"]
                    if r["technique"] == "lock + predict_on_batch"}
        table = Table(title=f"Requests/s, one example each ({report['seconds']:g} s per row)")
        for c in ("technique", "threads", "req/s", "p50 ms", "p99 ms", "vs lock", "errors"):
            table.add_column(c, justify="left" if c == "technique" else "right")
        for r in report["speed"]:
            base = lock_rps.get(r["threads"])
            table.add_row(r["technique"], str(r["threads"]), f"{r['rps']:,.0f}",
                          _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
                          f"{r['rps'] / base:.3g}x" if base else "-", str(r["errors"]))
        console.print(table)
    style = "bold green" if report["ok"] else "bold red"
    console.print(f"[{style}]{escape(report['verdict'])}[/]")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}"


def _spec_dict(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": str(spec.dtype)}


def _rtol_for(model: Any) -> float:
    for layer in [model, *_all_layers(model)]:
        compute = getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None)
        if compute in ("float16", "bfloat16"):
            return REDUCED_PRECISION_RTOL
    return DEFAULT_RTOL


# ---------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    """Checks the model; prints the report; returns 0 when it serves with equal answers, else 1."""
    report: dict[str, Any] = {"model": str(args.model), "file": None, "version": None,
                              "inputs": [], "outputs": [], "call_path": None, "rtol": None,
                              "answers": [], "speed": [], "seconds": None, "ok": False,
                              "verdict": "", "reason": ""}
    try:
        _check(args, report)
    except Exception as e:  # noqa: BLE001 - reported as a failure, never as "OK"
        report["reason"] = f"the check itself failed: {type(e).__name__}: {e}"
    finally:
        report["ok"] = not report["reason"]
        report["verdict"] = (
            f"OK: the Predictor answers as model.predict does; serve it with "
            f"`tandem serve {args.model}`" if report["ok"] else f"FAIL: {report['reason']}")
        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


def _check(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from keras_tandem import Predictor
    from keras_tandem.server import load_keras_model, locate_model

    try:
        path, version = locate_model(args.model)
    except ValueError as e:
        report["reason"] = str(e)
        return
    report.update(file=str(path), version=version)
    try:
        model = load_keras_model(path)
    except Exception as e:  # noqa: BLE001 - the reason is the report
        report["reason"] = (f"{path} does not load as `tandem serve` loads it (safe_mode=True): "
                            f"{type(e).__name__}: {e}")
        return
    try:
        predictor = Predictor(model, max_batch_size=args.max_batch_size)
    except Exception as e:  # noqa: BLE001 - the reason is the report
        report["reason"] = f"the Predictor cannot serve this model: {type(e).__name__}: {e}"
        return
    with predictor:
        maker = InputMaker(model, predictor.inputs, seed=args.seed)
        report["inputs"] = [{**_spec_dict(s), "values": d.describe()}
                            for s, d in zip(predictor.inputs, maker.domains)]
        report["outputs"] = [_spec_dict(s) for s in predictor.outputs]
        report["call_path"] = predictor.stats()["call_path"]
        rtol = args.rtol if args.rtol is not None else _rtol_for(model)
        report["rtol"] = rtol
        try:
            report["answers"] = check_answers(predictor, model, maker, rtol)
        except Exception as e:  # noqa: BLE001 - model.predict itself failed
            report["reason"] = (f"model.predict fails on the generated inputs, so there is "
                                f"nothing to compare with: {type(e).__name__}: {e}")
            return
        report["call_path"] = predictor.stats()["call_path"]
        failed = [c for c in report["answers"] if not c["ok"]]
        if failed:
            report["reason"] = (f"the Predictor's answers differ from model.predict "
                                f"({failed[0]['case']}): {failed[0]['message']}")
            return
        if args.no_speed:
            return
        seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 1.0)
        report["seconds"] = seconds
        report["speed"] = measure_speed(predictor, model, maker, args.threads, seconds)
