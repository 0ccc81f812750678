"""TF Serving's own test SavedModels (`tests/data/tf_serving/`) load and answer as there.

Every signature of `half_plus_two` (TF1: y = 0.5 x + 2), `half_plus_three`
(TF1, with a regress signature declaring a float for its string input) and
the TF2 `half_plus_two` is served through the batching Predictor, one per
signature; classify / regress go through `_examples` as the routes do.
No HTTP here: `test_tf_serving_rest.py` replays TF Serving's REST cases.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from keras_tandem.server._examples import (
    classify_results,
    examples_from_json,
    prepare_examples,
    regress_results,
)
from keras_tandem.server._repository import locate_model, servable_from_saved_model
from keras_tandem.server._savedmodel import signature_models

DATA = Path(__file__).parent / "data" / "tf_serving"
HALF_PLUS_TWO = DATA / "saved_model_half_plus_two_cpu"
HALF_PLUS_THREE = DATA / "saved_model_half_plus_three"
TWO_VERSIONS = DATA / "saved_model_half_plus_two_2_versions"
TF2 = DATA / "saved_model_half_plus_two_tf2_cpu"
OPTIONS = {"max_batch_size": 8}


@pytest.fixture(scope="module")
def half_plus_two():
    servable = servable_from_saved_model(HALF_PLUS_TWO / "00000123", 123, OPTIONS)
    yield servable
    servable.close()


@pytest.fixture(scope="module")
def half_plus_three():
    servable = servable_from_saved_model(HALF_PLUS_THREE / "00000123", 123, OPTIONS)
    yield servable
    servable.close()


def classify(servable, signature, examples):
    serialized = examples_from_json({"examples": examples})
    x = prepare_examples(servable.signature_def, signature, "classify", serialized)
    outputs = servable.for_signature(signature).predictor.predict(x)
    return classify_results(servable.signature_def, signature, outputs)


def regress(servable, signature, doc):
    serialized = examples_from_json(doc)
    x = prepare_examples(servable.signature_def, signature, "regress", serialized)
    outputs = servable.for_signature(signature).predictor.predict(x)
    return regress_results(servable.signature_def, signature, outputs)


def test_half_plus_two_serves_every_signature(half_plus_two):
    assert sorted(half_plus_two.signature_names) == sorted(
        ["serving_default", "classify_x_to_y", "regress_x_to_y", "regress_x_to_y2",
         "regress_x2_to_y3"])
    got = half_plus_two.predictor.predict(np.array([[1.0], [2.0], [5.0]], np.float32))
    np.testing.assert_allclose(got, [[2.5], [3.0], [4.5]])
    assert classify(half_plus_two, "classify_x_to_y", [{"x": 2.0}]) == [[("", 3.0)]]
    assert regress(half_plus_two, "regress_x_to_y", {"examples": [{"x": 2.0}, {"x": 4.0}]}) == [
        3.0, 4.0]
    # y2 = 0.5 x + 3; the context's x is overridden by each example's own
    assert regress(half_plus_two, "regress_x_to_y2",
                   {"context": {"x": 100.0}, "examples": [{"x": 2.0}, {}]}) == [4.0, 53.0]
    # regress_x2_to_y3 takes the float tensor x2 (y3 = 0.5 x2 + 3), not examples
    got = half_plus_two.for_signature("regress_x2_to_y3").predictor.predict(
        {"inputs": np.array([[2.0]], np.float32)})
    np.testing.assert_allclose(got, [[4.0]])


def test_a_regress_signature_fed_floats_is_refused_by_its_real_input(half_plus_two):
    with pytest.raises(Exception, match="inputs"):
        regress(half_plus_two, "regress_x2_to_y3", {"examples": [{"x2": 2.0}]})


def test_half_plus_three_loads_despite_its_declared_shapes(half_plus_three):
    # tf.saved_model.load refuses it ("Shapes must be equal rank"); TF Serving serves it
    got = half_plus_three.predictor.predict({"x": np.array([[2.0], [4.0]], np.float32)})
    np.testing.assert_allclose(got, [[4.0], [5.0]])
    assert regress(half_plus_three, "tensorflow/serving/regress",
                   {"examples": [{"x": 2.0}, {"x": 1.0}]}) == [4.0, 3.5]


def test_requests_to_a_tf1_signature_share_its_batches(half_plus_two):
    import concurrent.futures

    predictor = half_plus_two.for_signature("regress_x_to_y").predictor
    x = prepare_examples(half_plus_two.signature_def, "regress_x_to_y", "regress",
                         examples_from_json({"examples": [{"x": 2.0}]}))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: predictor.predict(x), range(32)))
    assert all(np.allclose(a, [[3.0]]) for a in answers)
    assert predictor.stats()["batches"] <= predictor.stats()["requests"]


def test_metadata_is_tf_servings_own(half_plus_two):
    want = json.loads((DATA / "half_plus_two_model_metadata.json").read_text())
    assert half_plus_two.signature_def == want["metadata"]["signature_def"]["signature_def"]


def test_numbered_versions_of_any_width_pick_the_newest():
    assert locate_model(TWO_VERSIONS) == (TWO_VERSIONS / "00000124", 124)
    assert locate_model(HALF_PLUS_TWO) == (HALF_PLUS_TWO / "00000123", 123)


def test_a_tf2_savedmodel_declaring_a_batch_of_one_serves_any_batch():
    # its serving_default takes x of shape [1]; TF Serving feeds any batch, as here
    servable = servable_from_saved_model(TF2 / "00000123", 123, OPTIONS)
    try:
        assert sorted(servable.signature_names) == sorted(
            ["serving_default", "classify_x_to_y", "classify_x2_to_y3", "regress_x_to_y",
             "regress_x_to_y2", "regress_x2_to_y3"])
        np.testing.assert_allclose(
            servable.predictor.predict({"x": np.array([1.0, 2.0, 5.0], np.float32)}),
            [2.5, 3.0, 4.5])
        # TF2 writes classify signatures with the predict method; TF Serving serves them
        assert servable.signature_def["classify_x_to_y"]["method_name"] == (
            "tensorflow/serving/predict")
        assert classify(servable, "classify_x_to_y", [{"x": 2.0}]) == [[("", 3.0)]]
        assert regress(servable, "regress_x_to_y", {"examples": [{"x": 2.0}]}) == [3.0]
    finally:
        servable.close()


def test_other_fixed_batch_sizes_are_left_out_with_a_warning(tmp_path, caplog):
    import tensorflow as tf

    class TwoKinds(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a")])
        def batched(self, a):
            return {"out": a + 1.0}

        @tf.function(input_signature=[tf.TensorSpec([2], tf.float32, name="v")])
        def pair(self, v):
            return {"out": tf.reduce_sum(v)}

    module = TwoKinds()
    tf.saved_model.save(module, str(tmp_path / "1"),
                        signatures={"serving_default": module.batched, "pair": module.pair})
    with caplog.at_level(logging.WARNING, logger="keras_tandem.server"):
        models = signature_models(tmp_path / "1")
    assert sorted(models) == ["serving_default"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "'pair'" in warned and "'v'" in warned and "batch dimension" in warned
    np.testing.assert_allclose(np.asarray(models["serving_default"]({"a": np.ones((1, 2))})),
                               [[2.0, 2.0]])


def test_an_exported_keras_model_is_loaded_once_for_all_its_signatures(tmp_path, monkeypatch):
    import keras
    import tensorflow as tf

    inp = keras.Input((3,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    model.export(str(tmp_path / "1"), verbose=False)
    loads = []
    real = tf.saved_model.load
    monkeypatch.setattr(tf.saved_model, "load",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    models = signature_models(tmp_path / "1")
    assert {"serve", "serving_default"} <= set(models)
    assert len(loads) == 1
    x = np.ones((2, 3), np.float32)
    want = keras.ops.convert_to_numpy(model(x))
    for name in ("serve", "serving_default"):
        np.testing.assert_allclose(np.asarray(models[name]({"x": x})), want, rtol=1e-6)
