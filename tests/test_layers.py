import numpy as np
import keras
import pytest
import tensorflow as tf

from bonsai_tf import layers as L
from bonsai_tf import space as space_lib


def test_saw_gate_value_is_zero_or_one_and_gradient_is_one():
    for w0, expected in [(0.1, 1.0), (-0.2, 0.0), (3.0, 1.0), (-1e-6, 0.0)]:
        w = tf.Variable(w0)
        with tf.GradientTape() as tape:
            g = L.saw_gate_value(w)
        assert float(g) == expected
        assert float(tape.gradient(g, w)) == 1.0


def test_saw_gate_layer_multiplies_and_passes_gradient_to_weight():
    gate = L.SawGate(0.1)
    x = tf.ones((2, 3))
    with tf.GradientTape() as tape:
        y = gate(x)
        loss = tf.reduce_sum(y * 2.0)
    np.testing.assert_array_equal(y.numpy(), np.ones((2, 3)))
    # d/dw sum(2 * g(w) * x) = 2 * sum(x) with the straight-through gradient
    assert float(tape.gradient(loss, gate.w)) == pytest.approx(12.0)
    gate.w.assign(-0.1)
    np.testing.assert_array_equal(gate(x).numpy(), np.zeros((2, 3)))


def test_saw_gate_records_and_config_round_trip():
    gate = L.SawGate(0.3, name="g")
    gate(tf.ones((1, 1)))
    gate.record()
    gate.w.assign(-1.0)
    gate.record()
    assert float(gate.records) == 2 and float(gate.open_records) == 1
    clone = L.SawGate.from_config(gate.get_config())
    assert clone.init_weight == 0.3 and clone.name == "g"
    with pytest.raises(ValueError, match="init_weight"):
        L.SawGate("big")


@pytest.mark.parametrize("op", space_lib.SPACES["bonsai7"] + ("zero", "conv_3x3", "conv_1x1")
                         + space_lib.MBCONV_OPS)
@pytest.mark.parametrize("stride", [1, 2])
def test_operation_shapes_config_and_eager_vs_graph(op, stride):
    layer = L.Operation(op, 4, stride)
    x = tf.random.normal((2, 7, 7, 4), seed=1)
    y = layer(x, training=False)
    assert tuple(y.shape) == ((2, 4, 4, 4) if stride == 2 else (2, 7, 7, 4))
    graph = tf.function(lambda t: layer(t, training=False))
    np.testing.assert_allclose(graph(x).numpy(), y.numpy(), rtol=1e-5, atol=1e-5)
    clone = L.Operation.from_config(layer.get_config())
    assert clone.op == op and clone.stride == stride
    assert tuple(clone(x).shape) == tuple(y.shape) and len(clone.weights) == len(layer.weights)


def test_operation_one_training_step_changes_weights():
    layer = L.Operation("sep_conv_3x3", 4, 1)
    x = tf.random.normal((2, 6, 6, 4), seed=2)
    layer(x)
    before = [v.numpy().copy() for v in layer.trainable_weights]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(layer(x, training=True) - 1.0))
    grads = tape.gradient(loss, layer.trainable_weights)
    for g, v in zip(grads, layer.trainable_weights):
        v.assign_sub(0.1 * g)
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, layer.trainable_weights))


def test_operation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown operation 'conv_9x9'"):
        L.Operation("conv_9x9", 4)
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        L.Operation("identity", 4, 3)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        L.Operation("identity", 0)


def test_registry_refuses_duplicates_and_bad_recipes():
    with pytest.raises(ValueError, match="already registered"):
        space_lib.register_op("identity", (("identity",),))
    with pytest.raises(ValueError, match="unknown step"):
        space_lib.register_op("test_bad_op", (("warp", 3),))
    with pytest.raises(ValueError, match="unknown search space 'nope'"):
        space_lib.space_ops("nope")


def test_drop_path_drops_whole_examples_only_in_training():
    layer = L.DropPath(0.5, seed=3)
    x = tf.ones((64, 2, 2, 1))
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    y = layer(x, training=True).numpy()
    per_example = y.reshape(64, -1)
    assert set(np.unique(per_example)) <= {0.0, 2.0}
    assert (per_example.min(1) == per_example.max(1)).all()
    assert 10 < (per_example[:, 0] == 0).sum() < 54


def test_edge_sums_gated_operations():
    edge = L.Edge(["identity", "avg_pool_3x3"], 3, 1, [0.1, -0.1])
    x = tf.random.normal((2, 5, 5, 3), seed=4)
    np.testing.assert_allclose(edge(x).numpy(), x.numpy(), atol=1e-6)  # avg pool gate is closed
    cfg = edge.get_config()
    assert L.Edge.from_config(cfg).op_names == ["identity", "avg_pool_3x3"]
    with pytest.raises(ValueError, match="at least one operation"):
        L.Edge([], 3)
