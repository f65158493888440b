"""The GPU path of --mixed_precision, run on CPU: the policy is set, gates and batch norms
stay float32, the loss is computed in float32, float16 gets dynamic loss scaling that
skips an overflowed step, and the exported model computes in float32 again."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import config as config_lib
from bonsai_tf import engine
from bonsai_tf import machine
from bonsai_tf import optim

TINY = dict(space="small", scale=4, nodes=1, patterns=(("n",), ("r",)), max_patterns=1,
            batch_size=16, epochs=2, search_epochs=1, lr_max=0.05, gate_lr=0.05, drop_path=0.1,
            val_size=48, seed=1, measure_memory=False)


@pytest.fixture(autouse=True)
def float32_after():
    yield
    machine.set_precision_policy("none")   # the policy is process-wide


def make_run(splits, run_dir, **kw):
    return engine.Run(config_lib.RunConfig(**{**TINY, **kw}), splits, str(run_dir), verbose=0)


def test_loss_scale_skips_overflows_and_grows_after_good_steps():
    s = optim.DynamicLossScale(initial=8.0, growth_interval=2)
    assert float(s.scaled(tf.constant(2.0))) == 16.0
    (g,) = s.unscale([tf.constant([16.0])])
    assert g.numpy()[0] == 2.0
    assert not bool(s.all_finite([tf.constant([1.0, np.inf])]))
    assert bool(s.all_finite([None, tf.constant([1.0])]))
    s.update(tf.constant(False))
    assert float(s.scale.numpy()) == 4.0 and float(s.good_steps.numpy()) == 0
    s.update(tf.constant(True))
    assert float(s.scale.numpy()) == 4.0 and float(s.good_steps.numpy()) == 1
    s.update(tf.constant(True))
    assert float(s.scale.numpy()) == 8.0 and float(s.good_steps.numpy()) == 0
    for _ in range(10):
        s.update(tf.constant(False))
    assert float(s.scale.numpy()) == 1.0, "never below 1"
    restored = optim.DynamicLossScale()
    restored.load_state(s.state())
    assert float(restored.scale.numpy()) == 1.0


@pytest.mark.parametrize("policy, compute, scaled", [
    ("mixed_float16", "float16", True),
    ("mixed_bfloat16", "bfloat16", False),
    ("none", "float32", False),
])
def test_a_mixed_search_keeps_gates_and_statistics_in_float32(tiny_splits, tmp_path, policy,
                                                                compute, scaled):
    run = make_run(tiny_splits, tmp_path, mixed_precision=policy)
    run.prepare()
    assert keras.mixed_precision.global_policy().name == ("float32" if policy == "none"
                                                          else policy)
    assert run.net.cells[0].compute_dtype == compute
    assert all(v.dtype == "float32" for v in run.net.model.weights), "variables in float32"
    gates = [p for _, _, _, p in run.net.gates()]
    assert gates and all(not p.w._autocast for p in gates), "gates never autocast"
    assert (run.opt.loss_scale is not None) == scaled
    x = tf.constant(tiny_splits.train[0][:16], tf.float32)
    y = tf.constant(tiny_splits.train[1][:16])
    # Inside the model the activations are in the compute dtype, the logits come out so.
    logits = run.net.model(x, training=False)[0]
    assert logits.dtype == compute
    inputs = {k: tf.constant(v, tf.float32) for k, v in run.strategy.step_inputs(run.net).items()}
    out = run.train_step(x, y, inputs)
    assert out["loss"].dtype == tf.float32 and np.isfinite(float(out["loss"]))
    metrics = run.run()
    assert np.isfinite(metrics["test_loss"])
    # The exported model computes in float32 whatever the run trained under.
    model = keras.models.load_model(str(tmp_path / "model.keras"))
    assert {layer.compute_dtype for layer in model.layers if layer.weights} == {"float32"}
    assert keras.mixed_precision.global_policy().name == ("float32" if policy == "none"
                                                          else policy), "policy restored"


def test_an_overflowed_float16_step_is_skipped_and_the_scale_halves(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path, mixed_precision="mixed_float16")
    run.prepare()
    run._set_lrs(0)
    x = tf.constant(tiny_splits.train[0][:16], tf.float32)
    y = tf.constant(tiny_splits.train[1][:16])
    inputs = {k: tf.constant(v, tf.float32) for k, v in run.strategy.step_inputs(run.net).items()}
    run.opt.loss_scale.scale.assign(1e38)   # float16 gradients overflow at once
    before = [v.numpy().copy() for v in run.net.model.trainable_variables]
    run.train_step(x, y, inputs)
    after = [v.numpy() for v in run.net.model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "no weight moved"
    assert float(run.opt.loss_scale.scale.numpy()) == pytest.approx(5e37, rel=1e-3)
    run.opt.loss_scale.scale.assign(2.0 ** 10)
    run.train_step(x, y, inputs)
    after = [v.numpy() for v in run.net.model.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "a good step moves"
    assert float(run.opt.loss_scale.good_steps.numpy()) == 1.0


def test_the_loss_scale_is_checkpointed(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path, mixed_precision="mixed_float16")
    run.prepare()
    run.opt.loss_scale.scale.assign(256.0)
    arrays = run._arrays()
    assert float(arrays["opt/loss_scale/scale"]) == 256.0
    again = make_run(tiny_splits, tmp_path / "again", mixed_precision="mixed_float16")
    again.prepare()
    again.opt.load_state({k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
    assert float(again.opt.loss_scale.scale.numpy()) == 256.0
    assert json.loads(json.dumps(config_lib.RunConfig(mixed_precision="mixed_bfloat16")
                                 .to_dict()))["mixed_precision"] == "mixed_bfloat16"


@pytest.mark.parametrize("strategy", ["asap", "proxyless"])
def test_bilevel_strategies_step_their_architecture_under_float16(tiny_splits, tmp_path,
                                                                  strategy):
    run = make_run(tiny_splits, tmp_path, strategy=strategy, mixed_precision="mixed_float16",
                   memory_budget_mb=0, arch_lr=0.05, proxyless_warmup_epochs=0)
    metrics = run.run()
    assert np.isfinite(metrics["test_loss"])
    alphas = [float(p.w.numpy()) for _, _, _, p in run.net.gates()] if run.net.with_pruners \
        else []
    assert all(np.isfinite(a) for a in alphas)
