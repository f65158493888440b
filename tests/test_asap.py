"""ASAP as a strategy: annealing, pruning, bi-level steps, an end-to-end search, resumption."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import config as config_lib
from bonsai_tf import engine
from bonsai_tf import genotype as G
from bonsai_tf.strategies import asap

TINY = dict(strategy="asap", scale=4, nodes=2, patterns=(("n",), ("r",)), max_patterns=2,
            batch_size=32, epochs=8, search_epochs=7, lr_max=0.05, arch_lr=0.05, drop_path=0.0,
            val_size=48, seed=5, measure_memory=False, asap_tau0=1.2, asap_beta=0.7,
            asap_threshold=0.4)


def make_run(splits, run_dir, **kw):
    return engine.Run(config_lib.RunConfig(**{**TINY, **kw}), splits, str(run_dir), verbose=0)


def test_annealing_follows_tau0_beta_to_the_epoch():
    assert [round(asap.temperature(e, 1.6, 0.95), 6) for e in range(3)] == [1.6, 1.52, 1.444]
    np.testing.assert_allclose(asap.temperature(np.arange(10), 2.0, 0.5), 2.0 * 0.5 ** np.arange(10))


def test_pruning_threshold_and_renormalisation_against_numpy():
    ops = (("identity", 0.0), ("max_pool_3x3", 1.0), ("sep_conv_3x3", 2.0), ("conv_3x3", -3.0))
    tau, threshold = 0.5, 0.4
    a = np.array([w for _, w in ops])
    w = np.exp(a / tau) / np.exp(a / tau).sum()          # the annealed weights
    keep = w >= threshold / len(ops)                     # below 0.4 / 4 = 0.1 goes
    assert list(keep) == [False, True, True, False]
    kept = asap.prune_edge(ops, tau, threshold)
    assert [o for o, _ in kept] == ["max_pool_3x3", "sep_conv_3x3"]
    # the survivors' weights renormalise over the survivors alone
    ws = asap.mixing_weights([w for _, w in kept], tau)
    np.testing.assert_allclose(ws, w[keep] / w[keep].sum())
    np.testing.assert_allclose(ws.sum(), 1.0)
    # annealed far enough, only the strongest stays; at a high temperature, all do
    assert asap.prune_edge(ops, 0.01, 0.4) == (("sep_conv_3x3", 2.0),)
    assert asap.prune_edge(ops, 1e6, 0.99) == ops
    assert asap.prune_edge(ops[:1], 1e-6, 0.99) == ops[:1]


def test_the_network_mixes_by_softmax_of_the_weights_over_tau(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    net = run.net
    net.set_temperature(0.5)
    cell = net.cells[0]
    edge = next(iter(cell.edges.values()))
    alphas = [float(p.w.numpy()) for p in edge.pruners]
    from bonsai_tf import layers as L
    gains = [float(g) for g in L.gate_values(edge.pruners, "softmax", net.temperature)]
    np.testing.assert_allclose(gains, asap.mixing_weights(alphas, 0.5), rtol=1e-5)
    assert not cell.y_gates  # no input gates with softmax mixing


def test_alphas_step_on_validation_batches_and_weights_on_training_batches(tiny_splits, tmp_path):
    # Every image is identified by its bytes: each batch shows which split it came from.
    x, _ = tiny_splits.train
    vx, _ = tiny_splits.val
    run = make_run(tiny_splits, tmp_path, epochs=3, search_epochs=2, asap_tau0=0.9)
    run.prepare()
    seen = {"weights": [], "arch": []}
    train_ids = {x[i].tobytes() for i in range(len(x))}
    val_ids = {vx[i].tobytes() for i in range(len(vx))}

    def spy(kind, step):
        def wrapped(xb, yb, inputs):
            seen[kind].append({np.asarray(img, np.uint8).tobytes() for img in xb.numpy()})
            return step(xb, yb, inputs)
        return wrapped
    run.train_step = spy("weights", run.train_step)
    run.arch_step = spy("arch", run.arch_step)
    run._train_epoch(run._dataset(0), 0)
    assert seen["weights"] and seen["arch"]
    assert all(batch <= train_ids for batch in seen["weights"])
    assert all(batch <= val_ids for batch in seen["arch"])
    assert len(seen["arch"]) == len(seen["weights"])  # one architecture step per weight step


def test_grace_period_trains_weights_only():
    cfg = config_lib.RunConfig(**TINY)
    s = asap.ASAP(cfg, None)
    assert [s.arch_trainable(e) for e in range(3)] == [False, True, True]  # 1.2, 0.84, 0.59


@pytest.mark.slow
def test_tiny_asap_search_prunes_to_one_operation_per_edge(tiny_splits, tmp_path):
    metrics = make_run(tiny_splits, tmp_path).run()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    events = " ".join(e for r in records for e in r["events"])
    assert "prune: removed" in events and "final network" in events
    taus = [r["tau"] for r in records if r["phase"] == "search" and "tau" in r]
    assert taus == sorted(taus, reverse=True) and taus[0] == pytest.approx(1.2)
    g = G.Genotype.load(str(tmp_path / "genotype.json"))
    assert all(len(e.ops) == 1 for c in g.cells for e in c.edges)
    assert g.hash() == metrics["genotype_hash"] and metrics["test_accuracy"] > 0.4
    ops_seen = [r["ops_per_edge_max"] for r in records if "ops_per_edge_max" in r]
    assert ops_seen[0] > 1 and ops_seen == sorted(ops_seen, reverse=True)
    assert os.path.exists(tmp_path / "model.keras")


def test_asap_needs_a_validation_split():
    with pytest.raises(config_lib.ConfigError, match="val_size = 0; expected > 0 with strategy=asap"):
        config_lib.RunConfig(**{**TINY, "val_size": 0})
