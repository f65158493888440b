import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import config as config_lib
from bonsai_tf import engine
from bonsai_tf import genotype as G
from bonsai_tf import memory as M


def test_costs_rank_operations_and_scale_with_batch():
    sep = M.op_cost("sep_conv_5x5", 8, 8, 16, 1)
    pool = M.op_cost("max_pool_3x3", 8, 8, 16, 1)
    ident = M.op_cost("identity", 8, 8, 16, 1)
    assert sep.bytes(64) > pool.bytes(64) > ident.bytes(64) >= 0
    assert sep.bytes(128) - sep.bytes(64) == 64 * 4 * sep.activations
    assert sep.params == 2 * (25 * 16 + 16 * 16 + 2 * 16)
    strided = M.op_cost("sep_conv_3x3", 8, 8, 16, 2)
    assert strided.activations < M.op_cost("sep_conv_3x3", 8, 8, 16, 1).activations


def test_estimate_parameters_match_keras():
    from bonsai_tf import network as N
    g = G.initial("bonsai7", (12, 12, 1), 3, 4, 2, [["n"], ["r"]], 2)
    net = N.Network(g, mean=(80.0,), std=(70.0,))
    gates = len(net.gates())
    assert M.estimate(g, 1)["params"] == net.count_params() - gates


def test_estimate_agrees_with_measured_allocator_peak(tiny_splits):
    """The analytical model against TensorFlow's allocator peak for a real train step."""
    cfg = config_lib.RunConfig(scale=8, nodes=2, patterns=(("n",), ("r",)), batch_size=32,
                               epochs=1, search_epochs=1, measure_memory=False, drop_path=0.0)
    big = tiny_splits.info.__class__(**{**tiny_splits.info.__dict__, "image_shape": (24, 24, 1)})
    x = np.random.RandomState(0).randint(0, 255, (32, 24, 24, 1)).astype(np.uint8)
    y = np.arange(32) % 3
    splits = tiny_splits.__class__(train=(x, y), val=(x, y), test=(x, y), info=big)
    run = engine.Run(cfg, splits, "/nonexistent", verbose=0)
    run.state = run._initial_state()
    run._build_network()
    xb, yb = tf.constant(x, tf.float32), tf.constant(y, tf.int64)
    step = lambda: run.train_step(xb, yb, tf.constant(0.5), tf.constant(1.0))["loss"].numpy()  # noqa
    step()
    peak = M.measure_step_peak(step)
    if peak is None:
        pytest.skip("this TensorFlow build reports no CPU allocator statistics")
    est = M.estimate(run.net.genotype, 32)["bytes"]
    assert 0.6 * peak <= est <= 1.6 * peak, (est / 2**20, peak / 2**20)


def test_budget_sizing():
    g = G.initial("bonsai7", (28, 28, 1), 10, 16, 2, [["n"], ["r"]], 1, stem_stride=2)
    one = M.estimate(g, 64)["bytes"]
    two = M.estimate(G.grow(g), 64)["bytes"]
    first, ratios = M.size_budget(g, (one + two) / 2, 64, 3, 7)
    assert first == 1
    assert 1 / 7 <= ratios[1] < 1.0
    # the keep ratio is the largest that fits: a bit more does not
    first, big = M.size_budget(g, 10 * two, 64, 3, 7)
    assert first == 3 and big[1] == 1.0
    assert M.size_budget(g, one / 2, 64, 3, 7)[0] == 0
