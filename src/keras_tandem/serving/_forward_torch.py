"""The forward pass on Keras' PyTorch backend.

`TorchForward` owns everything the Predictor's worker thread does with
PyTorch: the serving weight version as two lists of tensors (the
Predictor's own copies, on the model's device) and `model.stateless_call`
over them. Every call runs on the worker thread under `torch.inference_mode()`,
which PyTorch keeps per thread: the module-wide `train()`/`eval()` flags are
never touched (Keras' own `predict` and `fit` flip them for the whole model),
and nothing here changes autograd state on a training thread. Passing
`training=False` gives layers such as `Dropout` and `BatchNormalization`
their inference behaviour without the flags.

Keras' layers cost far more Python per call on PyTorch than the kernels of a
small batch, so each bucket is recorded once with `torch.jit.trace` (on the
worker, weights and inputs as arguments, outputs flattened) and the recorded
graph runs the batches (`executor` "torchscript"). A trace replays the
operations of one call, so a branch on the values of a tensor would be
recorded as taken once for all. Before tracing, the call is therefore first
captured by `torch.export` (non-strict, on fake tensors), which refuses any
Python decision on a tensor's values (a `cond`, `.item()`, NumPy); when it
refuses, or tracing fails, the pass runs `stateless_call` eagerly instead
(`executor` "eager"). `make_forward` checks either against the model's own
answers. Not `torch.compile`: compiled modules are not thread-safe
(pytorch#118260), and compiling takes long.
`torch.set_num_threads` is left to the user (it is process-wide): by default
PyTorch uses one intra-op thread per core.

New weights are checked and copied by NumPy in the caller's thread; the
worker wraps them as tensors (no copy on CPU) and swaps them between batches.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any

import numpy as np

from keras_tandem.serving._forward import StatelessForward, accepts_training, variable_value
from keras_tandem.serving._signature import InputSignature

# export and the warning filters are process-wide: one Predictor records at a time.
_TRACE_LOCK = threading.Lock()


class TorchForward(StatelessForward):
    """A model's forward pass under `torch.inference_mode()`, over weights it owns.

    Args:
        model: a built Keras model (PyTorch backend).
        signature: its `InputSignature`.
        max_rows: the largest batch (rows) the worker will run.

    Raises:
        ValueError: the model takes string inputs (PyTorch has no string tensors).
    """

    call_path = "torch inference_mode"
    _no_strings = "PyTorch has no string tensors for the model's string inputs"

    def __init__(self, model: Any, signature: InputSignature, max_rows: int):
        import keras
        import torch

        super().__init__(model, signature, max_rows)
        self._torch = torch
        self._tree = keras.tree
        variables = list(model.weights)
        self._device = variables[0].value.device if variables else torch.device("cpu")
        self._model = model
        # On the CPU, tensors that view the first rows of the batch buffers,
        # made once per bucket: a batch then runs with no tensor made on the way in.
        self._views = ({b: [torch.from_numpy(buf[:b]) for buf in self.buffers]
                        for b in self.buckets} if self._device.type == "cpu" else None)
        # stateless_call hands `training` straight to call(), which need not take it.
        self._call_kwargs = {"training": False} if accepts_training(model) else {}
        with self.worker_scope():
            self._trainable = [self._tensor(variable_value(v))
                               for v in model.trainable_variables]
            self._non_trainable = [self._tensor(variable_value(v))
                                   for v in model.non_trainable_variables]
            self._warm_up(model)
            self._graphs = self._trace()
        self.executor = "torchscript" if self._graphs is not None else "eager"

    def _trace(self) -> dict[int, Any] | None:
        """Per bucket, the recorded graph of one call; None where a trace would be wrong."""
        torch = self._torch
        n_trainable = len(self._trainable)
        n_weights = n_trainable + len(self._non_trainable)
        flatten = self._tree.flatten
        model, pack, kwargs = self._model, self.signature.pack, self._call_kwargs

        def flat_call(*args):
            outputs, _ = model.stateless_call(list(args[:n_trainable]),
                                              list(args[n_trainable:n_weights]),
                                              pack(list(args[n_weights:])), **kwargs)
            return tuple(flatten(outputs))

        class Flat(torch.nn.Module):
            def forward(self, *args):
                return flat_call(*args)

        args = {b: (*self._trainable, *self._non_trainable, *self._inputs(b))
                for b in self.buckets}
        graphs = {}
        try:
            with _TRACE_LOCK, warnings.catch_warnings():
                # Keras checks shapes in Python: the trace's warnings about
                # those are right for a graph per bucket; `export` has vetted
                # the values. torch.jit.trace itself is marked deprecated.
                warnings.simplefilter("ignore")
                torch.export.export(Flat(), args[self.buckets[0]], strict=False)
                for bucket in self.buckets:
                    graphs[bucket] = torch.jit.trace(flat_call, args[bucket],
                                                     check_trace=False, strict=False)
        except Exception:  # noqa: BLE001 - the eager call always works
            return None
        self.traces = len(graphs)
        self._graphs = graphs
        for bucket in self.buckets:  # TorchScript optimises a graph over its first runs
            for _ in range(3):
                self._run_graph(bucket)
        return graphs

    def _inputs(self, bucket: int) -> list[Any]:
        views = self._views
        if views is not None:
            return views[bucket]
        torch = self._torch
        device = self._device
        return [torch.as_tensor(b[:bucket], device=device) for b in self.buffers]

    def _tensor(self, array: np.ndarray) -> Any:
        # Our own copy (check_weights made it): shared with the tensor, not copied again.
        return self._torch.as_tensor(array, device=self._device)

    def _numpy_dtype(self, output: Any) -> np.dtype:
        return _to_numpy(output[:0]).dtype

    def _call(self, bucket: int) -> Any:
        torch = self._torch
        # Also entered by worker_scope; here too for the check make_forward runs
        # before the worker loop (cheap when already on).
        with torch.inference_mode():
            inputs = self.signature.pack(list(self._inputs(bucket)))
            outputs, _ = self._model.stateless_call(self._trainable, self._non_trainable,
                                                    inputs, **self._call_kwargs)
        return outputs

    def _run_graph(self, bucket: int) -> tuple[Any, ...]:
        with self._torch.inference_mode():
            return self._graphs[bucket](*self._trainable, *self._non_trainable,
                                        *self._inputs(bucket))

    def worker_scope(self) -> contextlib.AbstractContextManager:
        """`torch.inference_mode()`: PyTorch keeps it per thread, so only the worker's."""
        return self._torch.inference_mode()

    def run(self, bucket: int) -> list[np.ndarray]:
        """Runs the first `bucket` rows of the batch buffers through the model.

        Returns:
            The model's outputs, flattened, as NumPy arrays of `bucket` rows.
        """
        if self._graphs is not None:
            return [self._own(_to_numpy(o)) for o in self._run_graph(bucket)]
        return [self._own(_to_numpy(o)) for o in self._tree.flatten(self._call(bucket))]

    def _as_weight(self, array: np.ndarray) -> Any:
        return self._tensor(array)


def _to_numpy(t: Any) -> np.ndarray:
    if t.device.type != "cpu":
        t = t.cpu()
    if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16 of its own
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()
