"""SpiderNet as a strategy: the starting network, the edge split and the rebuild that keeps
every trained weight, per-batch gate records and the clamp, deadheading, the memory check
(measured or estimated), and a tiny search that grows over rounds within its budget."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import config as config_lib
from bonsai_tf import engine
from bonsai_tf import genotype as G
from bonsai_tf import memory as M
from bonsai_tf import network as N
from bonsai_tf import optim
from bonsai_tf import space as S
from bonsai_tf.strategies import spider

OPS = S.space_ops("small")
TINY = dict(strategy="spider", space="small", scale=4, reductions=1, batch_size=16, epochs=7,
            search_epochs=6, round_epochs=2, spider_rounds=3, lr_max=0.05, gate_lr=0.05,
            drop_path=0.0, aux_weight=0.4, val_size=48, seed=3, measure_memory=False)


def make_run(splits, run_dir, **kw):
    return engine.Run(config_lib.RunConfig(**{**TINY, **kw}), splits, str(run_dir), verbose=0)


def start(reductions=1):
    return G.spider_initial("small", (12, 12, 1), 3, 4, reductions)


def with_cell(g, c, cell):
    cells = list(g.cells)
    cells[c] = cell
    return dataclasses.replace(g, cells=tuple(cells))


# ---- the genotype ---------------------------------------------------------------------
def test_starting_network_is_minimal_dense_and_headed():
    g = start(reductions=2)
    assert [c.kind for c in g.cells] == ["normal", "reduction", "reduction"]
    assert [c.channels for c in g.cells] == [4, 8, 16]
    for c, cell in enumerate(g.cells):
        assert cell.nodes == 2
        assert [(e.src, e.dst) for e in cell.edges] == [("x", 0), ("y", 0), (0, 1)]
        assert all(e.op_names() == OPS for e in cell.edges)
        assert [j for j, _ in cell.inputs] == list(range(c + 1))  # every earlier output
    assert G.head_cells(g) == [0, 1]   # an auxiliary head on every cell but the last
    net = N.Network(g, (80.0,), (70.0,))
    assert len(net.model(np.zeros((2, 12, 12, 1), "float32"), training=False)) == 3


@pytest.mark.parametrize("src, dst, want", [
    (0, 1, {(0, 1), (1, 2), (0, 2), ("x", 0), ("y", 0)}),
    ("x", 0, {("x", 0), (0, 1), ("x", 1), ("y", 1), (1, 2)}),
])
def test_edge_split_inserts_a_node_and_keeps_the_old_edge_as_a_skip(src, dst, want):
    cell = start().cells[0]
    cell = dataclasses.replace(cell, edges=tuple(
        dataclasses.replace(e, ops=e.ops[:2]) for e in cell.edges))   # a trained, pruned cell
    new, node_map = G.split_edge(cell, src, dst, OPS)
    assert new.nodes == 3 and node_map == ({0: 0, 1: 2} if dst == 1 else {0: 1, 1: 2})
    assert {(e.src, e.dst) for e in new.edges} == want
    mapped = lambda n: n if n in ("x", "y") else node_map[n]  # noqa: E731
    for e in cell.edges:   # every old edge survives, renumbered, with its operations
        assert new.edge(mapped(e.src), mapped(e.dst)).ops == e.ops
    assert new.edge(src, dst).op_names() == OPS and new.edge(dst, dst + 1).op_names() == OPS
    G.Genotype.validate(with_cell(start(), 0, new))
    assert G.num_nodes(new) == 3


def test_split_of_a_missing_edge_says_what_exists():
    with pytest.raises(G.GenotypeError, match=r"no edge 1->0 .* expected one of"):
        G.split_edge(start().cells[0], 1, 0, OPS)


# ---- the rebuild keeps trained weights --------------------------------------------------
def test_rebuild_after_a_split_keeps_every_weight_and_builds_as_a_fresh_network():
    g = start()
    keras.utils.set_random_seed(0)
    net = N.Network(g, (80.0,), (70.0,))
    for v in net.model.weights:    # "trained": every weight distinct from a fresh draw
        v.assign(np.random.RandomState(len(v.path)).normal(size=v.shape).astype(v.dtype))
    before = {v.path: v.numpy() for v in net.model.weights}
    # Deadheading took an operation off the edge that is split in the same round.
    pruned = dataclasses.replace(g.cells[0], edges=tuple(
        dataclasses.replace(e, ops=e.ops[1:]) if e.src == 0 else e for e in g.cells[0].edges))
    cell, node_map = G.split_edge(pruned, 0, 1, OPS)
    grown = with_cell(g, 0, cell)
    net.rebuild(grown, {0: node_map})
    moved = net.take_moved()
    assert net.take_moved() == {}, "handed over once"
    assert moved and all(new.startswith("cell0/e_0_2/") or new.startswith("cell0/node2")
                         for new in moved)
    now = {v.path: v for v in net.model.weights}
    for new, old in moved.items():
        np.testing.assert_array_equal(now[new].numpy(), before[old])
    for path, v in now.items():    # what did not move kept its object and value
        if path.startswith("cell1/") or path.startswith("cell0/e_x_0/"):
            np.testing.assert_array_equal(v.numpy(), before[path])
    assert len(now) == len(net.model.weights), "no variable listed twice"
    fresh = N.Network(grown, (80.0,), (70.0,))
    assert sorted(now) == sorted(v.path for v in fresh.model.weights)  # a resume finds them
    x = np.random.RandomState(1).uniform(0, 255, (2, 12, 12, 1)).astype("float32")
    assert net.model(x, training=False)[0].shape == (2, 3)


def test_momentum_follows_moved_weights_and_new_ones_start_at_zero():
    a, b = tf.Variable([1.0]), tf.Variable([2.0])
    opt = optim.MomentumSGD(0.9, 0.0)

    class V:   # variables under chosen paths
        def __init__(self, var, path):
            self.var, self.path, self.shape, self.dtype = var, path, var.shape, var.dtype
            self.value = var
    opt.build([("0", [V(a, "c/e_0_1/k"), V(b, "c/e_x_0/k")], True)])
    opt.slots["c/e_0_1/k"].assign([5.0])
    opt.slots["c/e_x_0/k"].assign([7.0])
    c = tf.Variable([3.0])
    opt.build([("0", [V(a, "c/e_0_2/k"), V(c, "c/e_0_1/k"), V(b, "c/e_x_0/k")], True)],
              moved={"c/e_0_2/k": "c/e_0_1/k"})
    assert opt.slots["c/e_0_2/k"].numpy()[0] == 5.0   # moved with its weight
    assert opt.slots["c/e_0_1/k"].numpy()[0] == 0.0   # a new variable at the vacated path
    assert opt.slots["c/e_x_0/k"].numpy()[0] == 7.0


# ---- gates: clamp, per-batch records, deadhead -------------------------------------------
def test_every_step_clamps_the_gates_and_counts_the_open_ones(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    gates = [p for _, _, _, p in run.net.gates()]
    gates[0].w.assign(3.0)
    gates[1].w.assign(-2.0)
    post = run.strategy.after_train_step(run.net)
    post()
    post()
    assert gates[0].w.numpy() == pytest.approx(0.5) and gates[1].w.numpy() == pytest.approx(-0.5)
    assert gates[0].open_records.numpy() == 2 and gates[1].open_records.numpy() == 0
    assert all(p.records.numpy() == 2 for p in gates)


def test_deadhead_removes_what_was_open_in_under_a_quarter_of_the_batches(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    cell = run.net.cells[0]
    edge = cell.edges["e_0_1"]
    # Of 20 batches: shares 0.1, 1, 0.2, 0, 0.25 (not under a quarter: kept), 1.
    for p, opened in zip(edge.pruners, [2, 20, 4, 0, 5, 20]):
        p.records.assign(20.0)
        p.open_records.assign(float(opened))
    for p in [q for _, _, _, q in run.net.gates() if float(q.records.numpy()) == 0]:
        p.records.assign(10.0)
        p.open_records.assign(10.0)
    g, ops, inputs = run.strategy._deadhead(run.net, run.net.current_genotype())
    assert (ops, inputs) == (3, 0)
    assert g.cells[0].edge(0, 1).op_names() == (OPS[1], OPS[4], OPS[5])
    assert all(float(p.records.numpy()) == 0 for _, _, _, p in run.net.gates()), "counts restart"


# ---- the memory check: measured where the machine reports it, else estimated ------------
@pytest.mark.parametrize("reported, source", [
    (M.StepMemory(3 * 2**20, "allocator"), "allocator"),
    (M.StepMemory(5 * 2**20, "rss"), "rss"),
    (M.StepMemory(None, "none"), "estimate"),      # e.g. an AVX2-only AMD EPYC, no rss
    (M.StepMemory(0, "allocator"), "estimate"),    # an allocator that counted nothing
])
def test_memory_check_measures_where_it_can_and_says_which(tiny_splits, tmp_path, monkeypatch,
                                                           reported, source):
    run = make_run(tiny_splits, tmp_path, measure_memory=True)
    run.prepare()
    calls = []

    def fake(step_fn, device=None, source=None):
        calls.append(step_fn())
        return reported
    monkeypatch.setattr(M, "measure_step_peak", fake)
    batch = (tf.constant(tiny_splits.train[0][:16], tf.float32),
             tf.constant(tiny_splits.train[1][:16]))
    mb, got = run.strategy._training_memory(run.net.genotype, run.net, batch)
    assert got == source and len(calls) == 1, "one real step measured"
    want = (reported.mb if source != "estimate"
            else M.estimate(run.net.genotype, TINY["batch_size"])["mb"])
    assert mb == pytest.approx(want)


def test_memory_check_is_an_estimate_when_measuring_is_off(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    mb, source = run.strategy._training_memory(run.net.genotype, run.net, None)
    assert source == "estimate"
    assert mb == pytest.approx(M.estimate(run.net.genotype, TINY["batch_size"])["mb"])


# ---- rounds: a search that grows, and the budget it never exceeds -------------------------
def _records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_tiny_search_grows_over_rounds_within_its_budget(tiny_splits, tmp_path):
    grown = G.spider_initial("small", (12, 12, 1), 3, 4, 1)
    for c in range(2):   # room for two splits and not three
        grown = with_cell(grown, c, G.split_edge(grown.cells[c], 0, 1, OPS)[0])
    budget = M.estimate(grown, TINY["batch_size"])["mb"] + 0.01
    metrics = make_run(tiny_splits, tmp_path, memory_budget_mb=budget, epochs=7,
                       search_epochs=6, spider_rounds=3, spider_candidates=2).run()
    records = _records(tmp_path)
    search = [r for r in records if r["phase"] == "search" or "spider_round" in r]
    nodes = [r["nodes"] for r in records]
    edges = [r["edges"] for r in records]
    assert nodes[-1] > nodes[0] and edges[-1] > edges[0], (nodes, edges)
    assert nodes == sorted(nodes) or any("deadhead" in e for r in records for e in r["events"])
    events = " ".join(e for r in records for e in r["events"])
    assert "mutate: cell" in events
    for r in records:   # never over the budget, and the check says what it used
        assert r["memory_mb"] <= budget + 1e-6, r["memory_mb"]
        if r.get("spider_memory_mb") is not None:
            assert r["spider_memory_source"] == "estimate"
    assert metrics["mutations"] >= 1 and metrics["candidates_scored"] >= 2
    assert metrics["trainfree_seconds_per_candidate"] > 0
    assert metrics["memory_mb"] <= budget + 1e-6
    assert search
    from bonsai_tf import report
    report.write_report(str(tmp_path))
    assert G.Genotype.load(str(tmp_path / "genotype.json")).hash() == metrics["genotype_hash"]


def test_starting_network_over_the_budget_is_refused(tiny_splits, tmp_path):
    need = M.estimate(start(), TINY["batch_size"])["mb"]
    with pytest.raises(spider.BudgetError, match=r"too small for SpiderNet's starting network"):
        make_run(tiny_splits, tmp_path, memory_budget_mb=need / 2).prepare()


def test_too_many_reductions_for_the_images_are_refused():
    cfg = config_lib.RunConfig(**{**TINY, "reductions": 4})
    with pytest.raises(config_lib.ConfigError, match=r"too small for 4 reductions"):
        config_lib.pattern_cap(cfg, (12, 12, 1))
    assert config_lib.pattern_cap(config_lib.RunConfig(**TINY), (12, 12, 1)) == 2
