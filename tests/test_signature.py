"""A model's inputs and outputs: parsing requests, the casting table, `Predictor.inputs/outputs`."""

import keras
import numpy as np
import pytest

from keras_tandem import InvalidInputError, Predictor
from keras_tandem.server._protocol import parse_predict_body
from keras_tandem.serving._signature import InputSignature
from keras_tandem.serving.specs import ArraySpec, castable


def single_input(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def two_inputs_two_outputs(seed=0):
    keras.utils.set_random_seed(seed)
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b", dtype="int32")
    h = keras.layers.Concatenate()([a, keras.ops.cast(b, "float32")])
    return keras.Model([a, b], [keras.layers.Dense(1, name="score")(h),
                                keras.layers.Dense(2, name="probs")(h)])


def dict_in_dict_out(seed=0):
    keras.utils.set_random_seed(seed)
    a = keras.Input((3,), name="a")
    b = keras.Input((2, 2), name="b")
    h = keras.layers.Concatenate()([a, keras.layers.Flatten()(b)])
    return keras.Model({"a": a, "b": b}, {"value": keras.layers.Dense(1)(h),
                                          "logits": keras.layers.Dense(5)(h)})


# ------------------------------------------------------------------- parsing


def test_single_input_takes_one_example_or_a_batch():
    sig = InputSignature.from_model(single_input())
    assert sig.structure == "single" and sig.fields == (ArraySpec(sig.fields[0].name, (4,),
                                                                  np.dtype("float32")),)
    (arr,), rows, single = sig.parse([1, 2, 3, 4])
    assert (rows, single, arr.dtype, arr.shape) == (1, True, np.float32, (4,))
    (arr,), rows, single = sig.parse(np.ones((3, 4), np.float64))
    assert (rows, single, arr.dtype, arr.shape) == (3, False, np.float32, (3, 4))


def test_list_inputs_take_a_list_or_a_dict_by_name():
    sig = InputSignature.from_model(two_inputs_two_outputs())
    assert sig.structure == "list" and [f.name for f in sig.fields] == ["a", "b"]
    (a, b), rows, single = sig.parse([np.ones((2, 3)), np.ones((2, 2), np.int64)])
    assert (rows, single, a.dtype, b.dtype) == (2, False, np.float32, np.int32)
    (a, b), rows, single = sig.parse({"b": [1, 2], "a": [0.5, 0.5, 0.5]})
    assert (rows, single, a.shape, b.shape) == (1, True, (3,), (2,))
    with pytest.raises(InvalidInputError, match=r"takes 2 inputs \['a', 'b'\]"):
        sig.parse(np.ones((2, 3)))
    with pytest.raises(InvalidInputError, match="disagree on the batch"):
        sig.parse([np.ones((2, 3)), np.ones((3, 2), np.int32)])


def test_dict_inputs_name_what_is_missing_or_unknown():
    sig = InputSignature.from_model(dict_in_dict_out())
    assert sig.structure == "dict"
    assert {f.name: f.shape for f in sig.fields} == {"a": (3,), "b": (2, 2)}
    (a, b), rows, _ = sig.parse({"a": np.ones((4, 3)), "b": np.ones((4, 2, 2))})
    assert rows == 4 and a.shape == (4, 3) and b.shape == (4, 2, 2)
    with pytest.raises(InvalidInputError, match=r"Missing input\(s\) \['b'\]"):
        sig.parse({"a": np.ones(3)})
    with pytest.raises(InvalidInputError, match=r"Unknown input name\(s\) \['c'\]"):
        sig.parse({"a": np.ones(3), "b": np.ones((2, 2)), "c": 1})
    with pytest.raises(InvalidInputError, match="pass a dict"):
        sig.parse([np.ones(3), np.ones((2, 2))])


def test_shape_errors_name_the_input_and_the_expected_shapes():
    sig = InputSignature.from_model(dict_in_dict_out())
    with pytest.raises(InvalidInputError) as e:
        sig.parse({"a": np.ones((2, 5)), "b": np.ones((2, 2, 2))})
    message = str(e.value)
    assert "Input 'a'" in message and "shape (2, 5)" in message
    assert "one example of shape (3,) or a batch of shape (n, 3), float32" in message
    with pytest.raises(InvalidInputError, match="Input 'a' got an empty batch"):
        sig.parse({"a": np.ones((0, 3)), "b": np.ones((0, 2, 2))})


# ---------------------------------------------------------- the casting table


@pytest.mark.parametrize("source, target, ok", [
    ("float64", "float32", True),
    ("int64", "float32", True),
    ("uint8", "float16", True),
    ("bool", "float32", True),
    ("int64", "int32", True),
    ("uint16", "int64", True),
    ("bool", "int32", True),
    ("bool", "bool", True),
    ("float32", "int32", False),
    ("float32", "bool", False),
    ("int32", "bool", False),
    ("complex64", "float32", False),
    ("<U3", "float32", False),
    ("object", "float32", False),
    ("<U3", "<U5", True),  # a kind the table does not list takes its own kind only
    ("float32", "<U5", False),
    ("<U3", "object", True),  # str, bytes and objects into a string input
    ("|S3", "object", True),
    ("object", "object", True),
    ("float32", "object", False),
    ("int64", "object", False),
    ("bool", "object", False),
])
def test_castable_is_the_one_table(source, target, ok):
    assert castable(source, target) is ok


@pytest.mark.parametrize("source, target", [
    ("int64", "float32"), ("bool", "int32"), ("float32", "int32"), ("<U3", "float32"),
    ("complex64", "float32"), ("float64", "float32"), ("int32", "bool"),
])
def test_request_parsing_casts_by_the_table(source, target):
    sig = InputSignature([ArraySpec("x", (2,), np.dtype(target))], "single")
    values = np.array([1, 0]).astype(source)
    if castable(source, target):
        (arr,), _, _ = sig.parse(values)
        assert arr.dtype == np.dtype(target)
    else:
        with pytest.raises(InvalidInputError, match="cannot be cast to the model's dtype"):
            sig.parse(values)


@pytest.mark.parametrize("literal, parsed", [("1.5", "float64"), ("2", "int64"), ("true", "bool")])
@pytest.mark.parametrize("target", ["float32", "int32", "bool"])
def test_the_server_casts_json_values_by_the_same_table(literal, parsed, target):
    # What the table allows is cast while parsing; the rest is left for the
    # Predictor to refuse with its message.
    field = ArraySpec("x", (2,), np.dtype(target))
    x, _ = parse_predict_body(f'{{"instances": [[{literal}, {literal}]]}}'.encode(), [field])
    assert x.dtype == (np.dtype(target) if castable(parsed, target) else np.dtype(parsed))


# ------------------------------------------------- Predictor.inputs and outputs


def test_inputs_and_outputs_of_a_single_input_model():
    model = single_input()
    with Predictor(model, max_batch_size=4) as p:
        (spec,) = p.inputs
        assert (spec.shape, spec.dtype) == ((4,), np.dtype("float32"))
        assert p.outputs == (ArraySpec("output_0", (3,), np.dtype("float32")),)
        assert p.predict(np.zeros(spec.shape, spec.dtype)).shape == p.outputs[0].shape


def test_inputs_and_outputs_of_a_multi_input_model_use_its_names():
    model = two_inputs_two_outputs()
    with Predictor(model, max_batch_size=4) as p:
        assert p.inputs == (ArraySpec("a", (3,), np.dtype("float32")),
                            ArraySpec("b", (2,), np.dtype("int32")))
        assert p.outputs == (ArraySpec("score", (1,), np.dtype("float32")),
                             ArraySpec("probs", (2,), np.dtype("float32")))
        answer = p.predict([np.zeros(s.shape, s.dtype) for s in p.inputs])
        assert [a.shape for a in answer] == [s.shape for s in p.outputs]


def test_outputs_of_a_dict_output_model_are_its_keys_in_its_order():
    model = dict_in_dict_out()
    with Predictor(model, max_batch_size=4) as p:
        assert [(s.name, s.shape) for s in p.inputs] == [("a", (3,)), ("b", (2, 2))]
        assert [(s.name, s.shape) for s in p.outputs] == [("value", (1,)), ("logits", (5,))]
        answer = p.predict({s.name: np.zeros(s.shape, s.dtype) for s in p.inputs})
        assert list(answer) == [s.name for s in p.outputs]
        assert {k: v.shape for k, v in answer.items()} == {s.name: s.shape for s in p.outputs}


def test_array_specs_are_frozen():
    spec = ArraySpec("x", (2,), np.dtype("float32"))
    with pytest.raises(AttributeError):
        spec.name = "y"


# ------------------------------------------------------------------ strings

TEXT = ArraySpec("text", (), np.dtype(object))
WORDS = ArraySpec("words", (2,), np.dtype(object))


@pytest.mark.parametrize("request_, rows, single, expected", [
    ("a short text", 1, True, ["a short text"]),
    (b"bytes", 1, True, [b"bytes"]),
    (np.str_("numpy str"), 1, True, ["numpy str"]),
    (["one", "two"], 2, False, ["one", "two"]),
    (["str", b"bytes"], 2, False, ["str", b"bytes"]),  # bytes stay bytes, not "b'bytes'"
    (np.array(["u", "v"]), 2, False, ["u", "v"]),
    (np.array([b"s", b"t"]), 2, False, [b"s", b"t"]),
    (np.array(["o", b"p"], dtype=object), 2, False, ["o", b"p"]),
])
def test_a_string_input_takes_str_bytes_lists_and_arrays(request_, rows, single, expected):
    sig = InputSignature([TEXT], "single")
    (arr,), n, one = sig.parse(request_)
    assert (n, one) == (rows, single)
    assert arr.dtype == np.dtype(object)
    assert list(np.atleast_1d(arr)) == expected
    assert all(type(v) in (str, bytes) for v in np.atleast_1d(arr))


def test_a_string_input_with_a_shape_takes_one_example_or_a_batch():
    sig = InputSignature([WORDS], "single")
    assert sig.parse(["a", "b"])[1:] == (1, True)
    assert sig.parse([["a", "b"], ["c", "d"], ["e", "f"]])[1:] == (3, False)
    with pytest.raises(InvalidInputError, match=r"Input 'words' got shape \(3,\)"):
        sig.parse(["a", "b", "c"])


@pytest.mark.parametrize("bad, fragment", [
    (3, "int 3: expected"),
    ([1.5, 2.5], "float 1.5 at flat position 0"),
    (np.array([1, 2]), "int64 values"),
    (np.array(["a", None], dtype=object), "NoneType None at flat position 1"),
    (["a", 7], "int 7 at flat position 1"),
    ([["a", "b"], ["c"]], "list"),
])
def test_numbers_for_a_string_input_name_the_input_and_what_it_takes(bad, fragment):
    sig = InputSignature([TEXT], "single")
    with pytest.raises(InvalidInputError) as info:
        sig.parse(bad)
    message = str(info.value)
    assert "Input 'text'" in message and fragment in message
    assert "strings (str or bytes)" in message


def test_a_string_for_a_number_input_is_refused_by_name():
    sig = InputSignature([ArraySpec("x", (), np.dtype("float32"))], "single")
    with pytest.raises(InvalidInputError, match=r"Input 'x' got strings .*float32"):
        sig.parse("1.5")


def test_strings_inside_dict_and_list_requests():
    fields = [ArraySpec("text", (), np.dtype(object)), ArraySpec("n", (2,), np.dtype("float32"))]
    for structure, request_ in [("dict", {"text": ["a", b"b"], "n": [[1, 2], [3, 4]]}),
                                ("list", [["a", b"b"], [[1, 2], [3, 4]]])]:
        sig = InputSignature(fields, structure)
        (text, n), rows, one = sig.parse(request_)
        assert (rows, one) == (2, False)
        assert list(text) == ["a", b"b"] and n.dtype == np.float32
    with pytest.raises(InvalidInputError, match="Input 'text'"):
        InputSignature(fields, "dict").parse({"text": [1, 2], "n": [[1, 2], [3, 4]]})


def test_the_server_passes_strings_through_as_objects():
    x, _ = parse_predict_body(b'{"instances": ["a short text", "another"]}', [TEXT])
    assert x.dtype == np.dtype(object) and list(x) == ["a short text", "another"]
    (arr,), rows, _ = InputSignature([TEXT], "single").parse(x)
    assert rows == 2 and list(arr) == ["a short text", "another"]


def test_inputs_and_outputs_of_string_models():
    text = keras.Input((), dtype="string", name="text")
    lookup = keras.layers.StringLookup(vocabulary=["a", "b", "c"])
    model = keras.Model(text, keras.layers.Dense(2)(keras.layers.Embedding(4, 3)(lookup(text))))
    with Predictor(model, max_batch_size=4) as p:
        assert p.inputs == (ArraySpec("text", (), np.dtype(object)),)
        assert [(s.shape, s.dtype) for s in p.outputs] == [((2,), np.dtype("float32"))]
        assert p.predict("b").shape == (2,)
    ids = keras.Input((3,), dtype="int64", name="ids")
    words = keras.Model(ids, keras.layers.StringLookup(vocabulary=["a", "b"], invert=True)(ids))
    with Predictor(words, max_batch_size=4) as p:
        assert [(s.shape, s.dtype) for s in p.outputs] == [((3,), np.dtype(object))]
        np.testing.assert_array_equal(p.predict(np.array([1, 2, 0])), [b"a", b"b", b"[UNK]"])
