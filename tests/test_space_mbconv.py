"""The `mbconv` space (ProxylessNAS): inverted residuals and skip, searched and deployed."""

import numpy as np
import keras
import pytest
import tensorflow as tf

from bonsai_tf import genotype as G
from bonsai_tf import layers as L
from bonsai_tf import memory as M
from bonsai_tf import network as N
from bonsai_tf import space as S

MBCONV = ("mbconv_k3_e3", "mbconv_k3_e6", "mbconv_k5_e3", "mbconv_k5_e6", "mbconv_k7_e3",
          "mbconv_k7_e6")
SHAPE = (8, 8, 1)


def _genotype(nodes=2):
    # one normal and one reduction cell at scale 4
    return G.initial("mbconv", SHAPE, 3, 4, nodes, [["n"], ["r"]], 2)


def _images(n, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n,) + SHAPE).astype(np.float32)


def test_registry_lists_the_space_and_its_seven_operations():
    assert "mbconv" in S.SPACES
    assert S.space_ops("mbconv") == ("identity",) + MBCONV
    for op in MBCONV:
        k, e = int(op[8]), int(op[11])
        assert S.recipe(op) == (("expand", e), ("bn",), ("relu6",), ("dw", k, 1), ("bn",),
                                ("relu6",), ("project", e), ("bn",))
        # the depthwise step is the first spatial one: it carries the stride
        assert [s[0] for s in S.recipe(op)].index("dw") == min(
            i for i, s in enumerate(S.recipe(op)) if s[0] in S.SPATIAL_STEPS)
        assert not S.is_identity(op)
    assert S.step_channels("mbconv_k5_e6", 4) == (
        (4, 24), (24, 24), (24, 24), (24, 24), (24, 24), (24, 24), (24, 4), (4, 4))
    # a genotype of the space validates and survives its JSON round trip
    g = _genotype()
    assert G.Genotype.from_json(g.to_json()) == g
    ops = {op for c in g.cells for e in c.edges for op in e.op_names()}
    assert ops == set(S.space_ops("mbconv"))


def test_registry_refuses_recipes_that_do_not_project_back():
    with pytest.raises(ValueError, match="projects back to 1x"):
        S.register_op("test_mb_unbalanced", (("expand", 2), ("bn",)))
    with pytest.raises(ValueError, match="expected a width divisible"):
        S.register_op("test_mb_indivisible", (("expand", 2), ("project", 3)))
    with pytest.raises(ValueError, match="positive int factor"):
        S.register_op("test_mb_zero", (("expand", 0), ("project", 0)))
    with pytest.raises(ValueError, match="takes 1 argument"):
        S.register_op("test_mb_arity", (("expand",),))
    for name in ("test_mb_unbalanced", "test_mb_indivisible", "test_mb_zero", "test_mb_arity"):
        with pytest.raises(ValueError, match="unknown operation"):
            S.recipe(name)


def test_operation_variables_of_k5_e6_at_four_channels():
    layer = L.Operation("mbconv_k5_e6", 4)
    layer.build((None, 8, 8, 4))
    shapes = {v.name: tuple(v.shape) for v in layer.weights}
    assert shapes == {
        "expand0_kernel": (1, 1, 4, 24),
        "bn1_gamma": (24,), "bn1_beta": (24,), "bn1_moving_mean": (24,),
        "bn1_moving_variance": (24,),
        "dw3_kernel": (5, 5, 24, 1),
        "bn4_gamma": (24,), "bn4_beta": (24,), "bn4_moving_mean": (24,),
        "bn4_moving_variance": (24,),
        "project6_kernel": (1, 1, 24, 4),
        "bn7_gamma": (4,), "bn7_beta": (4,), "bn7_moving_mean": (4,), "bn7_moving_variance": (4,),
    }
    assert len(layer.trainable_weights) == 3 + 2 * 3


