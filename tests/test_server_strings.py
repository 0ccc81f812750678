"""Strings end to end: a text model served by `tandem serve`, asked over HTTP.

One `tandem serve` process (started on 127.0.0.1 and a free port, stopped by
the fixture) serves a saved `TextVectorization` model; its answers must
equal `model.predict` on the same strings.
"""

import keras
import numpy as np
import pytest

from _http import cli_serve, request

TEXTS = ["a short text", "the cat sat on the mat", "", "words it never saw"]


def text_model():
    keras.utils.set_random_seed(0)
    vectorize = keras.layers.TextVectorization(max_tokens=16, output_sequence_length=5)
    vectorize.adapt(np.array(["a short text", "the cat sat", "on the mat", "a dog ran far"]))
    text = keras.Input((), dtype="string", name="text")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(16, 4)(vectorize(text)))
    return keras.Model(text, keras.layers.Dense(3)(x))


def post(port, body):
    status, _, doc = request(port, "POST", "/v1/models/text:predict", body)
    return status, doc


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("strings") / "text.keras"
    model = text_model()
    model.save(path)
    expected = model.predict(np.array(TEXTS, dtype=object), verbose=0)
    with cli_serve(path, "--max-batch-size", "4") as cli:
        assert cli.lines and cli.lines[-1].startswith("serving"), "".join(cli.lines)
        yield cli.port, expected
    assert cli.proc.returncode == 0


def test_one_short_text_answers_200_as_model_predict(served):
    port, expected = served
    status, doc = post(port, {"instances": ["a short text"]})
    assert status == 200, doc
    np.testing.assert_allclose(doc["predictions"], expected[:1], rtol=1e-5, atol=1e-6)


def test_many_texts_in_row_and_columnar_format(served):
    port, expected = served
    status, doc = post(port, {"instances": TEXTS})
    assert status == 200, doc
    np.testing.assert_allclose(doc["predictions"], expected, rtol=1e-5, atol=1e-6)
    status, doc = post(port, {"inputs": {"text": TEXTS}})
    assert status == 200, doc
    np.testing.assert_allclose(doc["outputs"], expected, rtol=1e-5, atol=1e-6)


def test_numbers_for_the_text_input_answer_400_naming_it(served):
    port, _ = served
    status, doc = post(port, {"instances": [1, 2]})
    assert status == 400
    assert "Input 'text'" in doc["error"] and "strings" in doc["error"]


def test_string_outputs_answer_as_json_strings_and_metadata_says_dt_string():
    from keras_tandem import Predictor, serve

    ids = keras.Input((2,), dtype="int64", name="ids")
    words = keras.layers.StringLookup(vocabulary=["cat", "dog"], invert=True)(ids)
    model = keras.Model(ids, words)
    with Predictor(model) as predictor, serve(predictor, name="text", port=0) as server:
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        status, doc = post(port, {"instances": [[1, 2], [2, 0]]})
        assert status == 200, doc
        assert doc["predictions"] == [["cat", "dog"], ["dog", "[UNK]"]]
        _, _, meta = request(port, "GET", "/v1/models/text/metadata")
    signature = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    (output,) = signature["outputs"].values()
    assert output["dtype"] == "DT_STRING"


def test_b64_strings_answer_as_the_same_texts_in_every_format(served):
    import base64

    port, expected = served
    coded = [{"b64": base64.b64encode(t.encode()).decode("ascii")} for t in TEXTS]
    for body, key in (({"instances": coded}, "predictions"),
                      ({"instances": [{"text": c} for c in coded]}, "predictions"),
                      ({"inputs": {"text": coded}}, "outputs")):
        status, doc = post(port, body)
        assert status == 200, doc
        np.testing.assert_allclose(doc[key], expected, rtol=1e-5, atol=1e-6)
    status, doc = post(port, {"instances": [{"b64": "%%%"}]})
    assert status == 400 and "base64" in doc["error"]
