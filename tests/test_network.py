import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import genotype as G
from bonsai_tf import network as N


def net_for(n=2, nodes=2, **kw):
    g = G.initial("bonsai7", (12, 12, 1), 3, 4, nodes, [["n"], ["r"]], n)
    return N.Network(g, mean=(80.0,), std=(70.0,), **kw)


def _op_paths(model):
    return {v.path for v in model.weights}


def test_cells_have_the_right_shapes():
    net = net_for(2)
    x = keras.Input((12, 12, 1))
    outs = [net.stem(net.normalize(x))]
    for cell in net.cells:
        outs.append(cell(outs))
    assert tuple(outs[1].shape) == (None, 12, 12, 4)   # normal: same size and channels
    assert tuple(outs[2].shape) == (None, 6, 6, 8)     # reduction: half size, twice the channels
    logits = net.model(np.zeros((2, 12, 12, 1), np.float32))
    assert [tuple(t.shape) for t in logits] == [(2, 3)]  # always a list, final head first


def test_pruning_removes_variables_and_parameters():
    net = net_for(1)
    before_params, before_paths = net.count_params(), _op_paths(net.model)
    g = net.current_genotype()
    cell = g.cells[0]
    pruned = dataclasses.replace(cell, edges=tuple(
        dataclasses.replace(e, ops=tuple(o for o in e.ops if o[0] != "sep_conv_5x5"))
        for e in cell.edges))
    kept_var = next(v for v in net.model.weights if "sep_conv_3x3" in v.path and "kernel" in v.path)
    kept_var.assign(tf.fill(kept_var.shape, 0.123))
    net.rebuild(dataclasses.replace(g, cells=(pruned,)))
    paths = _op_paths(net.model)
    assert not any("sep_conv_5x5" in p for p in paths)
    assert any("sep_conv_5x5" in p for p in before_paths)
    assert net.count_params() < before_params
    # surviving layers keep their trained weights
    same = next(v for v in net.model.weights if v.path == kept_var.path)
    np.testing.assert_allclose(same.numpy(), 0.123)
    assert tuple(net.model(np.zeros((1, 12, 12, 1), np.float32))[0].shape) == (1, 3)


def test_growth_appends_cells_and_keeps_old_weights():
    net = net_for(1)
    stem_kernel = net.stem.weights[0]
    stem_kernel.assign(tf.fill(stem_kernel.shape, 0.5))
    n_vars = len(net.model.weights)
    net.rebuild(G.grow(net.current_genotype()))
    assert len(net.cells) == 2 and net.cells[1].cell.kind == "reduction"
    assert len(net.model.weights) > n_vars
    np.testing.assert_allclose(net.stem.weights[0].numpy(), 0.5)
    assert any(p.path.startswith("cell1/") for p in net.model.weights)


def test_final_network_folds_gates_and_drops_aux_heads():
    g = G.initial("bonsai7", (12, 12, 1), 3, 4, 2, [["n", "na"], ["r"]], 2)
    net = N.Network(g, mean=(80.0,), std=(70.0,))
    assert len(net.model(np.zeros((1, 12, 12, 1)))) == 2  # final head and the preserved aux head
    # close every gate of one operation kind
    for _, kind, key, p in net.gates():
        if kind == "op" and key[1] == "max_pool_3x3":
            p.w.assign(-0.1)
    x = np.random.RandomState(0).uniform(0, 255, (3, 12, 12, 1)).astype(np.float32)
    expected = net.model(x, training=False)[0].numpy()
    final = net.final()
    assert len(final.model(np.zeros((1, 12, 12, 1)))) == 1
    assert not any("max_pool" in l for c in final.cells for e in c.cell.edges for l in e.op_names())
    assert not any("/g_" in v.path or "in_g" in v.path for v in final.model.weights)
    np.testing.assert_allclose(final.model(x, training=False)[0].numpy(), expected, rtol=1e-4,
                               atol=1e-4)
    # the genotype alone rebuilds a network with the same parameter count
    rebuilt = N.Network(final.genotype, mean=(80.0,), std=(70.0,), with_pruners=False, aux_heads=False)
    assert rebuilt.count_params() == final.count_params()


def test_network_rejects_mismatched_normalisation():
    g = G.initial("bonsai7", (12, 12, 1), 3, 4, 2, [["n"]], 1)
    with pytest.raises(ValueError, match="mean has 3 channels, expected 1"):
        N.Network(g, mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0))