def test_stride_two_halves_height_and_width_on_the_depthwise_step():
    layer = L.Operation("mbconv_k3_e6", 4, 2)
    x = 20.0 * tf.random.normal((2, 8, 8, 4), seed=3)   # large enough to saturate ReLU6
    y = layer(x, training=False)
    assert tuple(y.shape) == (2, 4, 4, 4)
    assert layer.strided_step == 3
    # By hand: expansion at full resolution, the depthwise step strided, ReLU6.
    k = {v.name: v.numpy() for v in layer.weights}
    bn = lambda t: t / np.sqrt(1.0 + L.BN_EPSILON)  # noqa: E731 - fresh statistics, gamma 1

    def manual(act):
        t = act(bn(tf.nn.conv2d(x, k["expand0_kernel"], 1, "VALID")))
        t = act(bn(tf.nn.depthwise_conv2d(t, k["dw3_kernel"], [1, 2, 2, 1], "SAME")))
        return bn(tf.nn.conv2d(t, k["project6_kernel"], 1, "VALID")).numpy()
    np.testing.assert_allclose(y.numpy(), manual(tf.nn.relu6), rtol=1e-4, atol=1e-4)
    assert not np.allclose(manual(tf.nn.relu6), manual(tf.nn.relu), atol=1e-3)  # it saturated
    # the stride taken up front (subsampling the input) would compute something else
    up_front = L.Operation("mbconv_k3_e6", 4, 1)
    up_front.build(x.shape)
    up_front.set_weights(layer.get_weights())
    assert not np.allclose(up_front(x[:, ::2, ::2], training=False).numpy(), y.numpy(), atol=1e-3)
    assert tuple(layer(tf.zeros((1, 7, 5, 4)), training=False).shape) == (1, 4, 3, 4)


@pytest.mark.parametrize("op", MBCONV)
@pytest.mark.parametrize("stride", [1, 2])
def test_operation_cost_counts_the_real_parameters(op, stride):
    layer = L.Operation(op, 4, stride)
    layer.build((None, 8, 8, 4))
    real = sum(int(np.prod(v.shape)) for v in layer.trainable_weights)
    assert M.op_cost(op, 8, 8, 4, stride).params == real


def test_operation_cost_counts_the_expanded_activations_and_flops():
    h = w = 8
    c, e = 4, 6
    one = M.op_cost("mbconv_k5_e6", h, w, c, 1)
    # Kept for the backward pass: the inputs of the batch norms (expand and depthwise
    # outputs) and the ReLU6 outputs at e*C (a ReLU6's gradient reads its output, so
    # the batch norm outputs before them are not kept); project output and result at C.
    assert one.activations == 4 * h * w * e * c + 2 * h * w * c
    assert one.params == c * e * c + 2 * e * c + 25 * e * c + 2 * e * c + e * c * c + 2 * c
    assert one.flops == h * w * e * c * c + h * w * e * c * 25 + h * w * c * e * c
    two = M.op_cost("mbconv_k5_e6", h, w, c, 2)
    # the expansion runs at full resolution, everything from the depthwise step at half
    assert two.activations == 2 * h * w * e * c + 2 * 4 * 4 * e * c + 2 * 4 * 4 * c
    assert two.params == one.params
    assert M.op_cost("mbconv_k3_e3", h, w, c, 1).activations < one.activations


def test_cell_parameters_match_the_built_network():
    g = _genotype()
    net = N.Network(g, mean=(80.0,), std=(70.0,))
    assert M.estimate(g, 1)["params"] == net.count_params() - len(net.gates())
    final = net.final()
    assert M.estimate(final.genotype, 1)["params"] == final.count_params()
    # one cell alone: what the estimate adds for it is what the cell's layers hold
    one = G.initial("mbconv", SHAPE, 3, 4, 2, [["n"]], 1)
    plain = N.Network(one, mean=(80.0,), std=(70.0,), with_pruners=False, aux_heads=False)
    cell = sum(int(np.prod(v.shape)) for v in plain.cells[0].trainable_weights)
    ops = sum(M.edge_op_cost(one, 0, e.src, op).params
              for e in one.cells[0].edges for op in e.op_names())
    nodes = 2 * 4 * one.cells[0].nodes   # node batch norms
    assert cell == ops + nodes


