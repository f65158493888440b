"""ProxylessNAS as a strategy: two-path binary gates, the BinaryConnect gradient, the alpha
rescale, only sampled paths run, warm-up, the final argmax and a tiny search; the
REINFORCE variant's estimator, baseline, checkpointed state and a tiny search."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import config as config_lib
from bonsai_tf import engine
from bonsai_tf import genotype as G
from bonsai_tf import layers as L
from bonsai_tf.strategies import proxyless

TINY = dict(strategy="proxyless", space="small", scale=4, nodes=1, patterns=(("n",),),
            max_patterns=1, batch_size=32, epochs=4, search_epochs=3, lr_max=0.05,
            arch_lr=0.1, drop_path=0.0, val_size=48, seed=5, measure_memory=False,
            proxyless_warmup_epochs=1)
PARAMETER_FREE = ["identity", "max_pool_3x3", "avg_pool_3x3"]


def make_run(splits, run_dir, **kw):
    return engine.Run(config_lib.RunConfig(**{**TINY, **kw}), splits, str(run_dir), verbose=0)


def _edge(alphas, ops=PARAMETER_FREE, seed=0):
    edge = L.Edge(ops, 2, init_weights=alphas, mixing="binary", seed=seed)
    edge.build((None, 4, 4, 2))
    return edge


def test_binaryconnect_is_the_gradient_of_the_expected_loss_of_a_linear_mix():
    # With L linear in the gates, L(g) = sum_j g_j c_j, the expected loss over one path
    # drawn from p = softmax(alpha) is sum_j p_j c_j; BinaryConnect's estimator from
    # dL/dg_j = c_j is its exact gradient.
    rng = np.random.RandomState(0)
    for _ in range(10):
        a, c = rng.normal(size=5), rng.normal(size=5)

        def expected(a):
            p = np.exp(a - a.max())
            return float(np.dot(p / p.sum(), c))
        eps = 1e-6
        numeric = np.array([(expected(a + eps * np.eye(5)[i]) - expected(a - eps * np.eye(5)[i]))
                            / (2 * eps) for i in range(5)])
        np.testing.assert_allclose(proxyless.binaryconnect_gradient(a, c), numeric, atol=1e-8)


def test_the_two_path_gates_give_binaryconnect_over_the_pair():
    alphas = [0.3, -0.5, 1.1]
    edge = _edge(alphas)
    x = tf.constant(np.random.RandomState(1).normal(size=(2, 4, 4, 2)), tf.float32)
    w = tf.constant(np.random.RandomState(2).normal(size=(2, 4, 4, 2)), tf.float32)
    outputs = [float(tf.reduce_sum(w * op.run(x)[0])) for op in edge.operations]  # c_j
    seen = set()
    for _ in range(12):
        with tf.GradientTape() as tape:
            terms = edge.terms(x, training=True)
            loss = tf.reduce_sum(w * tf.add_n(terms))
        grads = np.array([float(g) for g in tape.gradient(loss, [p.w for p in edge.pruners])])
        pair = list(edge.last_pair.numpy())
        seen.add(tuple(sorted(pair)))
        want = np.zeros(3)
        want[pair] = proxyless.binaryconnect_gradient(np.array(alphas)[pair],
                                                      np.array(outputs)[pair])
        np.testing.assert_allclose(grads, want, rtol=1e-4, atol=1e-6)
        # forward: exactly one of the pair reaches the output
        value = float(loss)
        assert min(abs(value - outputs[pair[0]]), abs(value - outputs[pair[1]])) < 1e-4
    assert len(seen) > 1   # the pair is drawn, not fixed


def test_only_the_sampled_paths_run():
    edge = _edge([0.0] * 6, ops=["identity", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3",
                                 "dil_conv_3x3", "conv_3x3"])
    calls = []
    for op in edge.operations:
        run = op.run
        op.run = (lambda run, name: lambda *a, **k: calls.append(name) or run(*a, **k))(run, op.op)
    x = tf.zeros((1, 4, 4, 2))
    edge.terms(x, training=True)      # eager: tf.switch_case runs the chosen branch only
    assert len(calls) == 2 and len(set(calls)) == 2
    calls.clear()
    edge.terms(x, training=False)     # inference: the most probable operation alone
    assert len(calls) == 1


def test_rescale_leaves_the_other_probabilities_unchanged():
    old = np.array([0.5, -1.0, 2.0, 0.1])
    new = np.array([0.9, -1.0, 1.2, 0.4])    # a step that moved the pair (0, 2), and 3
    pair = [0, 2]
    out = proxyless.rescale_pair(old, new, pair)

    def probs(a):
        e = np.exp(a - a.max())
        return e / e.sum()
    p_old, p_out = probs(old), probs(out)
    np.testing.assert_allclose(p_out[[1, 3]], p_old[[1, 3]], rtol=1e-12)
    np.testing.assert_allclose(p_out[pair].sum(), p_old[pair].sum(), rtol=1e-12)
    # the pair's ratio is the step's
    np.testing.assert_allclose(p_out[0] / p_out[2], np.exp(new[0] - new[2]), rtol=1e-12)
    got = proxyless._rescale_pair_tf(tf.constant(old), tf.constant(new), tf.constant(pair))
    np.testing.assert_allclose(got.numpy(), out, rtol=1e-12)


def test_architecture_step_rescales_the_pair(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    edge = next(e for c in run.net.cells for e in c.edges.values() if e.binary)
    for k, p in enumerate(edge.pruners):
        p.w.assign(0.1 * k)
    before = np.array([float(p.w.numpy()) for p in edge.pruners])
    x, y = next(run._val_batches(1))
    run.arch_step(x, y, {})
    after = np.array([float(p.w.numpy()) for p in edge.pruners])
    pair = list(edge.last_pair.numpy())
    others = [k for k in range(len(before)) if k not in pair]
    np.testing.assert_allclose(after[others], before[others])      # untouched
    assert not np.allclose(after[pair], before[pair])              # the pair stepped
    np.testing.assert_allclose(np.logaddexp.reduce(after[pair]),
                               np.logaddexp.reduce(before[pair]), rtol=1e-5)


def test_warm_up_and_final_argmax(tiny_splits, tmp_path):
    cfg = config_lib.RunConfig(**{**TINY, "proxyless_warmup_epochs": 2})
    s = proxyless.ProxylessNAS(cfg, None)
    assert [s.arch_trainable(e) for e in range(4)] == [False, False, True, True]
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    edge = next(e for c in run.net.cells for e in c.edges.values() if e.binary)
    edge.pruners[2].w.assign(3.0)
    final = s.final_genotype(run.net)
    spec = next(e for e in final.cells[0].edges if L.edge_name(e.src, e.dst) == edge.name)
    assert spec.op_names() == (edge.op_names[2],)
    assert all(len(e.ops) == 1 for c in final.cells for e in c.edges)


@pytest.mark.slow
def test_tiny_proxyless_search(tiny_splits, tmp_path):
    metrics = make_run(tiny_splits, tmp_path).run()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    search = [r for r in records if "strongest_mean" in r]
    # warm-up: uniform paths; then the alphas move away from uniform
    assert search[0]["strongest_mean"] == pytest.approx(1 / 6)
    assert search[-1]["strongest_mean"] > 1 / 6 + 0.01
    g = G.Genotype.load(str(tmp_path / "genotype.json"))
    assert all(len(e.ops) == 1 for c in g.cells for e in c.edges)
    assert g.hash() == metrics["genotype_hash"] and metrics["test_accuracy"] > 0.4
    assert os.path.exists(tmp_path / "model.keras")


# ---- REINFORCE ----------------------------------------------------------------------
def _softmax(a):
    e = np.exp(a - a.max())
    return e / e.sum()


def _toy(seed=0, k=5):
    """alphas and a fixed reward per choice, and d E[R] / d alpha for E[R] = sum_i p_i R_i."""
    rng = np.random.RandomState(seed)
    alphas, rewards = rng.normal(size=k), 1.0 + 2.0 * rng.normal(size=k)
    p = _softmax(alphas)
    return alphas, rewards, p, p * rewards - p * np.dot(p, rewards)


def _reinforce_mean(alphas, rewards, baseline, n, seed):
    """The mean over n draws of the REINFORCE estimate of d E[R] / d alpha, drawn and
    computed by the functions the edges and the strategy use."""
    a = tf.Variable(alphas, dtype=tf.float64)
    u = tf.random.stateless_uniform((n, len(alphas)), seed=(seed, 7), minval=1e-6,
                                    maxval=1.0 - 1e-6, dtype=tf.float64)
    index = L.gumbel_max(tf.constant(alphas, tf.float64), u)
    advantage = tf.gather(tf.constant(rewards, tf.float64), index) - baseline
    with tf.GradientTape() as tape:
        surrogate = proxyless.reinforce_surrogate(a, index, advantage)
    # The surrogate is a loss (the arch step descends it): minus its gradient ascends E[R].
    return -tape.gradient(surrogate, a).numpy() / n, index.numpy()


def _standard_error(rewards, p, baseline, n):
    """Per coordinate, the standard error of a mean of n single-draw estimates, from the
    estimator's exact variance: the draw a has probability p_a and gives
    (R_a - b) (onehot(a) - p)."""
    per_draw = (rewards - baseline)[:, None] * (np.eye(len(p)) - p)
    mean = p @ per_draw
    return np.sqrt((p @ per_draw ** 2 - mean ** 2) / n), mean


# N = 40000 draws; by the central limit theorem each coordinate of the mean estimate is
# off the expectation by ~N(0, SE^2), so 4 SE holds for all 5 coordinates with
# probability > 0.9997 (and the seed is fixed: the test is deterministic). SE is at most
# ~0.003 against gradients up to ~0.4, and a biased estimator fails by many SE (measured:
# one without the -p term by 11-150 SE, a baseline that does not cancel by up to 17 SE).
N_DRAWS = 40000


def test_gumbel_max_draws_from_the_softmax():
    alphas, _, p, _ = _toy()
    _, index = _reinforce_mean(alphas, np.zeros(5), 0.0, N_DRAWS, seed=1)
    freq = np.bincount(index, minlength=5) / N_DRAWS
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / N_DRAWS)), (freq, p)


def test_reinforce_gives_an_unbiased_mean_on_a_toy_problem():
    alphas, rewards, p, exact = _toy()
    got, _ = _reinforce_mean(alphas, rewards, 0.0, N_DRAWS, seed=2)
    se, mean = _standard_error(rewards, p, 0.0, N_DRAWS)
    np.testing.assert_allclose(mean, exact, atol=1e-12)     # the estimator's expectation
    assert np.all(np.abs(got - exact) < 4 * se), (got, exact, se)


@pytest.mark.parametrize("baseline", ["expected", 5.0, -3.0])
def test_a_baseline_does_not_change_the_expectation(baseline):
    alphas, rewards, p, exact = _toy(seed=3)
    b = float(np.dot(p, rewards)) if baseline == "expected" else baseline
    se, mean = _standard_error(rewards, p, b, N_DRAWS)
    np.testing.assert_allclose(mean, exact, atol=1e-12)     # exactly, for any constant b
    got, _ = _reinforce_mean(alphas, rewards, b, N_DRAWS, seed=4)
    assert np.all(np.abs(got - exact) < 4 * se), (got, exact, se)
    # On the same draws the baseline only adds -b * mean(onehot(a) - p), of expectation 0.
    without, _ = _reinforce_mean(alphas, rewards, 0.0, N_DRAWS, seed=4)
    se_shift = abs(b) * np.sqrt(p * (1 - p) / N_DRAWS)
    assert np.all(np.abs(got - without) < 4 * se_shift + 1e-12)


def _reinforce_run(splits, run_dir, **kw):
    run = make_run(splits, run_dir, proxyless_grad="reinforce", **kw)
    run.prepare()
    return run


def test_reinforce_edges_draw_one_path_from_the_full_softmax(tiny_splits, tmp_path):
    run = _reinforce_run(tiny_splits, tmp_path)
    edges = [e for c in run.net.cells for e in c.edges.values() if e.binary]
    assert edges and all(e.reinforce and e.last_pair is None for e in edges)
    edge = L.Edge(PARAMETER_FREE, 2, init_weights=[0.0, 0.0, 0.0], mixing="reinforce", seed=1)
    edge.build((None, 4, 4, 2))
    x = tf.constant(np.random.RandomState(1).normal(size=(2, 4, 4, 2)), tf.float32)
    outputs = [op.run(x)[0].numpy() for op in edge.operations]
    seen = set()
    for _ in range(12):
        with tf.GradientTape() as tape:
            terms = edge.terms(x, training=True)
            loss = tf.reduce_sum(terms[0])
        assert len(terms) == 1
        a = int(edge.last_path.numpy())
        seen.add(a)
        np.testing.assert_allclose(terms[0].numpy(), outputs[a], atol=1e-6)   # ungated
        # the output carries no gradient to the alphas: REINFORCE's comes from the reward
        assert all(g is None for g in tape.gradient(loss, [p.w for p in edge.pruners]))
    assert len(seen) > 1


def test_the_reinforce_term_is_the_score_times_the_advantage(tiny_splits, tmp_path):
    run = _reinforce_run(tiny_splits, tmp_path)
    s, net = run.strategy, run.net
    assert s.after_arch_step(net, s.arch_variables(net)) is None   # no pair to rescale
    term = s.arch_loss(net)
    edges = [e for c in net.cells for e in c.edges.values() if e.reinforce]
    rng = np.random.RandomState(0)
    for e in edges:
        for p in e.pruners:
            p.w.assign(rng.normal())
    x, y = next(run._val_batches(1))
    alphas = [p.w for e in edges for p in e.pruners]
    baselines = []
    for step in range(3):
        b_before = float(s.baseline.numpy())
        with tf.GradientTape() as tape:
            logits = run.net.model(x, training=True)
            logits = logits[0] if isinstance(logits, (list, tuple)) else logits
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))
            value = term(loss, {})
        grads = tape.gradient(value, alphas)
        reward = -float(loss)
        b = reward if step == 0 else b_before   # the first reward is its own baseline
        want = []
        for e in edges:
            p = _softmax(np.array([float(w.numpy()) for w in (q.w for q in e.pruners)]))
            want += list(-(reward - b) * (np.eye(len(p))[int(e.last_path.numpy())] - p))
        np.testing.assert_allclose([float(g) for g in grads], want, rtol=1e-4, atol=1e-7)
        # then b moves on by this reward
        np.testing.assert_allclose(float(s.baseline.numpy()),
                                   proxyless.REINFORCE_BASELINE_DECAY * b +
                                   (1 - proxyless.REINFORCE_BASELINE_DECAY) * reward, rtol=1e-5)
        assert float(s.rewards_seen.numpy()) == step + 1
        baselines.append(float(s.baseline.numpy()))
    # the baseline and its count are the strategy's checkpointed state, exactly
    state = json.loads(json.dumps(s.state()))
    other = proxyless.ProxylessNAS(run.cfg, None)
    other.load_state(state)
    assert float(other.baseline.numpy()) == baselines[-1]
    assert float(other.rewards_seen.numpy()) == 3.0
    with pytest.raises(ValueError, match="expected \\['reinforce_baseline', 'reinforce_rewards'\\]"):
        other.load_state({"baseline": 1.0})
    # BinaryConnect keeps no state (its checkpoints are as before)
    assert proxyless.ProxylessNAS(config_lib.RunConfig(**TINY), None).state() == {}


def test_proxyless_grad_is_one_of_the_two():
    assert config_lib.RunConfig().proxyless_grad == "binaryconnect"
    with pytest.raises(config_lib.ConfigError, match="proxyless_grad = 'darts'; expected one "
                                                     "of \\('binaryconnect', 'reinforce'\\)"):
        config_lib.RunConfig(**{**TINY, "proxyless_grad": "darts"})


@pytest.mark.slow
def test_tiny_reinforce_search(tiny_splits, tmp_path):
    metrics = make_run(tiny_splits, tmp_path, proxyless_grad="reinforce").run()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    search = [r for r in records if "strongest_mean" in r]
    assert search[0]["strongest_mean"] == pytest.approx(1 / 6)   # warm-up: uniform paths
    assert search[-1]["strongest_mean"] > 1 / 6 + 0.01           # then the alphas move
    # the baseline follows the reward, -(validation loss) of the drawn networks
    assert search[0]["reward_baseline"] == 0.0 and search[-1]["reward_baseline"] < 0
    g = G.Genotype.load(str(tmp_path / "genotype.json"))
    assert all(len(e.ops) == 1 for c in g.cells for e in c.edges)
    assert g.hash() == metrics["genotype_hash"]


# ---- the hardware term ------------------------------------------------------------
def _with_latencies(run, fast_op="identity", fast=0.1, slow=1.0, fixed=2.0):
    s, net = run.strategy, run.net
    s.op_ms = {(c, e.src, e.dst, op): fast if op == fast_op else slow
               for c, cell in enumerate(net.cells) for e in cell.cell.edges for op, _ in e.ops}
    s.fixed_ms = fixed
    return s


def test_expected_latency_against_numpy(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    s = _with_latencies(run)
    rng = np.random.RandomState(3)
    want = 2.0
    for a, ms in s.latency_edges(run.net):
        values = rng.normal(size=len(a))
        for v, x in zip(a, values):
            v.assign(float(x))
        p = np.exp(values - values.max())
        want += float(np.dot(p / p.sum(), ms))
    got = float(proxyless.expected_latency(s.latency_edges(run.net), s.fixed_ms))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert s.record(run.net)["expected_latency_ms"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("target,faster", [(2.5, True), (50.0, False)])
def test_the_latency_term_pulls_the_alphas_towards_the_target(tiny_splits, tmp_path, target,
                                                              faster):
    run = make_run(tiny_splits, tmp_path, latency_target_ms=target, latency_weight=1.0)
    run.prepare()
    s = _with_latencies(run)
    term = s.loss(run.net)
    alphas = [a for a, _ in s.latency_edges(run.net)]
    with tf.GradientTape() as tape:
        value = term({})
    grads = tape.gradient(value, [v for a in alphas for v in a])
    e = float(proxyless.expected_latency(s.latency_edges(run.net), s.fixed_ms))
    assert float(value) == pytest.approx(np.log(e / target) ** 2, rel=1e-5)
    # Gradient descent raises the fast operation's alpha when the network is too slow
    # (target below E), and lowers it when there is latency to spare.
    fast = [g for g, (c, src, dst, op) in zip(grads, s.op_ms) if op == "identity"]
    assert fast and all((float(g) < 0) == faster for g in fast)


def test_no_latency_term_without_a_target(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    assert run.strategy.loss(run.net) is None and run.strategy.op_ms is None


@pytest.mark.slow
def test_the_latency_table_covers_every_operation_of_the_supernet(tiny_splits, tmp_path,
                                                                  monkeypatch):
    import functools
    from bonsai_tf import latency
    monkeypatch.setattr(latency, "load_or_build", functools.partial(
        latency.load_or_build, repeats=3, rounds=1, warmup=1, directory=str(tmp_path / "lat")))
    run = make_run(tiny_splits, tmp_path / "run", latency_target_ms=1.0)
    run.prepare()
    s = run.strategy
    edges = s.latency_edges(run.net)
    assert sum(len(ms) for _, ms in edges) == run.net.genotype.num_ops()
    # An operation's latency is its median minus its baseline's, clamped at 0: one
    # cheaper than the timing noise (an identity, a pool on a tiny map) can read 0.
    assert all(m >= 0 for _, ms in edges for m in ms) and s.fixed_ms > 0
    assert sum(m for _, ms in edges for m in ms) > 0
    assert "expected_latency_ms" in s.record(run.net)


# ---- the final network under the target -------------------------------------------
# Made-up per-operation latencies: the selection only sees predict() and measure().
OP_MS = {"identity": 0.0, "max_pool_3x3": 0.1, "avg_pool_3x3": 0.1, "sep_conv_3x3": 0.5,
         "dil_conv_3x3": 0.6, "conv_3x3": 1.0}


def _supernet(alphas_per_edge):
    """A one-cell genotype of the small space (two nodes, five edges) whose edge k
    carries alphas_per_edge[k]; the edges after those sure of the (0 ms) identity."""
    g = G.initial("small", (8, 8, 1), 10, 4, 2, (("n",),), 1, 0.0)
    cell = g.cells[0]
    alphas_per_edge = list(alphas_per_edge) + [_alphas(identity=9.0)] * (
        len(cell.edges) - len(alphas_per_edge))
    edges = tuple(G.Edge(e.src, e.dst, tuple((op, float(alphas[op])) for op, _ in e.ops))
                  for e, alphas in zip(cell.edges, alphas_per_edge))
    import dataclasses
    return dataclasses.replace(g, cells=(dataclasses.replace(cell, edges=edges),))


def _predict(fixed=0.2):
    return lambda g: fixed + sum(OP_MS[op] for c in g.cells for e in c.edges for op in e.op_names())


def _alphas(**strong):
    base = {op: 0.0 for op in OP_MS}
    return {**base, **strong}


def test_an_argmax_under_the_target_is_kept_when_no_dearer_step_fits():
    g = _supernet([_alphas(sep_conv_3x3=2.0)] * 3)
    # argmax 0.2 + 3 * 0.5 = 1.7 ms; the first step up (to dil_conv, +0.1 ms) is 1.8 ms
    final, record = proxyless.select_under_target(g, 1.75, _predict())
    assert final.hash() == G.strongest_ops(g).hash()
    assert record["switches"] == [] and record["met"] and record["measured_ms"] is None
    assert record["direction"] == "argmax" and record["predicted_ms"] == pytest.approx(1.7)


def test_an_argmax_well_under_the_target_spends_the_rest():
    # A target is a budget: the most probable way up, while it fits
    g = _supernet([_alphas(sep_conv_3x3=2.0, dil_conv_3x3=1.9)] * 3)
    final, record = proxyless.select_under_target(g, 2.05, _predict())
    ops = [e.op_names()[0] for e in final.cells[0].edges]
    assert ops[:3].count("dil_conv_3x3") == 3 and record["direction"] == "up"
    assert record["predicted_ms"] == pytest.approx(2.0) and record["met"]
    assert [s["to"] for s in record["switches"]] == ["dil_conv_3x3"] * 3
    assert all(s["saved_ms"] == pytest.approx(-0.1) for s in record["switches"])


def test_the_cheapest_switch_per_ms_goes_first():
    # Edge 0 is sure of conv_3x3 (it would lose a lot of log-probability), edge 1 is torn
    # between conv_3x3 and max_pool_3x3 (it loses little), edge 2 holds a pool already.
    g = _supernet([_alphas(conv_3x3=6.0), _alphas(conv_3x3=1.0, max_pool_3x3=0.9),
                   _alphas(avg_pool_3x3=3.0)])
    # argmax: 0.2 + 1.0 + 1.0 + 0.1 = 2.3 ms; one switch of edge 1 to its pool: 1.4 ms
    # (and no step up fits under 1.45 ms again)
    final, record = proxyless.select_under_target(g, 1.45, _predict())
    assert [(s["to"]) for s in record["switches"]] == ["max_pool_3x3"]
    ops = [e.op_names()[0] for e in final.cells[0].edges]
    assert ops[:3] == ["conv_3x3", "max_pool_3x3", "avg_pool_3x3"]
    assert record["predicted_ms"] == pytest.approx(1.4) and record["met"]


@pytest.mark.parametrize("measure", [lambda p: 1.3 * p, lambda p: p + 0.45,
                                     lambda p: p * p + 0.3])
def test_measurements_keep_the_network_under_the_target_and_spend_it(measure):
    # The whole network runs slower than its table predicts (as one that misses the
    # table's fusion would), by a factor, an offset or more on larger networks: the
    # table alone picks a network over the target; measuring finds one under it, on
    # the most probable way down, then steps up while they fit.
    g = _supernet([_alphas(conv_3x3=2.0, sep_conv_3x3=1.5, max_pool_3x3=1.0)] * 3)
    predict = _predict()
    table_only, rec_table = proxyless.select_under_target(g, 2.0, predict)
    assert rec_table["met"] and measure(predict(table_only)) > 2.0
    calls = []

    def timed(c):
        calls.append(c.hash())
        return measure(predict(c))
    final, record = proxyless.select_under_target(g, 2.0, predict, timed)
    assert record["met"] and measure(predict(final)) <= 2.0
    assert record["measured_ms"] == pytest.approx(measure(predict(final)))
    assert len(record["measurements"]) == len(calls) <= proxyless.SELECT_MEASURES
    # the way down is the most probable one: sep_conv before max_pool on every edge
    down = proxyless.greedy_path(g, predict)
    first = next(k for k, (_, p, _) in enumerate(down) if measure(p) <= 2.0)
    assert first > 1 and record["switches"][:first] == [sw for _, _, sw in down[1:first + 1]]
    assert all(sw["to"] == "sep_conv_3x3" for sw in record["switches"][:3])
    # spent: no single step up from the final network fits under the target
    choice = {(c, k): [o for o, _ in e.ops].index(final.cells[c].edges[k].op_names()[0])
              for c, cell in enumerate(g.cells) for k, e in enumerate(cell.edges)}
    ups = proxyless.greedy_path(g, predict, down=False, start=choice,
                                limit=2.0 / (record["measured_ms"] / record["predicted_ms"]))
    assert len(ups) == 1 or measure(ups[1][1]) > 2.0


def test_a_target_below_the_cheapest_network_is_reported_not_met():
    g = _supernet([_alphas(conv_3x3=2.0)] * 3)
    final, record = proxyless.select_under_target(g, 0.1, _predict(),
                                                  lambda c: _predict()(c), max_measures=3)
    assert [e.op_names()[0] for e in final.cells[0].edges] == ["identity"] * 5
    # the cheapest network is measured over: nothing further to try
    assert not record["met"] and len(record["measurements"]) == 1
    with pytest.raises(ValueError, match="target_ms = 0.0; expected a latency target > 0"):
        proxyless.select_under_target(g, 0.0, _predict())


def test_the_path_goes_down_to_the_cheapest_network():
    g = _supernet([_alphas(conv_3x3=2.0, sep_conv_3x3=1.5)] * 3)
    path = proxyless.greedy_path(g, _predict())
    preds = [p for _, p, _ in path]
    assert preds == sorted(preds, reverse=True) and len(set(preds)) == len(preds)
    assert preds[-1] == pytest.approx(0.2)   # every edge on the 0 ms identity
    assert path[0][2] is None and all(sw["saved_ms"] > 0 for _, _, sw in path[1:])


@pytest.mark.parametrize("select", ["measured", "table", "argmax"])
def test_the_strategy_selects_once_checkpoints_and_reports(tiny_splits, tmp_path, monkeypatch,
                                                           select):
    from bonsai_tf import latency
    run = make_run(tiny_splits, tmp_path, latency_target_ms=1.0, latency_select=select)
    run.prepare()
    s = run.strategy
    s.table = object()
    monkeypatch.setattr(latency, "predict", lambda c, table, q: _predict()(c))
    measured = []
    monkeypatch.setattr(latency, "network_latency",
                        lambda c, quantized: measured.append(1) or 1.2 * _predict()(c))
    for cell in run.net.cells:
        for edge in cell.edges.values():
            for op, p in zip(edge.op_names, edge.pruners):
                p.w.assign(2.0 if op == "conv_3x3" else 0.0)
    final = s.final_genotype(run.net)
    argmax = G.strongest_ops(run.net.current_genotype())
    if select == "argmax":
        assert final.hash() == argmax.hash() and s.selection is None and s.state() == {}
        assert s.summary(None) == {}
        return
    assert 1.2 ** (select == "measured") * _predict()(final) <= 1.0 < _predict()(argmax)
    assert bool(measured) == (select == "measured")
    # chosen once for these alphas: a second call neither measures nor changes
    n = len(measured)
    assert s.final_genotype(run.net).hash() == final.hash() and len(measured) == n
    summary = s.summary(None)["latency_selection"]
    assert summary["select"] == select and summary["met"] and "genotype" not in summary
    # the choice is checkpointed: a resumed strategy reports the same
    state = json.loads(json.dumps(s.state()))
    again = proxyless.ProxylessNAS(run.cfg, None)
    again.load_state(state)
    assert again.summary(None) == s.summary(None)
    # other alphas: chosen anew (max pools most probable now: 0.4 ms, with room to spend)
    digest = s.selection["alphas_digest"]
    for cell in run.net.cells:
        for edge in cell.edges.values():
            edge.pruners[edge.op_names.index("max_pool_3x3")].w.assign(5.0)
    again = s.final_genotype(run.net)
    assert s.selection["alphas_digest"] != digest
    assert "max_pool_3x3" in {e.op_names()[0] for c in again.cells for e in c.edges}


def test_an_argmax_under_the_target_whose_steps_up_do_not_fit_takes_one_measurement():
    # As in a quick run: the argmax measured well under the target and every step up
    # of least probability per ms was dearer than the target. Steps up are only taken
    # where they fit, so nothing far up the path is measured.
    g = _supernet([_alphas(max_pool_3x3=2.0, conv_3x3=1.0)] * 3)   # 0.5 ms, steps +0.9 ms
    calls = []

    def measure(c):
        calls.append(_predict()(c))
        return calls[-1]
    final, record = proxyless.select_under_target(g, 0.55, _predict(), measure)
    assert final.hash() == G.strongest_ops(g).hash() and record["direction"] == "argmax"
    assert calls == pytest.approx([0.5]) and record["met"]
    # with room for one pool on an identity edge (+0.1 ms), it is taken and measured
    final, record = proxyless.select_under_target(g, 0.62, _predict(), measure)
    assert record["direction"] == "up" and len(record["switches"]) == 1
    assert record["measured_ms"] == pytest.approx(0.6) and record["met"]
