"""--distribute: the mirrored strategy on 2 logical CPU devices (conftest splits the CPU).
A mirrored step is one device stepping on the halves of the batch (each half batch-
normalised by itself), gradients summed; every replica keeps the same values (moving
statistics averaged every epoch); a mirrored search resumes; errors name what was
expected."""

import json

import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import config as config_lib
from bonsai_tf import distribute
from bonsai_tf import engine

# A tiny BonsaiNet search that deadheads and grows, without drop path: drop path draws
# one mask per example, and a replica draws for its half of the batch only. val_size 0:
# the validation runs on the training split.
TINY = dict(scale=4, nodes=2, patterns=(("n",), ("r",)), batch_size=32, epochs=4,
            search_epochs=3, prune_interval=1, cycle_len=1, lambda_edge=2.0, lambda_input=2.0,
            gate_lr=0.5, lr_max=0.05, drop_path=0.0, val_size=0, seed=3, measure_memory=False,
            max_patterns=2)


@pytest.fixture(scope="module")
def mirrored():
    return distribute.make("mirrored", 2)


def _run(splits, run_dir, dist=None, **kw):
    from tests.test_engine import budget_for_growth
    cfg = config_lib.RunConfig(**{**TINY, "memory_budget_mb": budget_for_growth(), **kw})
    return engine.Run(cfg, splits, str(run_dir), verbose=0, distribution=dist)


def _as_list(outs):
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def _copies(v):
    return [c.numpy() for c in distribute._tf_variable(v).values]


def test_one_mirrored_step_is_one_device_stepping_on_the_halves(tiny_splits, tmp_path, mirrored):
    # What a mirrored step computes, exactly: the mean of the two halves' losses (each
    # half batch-normalised by its own statistics), the extra loss once, one update.
    one = _run(tiny_splits, tmp_path / "one")
    two = _run(tiny_splits, tmp_path / "two", mirrored)
    for run in (one, two):
        run.prepare()
        run._set_lrs(0)
    x, y = next(iter(one._dataset(0)))
    inputs = {k: tf.constant(v, tf.float32) for k, v in one.strategy.step_inputs(one.net).items()}
    aux = one.cfg.aux_weight

    def loss_of(xs, ys):
        outs = [tf.cast(o, tf.float32) for o in _as_list(one.net.model(xs, training=True))]
        ce = [tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(ys, o)) for o in outs]
        return ce[0] + (aux * tf.add_n(ce[1:]) if len(ce) > 1 else 0.0)
    with tf.GradientTape() as tape:
        loss = 0.5 * (loss_of(x[:16], y[:16]) + loss_of(x[16:], y[16:])) + \
            one.extra_loss(inputs)
    one.opt.apply(tape.gradient(loss, one.variables))
    xb, yb = next(iter(two._dataset(0)))
    out = two.train_step(xb, yb, inputs)
    assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(out["n"]) == 32
    for a, b in zip(one.net.model.trainable_weights, two.net.model.trainable_weights):
        assert a.path == b.path
        copies = _copies(b)
        np.testing.assert_array_equal(copies[0], copies[1])
        np.testing.assert_allclose(copies[0], a.numpy(), atol=2e-6, err_msg=a.path)


def test_moving_statistics_are_averaged_over_the_replicas(tiny_splits, tmp_path, mirrored):
    run = _run(tiny_splits, tmp_path, mirrored)
    run.prepare()
    run._set_lrs(0)
    xb, yb = next(iter(run._dataset(0)))
    inputs = {k: tf.constant(v, tf.float32) for k, v in run.strategy.step_inputs(run.net).items()}
    run.train_step(xb, yb, inputs)
    stats = [v for v in run.net.model.non_trainable_weights if "moving_mean" in v.path]
    assert stats and distribute.replica_spread(stats) > 0   # each replica its own half
    before = [np.mean(_copies(v), 0) for v in stats]
    moved = distribute.average_replicas(mirrored, run.net.model.non_trainable_weights)
    # weights, gates, statistics and momentum: one value on every replica
    assert moved > 0 and distribute.replica_spread(run._all_variables()) == 0.0
    assert all(len(_copies(v)) == 2 for v in run._all_variables())
    for v, want in zip(stats, before):
        np.testing.assert_allclose(_copies(v)[0], want, rtol=1e-6, atol=1e-7)
    # nothing to average on one device
    assert distribute.average_replicas(tf.distribute.get_strategy(), stats) == 0.0


def test_bad_distribution_settings_say_what_was_expected(mirrored):
    with pytest.raises(distribute.DistributeError,
                       match="already split into 2 logical device.*3 were asked for"):
        distribute.make("mirrored", 3)
    with pytest.raises(distribute.DistributeError, match="distribute = 'ring'; expected one of"):
        distribute.make("ring")
    with pytest.raises(distribute.DistributeError, match="devices = 0; expected an integer >= 1"):
        distribute.split_cpu(0)
    with pytest.raises(config_lib.ConfigError, match="distribute = 'ring'; expected one of"):
        config_lib.RunConfig(distribute="ring")
    with pytest.raises(config_lib.ConfigError, match="jit_compile = True; expected False with"):
        config_lib.RunConfig(distribute="mirrored", jit_compile=True)
    assert distribute.is_distributed(mirrored)
    assert not distribute.is_distributed(tf.distribute.get_strategy())
    assert distribute.is_chief(mirrored) and distribute.num_workers(mirrored) == 1


@pytest.mark.parametrize("environ,fragment", [
    ({}, "needs TF_CONFIG"),
    ({"TF_CONFIG": "{not json"}, "is not JSON"),
    ({"TF_CONFIG": json.dumps({"cluster": {}, "task": {}})}, "cluster is {}"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]},
                               "task": {"type": "worker", "index": 1}})}, "a position in"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]},
                               "task": {"type": "ps", "index": 0}})}, "one of ['worker']"),
])
def test_a_bad_tf_config_is_named(environ, fragment):
    with pytest.raises(distribute.DistributeError, match=fragment.replace("[", "\\[")
                       .replace("]", "\\]").replace("{", "\\{").replace("}", "\\}")):
        distribute.worker_config(environ)
    ok = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                   "task": {"type": "worker", "index": 1}})}
    assert distribute.worker_config(ok)[1] == {"type": "worker", "index": 1}