def test_search_network_trains_one_step():
    keras.utils.set_random_seed(0)
    net = N.Network(_genotype(nodes=1), mean=(80.0,), std=(70.0,))
    x, y = tf.constant(_images(8)), tf.constant(np.arange(8) % 3)
    variables = net.model.trainable_variables
    expand = next(v for v in variables if "mbconv_k7_e6" in v.path and "expand0_kernel" in v.path)
    moving = next(v for v in net.model.non_trainable_weights
                  if "mbconv_k3_e6" in v.path and v.path.endswith("bn1_moving_mean"))
    assert tuple(moving.shape) == (24,)
    before = expand.numpy().copy()
    opt = keras.optimizers.Adam(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, net.model(x, training=True)[0])
    grads = tape.gradient(loss, variables)
    assert np.isfinite(float(loss))
    missing = [v.path for v, gr in zip(variables, grads) if gr is None]
    assert not missing, missing
    opt.apply(grads, variables)
    assert not np.allclose(expand.numpy(), before)
    assert np.any(moving.numpy() != 0.0)  # the expanded batch norm updated its statistics


KEPT = ("identity", "mbconv_k3_e3", "mbconv_k7_e6")


def _deployable_network():
    keras.utils.set_random_seed(1)
    # One node per cell and three operations per edge: the TFLite conversion's time grows
    # with the number of layers (about 1 s each here).
    net = N.Network(_genotype(nodes=1), mean=(80.0,), std=(70.0,))
    for _, kind, key, p in net.gates():
        if kind == "op" and key[1] not in KEPT:
            p.w.assign(-0.1)   # closed: the final network drops them
    final = net.final()
    ops = {op for c in final.genotype.cells for e in c.edges for op in e.op_names()}
    assert ops == set(KEPT)
    rng = np.random.RandomState(2)
    for v in final.model.weights:
        n = v.path.rsplit("/", 1)[-1]
        if n.endswith("gamma") or n.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
        elif n.endswith("beta") or n.endswith("moving_mean"):
            v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
        elif n.startswith("expand"):
            v.assign(8.0 * v.numpy())   # pre-activations above 6: ReLU6 must clip
    return final


def test_deployable_matches_and_runs_as_tflite():
    from ai_edge_litert.interpreter import Interpreter

    final = _deployable_network()
    x = _images(5, seed=4)
    expected = final.model(x, training=False)[0].numpy()
    model = N.deployable(final)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU"} <= kinds
    assert not any(type(layer).__module__.startswith("bonsai_tf") for layer in model.layers)
    relu6 = [layer for layer in model.layers if "relu6" in layer.name]
    assert relu6 and all(layer.max_value == 6.0 for layer in relu6)
    expands = [layer for layer in model.layers if "_expand0" in layer.name]
    # e x C filters: C = 4 in the normal cell, 8 in the reduction cell; e = 3 and 6
    assert {layer.filters for layer in expands} == {12, 24, 48}
    assert all(layer.kernel_size == (1, 1) for layer in expands)
    dws = [layer for layer in model.layers if type(layer).__name__ == "DepthwiseConv2D"]
    assert {(layer.kernel_size, layer.strides) for layer in dws} == {
        ((3, 3), (1, 1)), ((7, 7), (1, 1)), ((3, 3), (2, 2)), ((7, 7), (2, 2))}
    got = model(x, training=False).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    blob = converter.convert()
    it = Interpreter(model_content=blob)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    it.resize_tensor_input(inp["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    lite = it.get_tensor(out["index"])
    assert lite.shape == expected.shape
    np.testing.assert_allclose(lite, expected, rtol=1e-4,
                               atol=1e-3 * max(1.0, float(np.abs(expected).max())))
