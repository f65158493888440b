"""Train-free metrics: linear regions and the NTK condition number (bonsai_tf.trainfree).

Each metric is checked against a count or a kernel computed independently here:
breakpoints of a 1-D ReLU layer enumerated in numpy, and per-example gradients
stacked by hand.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import genotype as G
from bonsai_tf import network as N
from bonsai_tf import trainfree as T


def _mlp(hidden=3, inputs=2, outputs=2, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(outputs)])


def test_a_linear_model_has_exactly_one_region():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    x = np.random.RandomState(0).normal(size=(64, 3)).astype(np.float32)
    assert T.linear_regions(model, x) == 1
    # ...while the same inputs through one ReLU layer fall into several regions.
    assert T.linear_regions(_mlp(8, 3), x) > 1


def _relu_line(units, way, seed=0):
    """Dense(units) + ReLU on x in R, with random weights and biases set explicitly."""
    rng = np.random.RandomState(seed)
    w, b = rng.normal(size=(1, units)), rng.normal(size=(units,))
    inp = keras.Input((1,))
    if way == "activation":
        pre = None
        out = keras.layers.Dense(units, activation="relu", name="d")(inp)
    else:
        pre = keras.layers.Dense(units, name="d")(inp)
        out = keras.layers.ReLU()(pre)
    model = keras.Model(inp, out)
    model.get_layer("d").set_weights([w.astype(np.float32), b.astype(np.float32)])
    return model, w[0], b, pre


@pytest.mark.parametrize("way", ["activation", "relu_layer", "keras_tensors", "callable"])
def test_region_count_of_a_relu_layer_on_a_line_matches_its_breakpoints(way):
    units = 8
    model, w, b, pre = _relu_line(units, way)
    grid = np.linspace(-2.0, 2.0, 8001)
    breaks = np.sort(-b / w)
    inside = breaks[(breaks > grid[0]) & (breaks < grid[-1])]
    # The enumeration holds only if every piece between breakpoints holds grid points.
    assert len(inside) >= 2 and np.min(np.diff(inside)) > 4 * (grid[1] - grid[0])
    expected = len(inside) + 1
    layer_outputs = None
    if way == "keras_tensors":
        layer_outputs = [pre]
    elif way == "callable":
        dense = model.get_layer("d")
        layer_outputs = lambda x: dense(x)  # noqa: E731
    got = T.linear_regions(model, grid[:, None].astype(np.float32), layer_outputs)
    assert got == expected


def test_relu_recording_is_undone_after_the_block_even_on_error():
    original = tf.nn.relu
    with pytest.raises(RuntimeError):
        with T.record_relu_inputs() as seen:
            tf.nn.relu(tf.constant([[-1.0, 2.0]]))
            assert len(seen) == 1 and tf.nn.relu is not original
            raise RuntimeError("boom")
    assert tf.nn.relu is original


def _explicit_ntk(model, x, outputs):
    """J stacked from one gradient per example (or per logit), each on its own forward pass."""
    variables = model.trainable_variables
    rows = []
    for i in range(len(x)):
        k_out = 1 if outputs == "sum" else int(model(x[:1]).shape[-1])
        for k in range(k_out):
            with tf.GradientTape() as tape:
                y = model(x[i:i + 1], training=False)[0]
                y = tf.reduce_sum(y) if outputs == "sum" else y[k]
            grads = tape.gradient(y, variables)
            rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    j = np.array(rows, np.float64)
    return j @ j.T


@pytest.mark.parametrize("outputs", ["sum", "logits"])
@pytest.mark.parametrize("use_pfor", [True, False])
def test_ntk_matches_an_explicit_jacobian_product(outputs, use_pfor):
    model = _mlp(3, 2, 2)
    x = np.random.RandomState(1).normal(size=(4, 2)).astype(np.float32)
    theta = _explicit_ntk(model, x, outputs)
    assert theta.shape == ((4, 4) if outputs == "sum" else (8, 8))
    np.testing.assert_allclose(T.empirical_ntk(model, x, outputs, use_pfor), theta, rtol=1e-5,
                               atol=1e-6)
    eig = np.linalg.eigvalsh(theta)
    assert eig[0] > 0
    got = T.ntk_condition_number(model, x, outputs, use_pfor)
    assert math.isfinite(got) and got >= 1
    assert got == pytest.approx(eig[-1] / eig[0], rel=1e-3)


def test_a_singular_kernel_has_an_infinite_condition_number():
    model = _mlp(3, 2, 2)
    x = np.random.RandomState(1).normal(size=(3, 2)).astype(np.float32)
    assert math.isfinite(T.ntk_condition_number(model, x))
    # a repeated example repeats a row of J
    assert T.ntk_condition_number(model, np.concatenate([x, x[:1]])) == math.inf
    assert T.condition_number(np.diag([4.0, 1.0])) == pytest.approx(4.0)
    assert T.condition_number(np.diag([4.0, 0.0])) == math.inf
    assert T.condition_number(np.diag([4.0, -1.0])) == math.inf
    assert T.condition_number(np.array([[np.nan, 0.0], [0.0, 1.0]])) == math.inf


def test_both_metrics_run_on_a_bonsai_network():
    keras.utils.set_random_seed(0)
    g = G.initial("small", (8, 8, 1), 3, 4, 1, [["n"], ["r"]], 1)
    net = N.Network(g, mean=(80.0,), std=(70.0,))
    model = net.model  # a list of outputs: [final logits, aux logits...]
    x = np.random.RandomState(0).uniform(0, 255, (4, 8, 8, 1)).astype(np.float32)
    with T.record_relu_inputs() as seen:
        model(x, training=False)
    assert len(seen) > 1  # the raw tf.nn.relu calls of layers.Operation / Edge were seen
    regions = T.linear_regions(model, x)
    assert 1 < regions <= len(x)
    j_pfor, method = T.jacobian(model, x, use_pfor=True)  # pfor converts every bonsai op
    assert method == "pfor"
    assert j_pfor.shape == (4, sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    cond = T.ntk_condition_number(model, x, use_pfor=False)
    assert math.isfinite(cond) and cond >= 1
    j = j_pfor.astype(np.float64)
    assert T.condition_number(j @ j.T) == pytest.approx(cond, rel=1e-3)


def test_bad_input_says_what_was_received_and_expected():
    model = _mlp(3, 2, 2)
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"hold 0 examples, expected at least 1"):
        T.linear_regions(model, np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match=r"hold 1 examples, expected at least 2"):
        T.ntk_condition_number(model, x[:1])
    with pytest.raises(ValueError, match=r"shape \(4, 2, 1\) \(rank 3\).*expected rank 2"):
        T.ntk_condition_number(model, x[:, :, None])
    with pytest.raises(ValueError, match=r"rank >= 2.*got shape \(4,\)"):
        T.linear_regions(model, np.zeros(4, np.float32))
    frozen = keras.Sequential([keras.Input((2,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match=r"has no trainable variables, expected at least one"):
        T.ntk_condition_number(frozen, x)
    with pytest.raises(ValueError, match=r"outputs must be one of \('sum', 'logits'\), got 'mean'"):
        T.ntk_condition_number(model, x, outputs="mean")
    with pytest.raises(ValueError, match=r"must be a Keras model.*got str"):
        T.linear_regions("model", x)
    with pytest.raises(ValueError, match=r"must be None, a callable or a list.*got int"):
        T.linear_regions(model, x, layer_outputs=3)
    with pytest.raises(ValueError, match=r"shape \(3,\), expected a leading batch axis of 4"):
        T.linear_regions(model, x, layer_outputs=lambda _: tf.zeros(3))
