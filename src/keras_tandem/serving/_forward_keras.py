"""The forward pass that runs whatever `model.predict` runs: a copy of the model.

`KerasCopyForward` is the fallback `_forward_choice.make_forward` chooses
when a backend's fast pass cannot trace or run a model, or has no fast pass
yet. It owns a copy of the model (a clone with the weights set, or else a save and load
round trip, which also carries lookup tables and other assets) and runs
`copy.predict_on_batch`, Keras' own predict step. Only the worker thread
touches the copy: it assigns new weights between two batches, so every batch
is still computed with one weight version. Keras APIs only: no backend is
imported here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keras_tandem.serving._forward import (
    ForwardPass,
    call_model,
    name_outputs,
    output_names,
    to_tensors,
    variable_value,
    zero_rows,
)
from keras_tandem.serving._signature import InputSignature, to_numpy_dtype


class KerasCopyForward(ForwardPass):
    """Runs `predict_on_batch` of the Predictor's own copy of the model.

    Args:
        model: a built Keras model (the original: only read).
        signature: its `InputSignature`.
        max_rows: the largest batch (rows) the worker will run.
        accept: called with a warmed-up candidate pass; returns None if its
            answers are right, else why not (the next way of copying is then
            tried).

    Raises:
        RuntimeError: no way of copying the model gave a pass that runs and
            is accepted; the message says what each way met.
    """

    call_path = "keras copy"

    def __init__(self, model: Any, signature: InputSignature, max_rows: int,
                 accept: Callable[[ForwardPass], str | None] | None = None):
        super().__init__(model, signature, max_rows)
        weights = [variable_value(w) for w in model.weights]
        problems = []
        for way, make_copy in (("clone", _clone), ("save and load", _save_and_load)):
            try:
                self._copy = make_copy(model)
                self._adopt(model, signature, weights)
                problem = accept(self) if accept is not None else None
            except Exception as e:  # noqa: BLE001 - the next way is tried, the reason kept
                problem = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if problem is None:
                self.copied_by = way
                return
            problems.append(f"{way}: {problem}")
        raise RuntimeError("No working copy of the model: " + "; ".join(problems))

    def _adopt(self, model: Any, signature: InputSignature, weights: list[np.ndarray]) -> None:
        copy = self._copy
        if not copy.built:
            call_model(copy, signature.pack(to_tensors(zero_rows(signature), signature.fields)))
        mine = [(tuple(w.shape), np.dtype(w.dtype)) for w in copy.weights]
        if mine != self.weight_specs:
            raise ValueError("the copy's weights do not line up with the model's")
        copy.set_weights(weights)
        # The copy runs unjitted, as a traced pass without XLA would (and
        # predict_on_batch would otherwise resolve "auto" on its own).
        copy.jit_compile = False
        structure = None
        for b in self.buckets:  # each bucket once: Keras traces its predict step now
            outputs = copy.predict_on_batch(self._inputs(b))
            structure = outputs
        import keras

        self._output_structure = keras.tree.map_structure(lambda _: 0, structure)
        flat = keras.tree.flatten(structure)
        leaves = [(tuple(np.shape(o))[1:], to_numpy_dtype(np.asarray(o).dtype)) for o in flat]
        indices = keras.tree.pack_sequence_as(self._output_structure, list(range(len(flat))))
        self.output_specs = name_outputs(indices, leaves, output_names(model))

    def _inputs(self, bucket: int) -> Any:
        fields = self.signature.fields
        return self.signature.pack(to_tensors([b[:bucket] for b in self.buffers], fields))

    def run(self, bucket: int) -> list[np.ndarray]:
        """Runs the first `bucket` rows of the batch buffers through the copy.

        Returns:
            The model's outputs, flattened, as NumPy arrays of `bucket` rows.
        """
        import keras

        outputs = self._copy.predict_on_batch(self._inputs(bucket))
        return [self._own(np.asarray(o)) for o in keras.tree.flatten(outputs)]

    def set_weights(self, arrays: Sequence[np.ndarray]) -> None:
        """Assigns a new weight snapshot to the copy (worker thread, between batches)."""
        self._copy.set_weights(list(arrays))

    def pack_outputs(self, flat: Sequence[Any]) -> Any:
        """Puts flat per-output values back in the structure the model returns."""
        import keras

        return keras.tree.pack_sequence_as(self._output_structure, list(flat))

    @property
    def single_output(self) -> bool:
        """Whether the model returns one tensor (not a list or dict)."""
        import keras

        return not keras.tree.is_nested(self._output_structure)


def _clone(model: Any) -> Any:
    import keras

    return keras.models.clone_model(model)


def _save_and_load(model: Any) -> Any:
    """A copy through the `.keras` format, which also carries assets (vocabularies)."""
    import keras

    # The classes the model is made of, under both names Keras may look up,
    # so that custom classes load without being registered.
    custom = {}
    for obj in [model, *model._flatten_layers()]:  # Keras' own walk of nested layers
        cls = type(obj)
        custom[cls.__name__] = cls
        custom[keras.saving.get_registered_name(cls)] = cls
    with tempfile.TemporaryDirectory(prefix="keras_tandem_copy_") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        # The model is already in this process: nothing untrusted is loaded.
        return keras.saving.load_model(path, custom_objects=custom, compile=False,
                                       safe_mode=False)
