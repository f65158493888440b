"""The fused optimizers: their updates follow their formulas, and a traced update makes
its constants and learning-rate reads once, however many variables it updates."""

import keras
import numpy as np
import tensorflow as tf

from bonsai_tf import optim


def _variables(n, seed=0):
    rng = np.random.RandomState(seed)
    # Keras variables, as the engine passes: the slots are keyed by their paths.
    return [keras.Variable(rng.normal(size=(3, 2)).astype(np.float32), name=f"v{seed}_{i}")
            for i in range(n)]


def _grads(variables, seed=1):
    rng = np.random.RandomState(seed)
    return [tf.constant(rng.normal(size=v.shape).astype(np.float32)) for v in variables]


def test_momentum_sgd_follows_its_formula_per_group_over_two_steps():
    decayed, plain = _variables(2), _variables(1, seed=2)
    opt = optim.MomentumSGD(momentum=0.9, weight_decay=0.01)
    variables = opt.build([("a", decayed, True), ("b", plain, False)])
    opt.set_lr("a", 0.1)
    opt.set_lr("b", 0.5)
    grads = _grads(variables)
    step = tf.function(lambda gs: opt.apply(gs), autograph=False)
    expect = [v.numpy() for v in variables]
    slots = [np.zeros_like(e) for e in expect]
    for _ in range(2):
        step(grads)
        for i, (g, lr, decay) in enumerate(zip(grads, (0.1, 0.1, 0.5), (True, True, False))):
            slots[i] = 0.9 * slots[i] + g.numpy() + (0.01 * expect[i] if decay else 0.0)
            expect[i] = expect[i] - lr * slots[i]
    for v, e in zip(variables, expect):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6)


def test_adam_follows_its_formula():
    variables = _variables(2)
    opt = optim.Adam(lr=0.01, beta1=0.5, beta2=0.999, epsilon=1e-8, weight_decay=1e-3)
    opt.build(variables)
    grads = _grads(variables)
    start = [v.numpy() for v in variables]
    tf.function(lambda gs: opt.apply(gs), autograph=False)(grads)
    for v, x0, g in zip(variables, start, grads):
        g = g.numpy() + 1e-3 * x0
        m, s = 0.5 * g, 0.001 * g * g
        lr = 0.01 * np.sqrt(1 - 0.999) / (1 - 0.5)
        np.testing.assert_allclose(v.numpy(), x0 - lr * m / (np.sqrt(s) + 1e-8), rtol=1e-4)


def _traced_ops(opt, variables):
    grads = _grads(variables)
    graph = tf.function(lambda gs: opt.apply(gs), autograph=False) \
        .get_concrete_function(grads).graph
    ops = graph.get_operations()
    return {t: sum(op.type == t for op in ops) for t in ("Const", "ReadVariableOp")}


def test_a_traced_update_makes_its_constants_and_rate_reads_once():
    # Per variable they were two or three more ops each: a seventh of a supernet's
    # training step, traced again after every structural change.
    counts = {}
    for n in (2, 12):
        opt = optim.MomentumSGD(momentum=0.9, weight_decay=0.01)
        variables = opt.build([("a", _variables(n), True)])
        opt.set_lr("a", 0.1)
        counts[n] = _traced_ops(opt, variables)
    assert counts[12]["Const"] == counts[2]["Const"], counts
    # one read for weight decay per variable, one of the learning rate in all
    assert counts[12]["ReadVariableOp"] == 12 + 1, counts
