import json
import os

import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import config as config_lib
from bonsai_tf import engine
from bonsai_tf import genotype as G
from bonsai_tf import memory as M

TINY = dict(scale=4, nodes=2, patterns=(("n",), ("r",)), batch_size=32, epochs=5,
            search_epochs=4, prune_interval=1, cycle_len=1, lambda_edge=2.0, lambda_input=2.0,
            gate_lr=0.5, lr_max=0.05, drop_path=0.1, val_size=0, seed=3, measure_memory=False,
            max_patterns=2)


def budget_for_growth():
    g = G.initial("bonsai7", (12, 12, 1), 3, 4, 2, [["n"], ["r"]], 1)
    one, two = M.estimate(g, 32)["mb"], M.estimate(G.grow(g), 32)["mb"]
    return round(one + 0.6 * (two - one), 3)


def make_run(tiny_splits, run_dir, **kw):
    cfg = config_lib.RunConfig(**{**TINY, "memory_budget_mb": budget_for_growth(), **kw})
    return engine.Run(cfg, tiny_splits, str(run_dir), verbose=0)


def test_compression_loss_pushes_gates_the_right_way(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    # identity costs no memory, so the compression loss does not move its gate
    op_gates = [p.w for _, kind, key, p in run.net.gates() if kind == "op" and key[1] != "identity"]
    with tf.GradientTape() as tape:
        loss = run.extra_loss({"aim": tf.constant(0.2), "pressure": tf.constant(1.0)})
    grads = tape.gradient(loss, op_gates)
    assert all(float(g) > 0 for g in grads)  # every gate open, aim below: descent closes them
    for w in op_gates:
        w.assign(-0.1)
    with tf.GradientTape() as tape:
        loss = run.extra_loss({"aim": tf.constant(0.9), "pressure": tf.constant(1.0)})
    grads = tape.gradient(loss, op_gates)
    assert all(float(g) < 0 for g in grads)  # all closed, aim above: descent reopens them
    with tf.GradientTape() as tape:
        doubled = run.extra_loss({"aim": tf.constant(0.9), "pressure": tf.constant(2.0)})
    assert float(doubled) == pytest.approx(2 * float(loss), rel=1e-5)


def test_first_evaluation_after_a_rebuild_counts_its_trace(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    x, y = tiny_splits.val
    run._retrace_pending["eval"] = True   # as _rebuild leaves it
    run.evaluate(x, y, batch_size=8)
    traced = run._eval_retrace
    assert traced > 0 and not run._retrace_pending["eval"]
    run.evaluate(x, y, batch_size=8)      # nothing rebuilt since: nothing added
    assert run._eval_retrace == traced


def test_trace_cost_leaves_out_what_every_first_batch_costs(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    run.prepare()
    run._retrace_pending = {"train": True, "eval": True}   # as _rebuild leaves it
    # Freshly compiled, nothing seen yet: the whole excess over the median is the trace's.
    assert run._trace_cost("train", [1.3, 0.1, 0.1, 0.1]) == pytest.approx(1.2)
    # Epochs on the same graph: their first batches' excess (a data pipeline starting)
    # is recorded, not counted.
    assert run._trace_cost("train", [0.4, 0.1, 0.1]) == 0.0
    assert run._trace_cost("train", [0.2, 0.1, 0.1]) == 0.0
    assert run._trace_cost("train", [0.3, 0.1, 0.1]) == 0.0
    assert run._warmups["train"] == pytest.approx([0.3, 0.1, 0.2])
    run._compile()      # as a rebuild does: the next first batch traces again
    run._retrace_pending["train"] = True
    assert run._trace_cost("train", [1.3, 0.1, 0.1]) == pytest.approx(1.0)
    # Never below zero, and the evaluation keeps its own record.
    run._compile()
    run._retrace_pending["train"] = True
    assert run._trace_cost("train", [0.15, 0.1, 0.1]) == 0.0
    assert run._trace_cost("eval", [0.9, 0.1]) == pytest.approx(0.8)


@pytest.mark.slow
def test_tiny_search_deadheads_grows_and_finishes(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path)
    metrics = run.run()
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    for key in ("epoch", "params", "cells", "compression", "val_accuracy", "memory_mb", "seconds"):
        assert key in records[0]
    assert records[0]["compression"] <= 1.0
    events = " ".join(e for r in records for e in r["events"])
    assert "deadhead: removed" in events and "grow: pattern 2" in events
    assert records[-1]["cells"] == 2 and records[-1]["phase"] == "final"
    assert min(r["compression"] for r in records) < 1.0
    for key in ("test_accuracy", "params", "search_seconds", "total_seconds"):
        assert key in metrics
    # The cost of structural changes is measured: an epoch after a deadhead retraces,
    # and the search's total is its epochs' sum (the last one folds the final network).
    last = next(i for i, r in enumerate(records) if any("final network" in e for e in r["events"]))
    search = records[:last + 1]
    assert any(r["restructure_seconds"] > 0 for r in search)
    for before, after in zip(search, search[1:]):
        if any(e.startswith("deadhead") for e in before["events"]):
            assert after["retrace_seconds"] > 0
    assert metrics["restructure_seconds"] == pytest.approx(
        sum(r["restructure_seconds"] for r in search), rel=1e-6)
    assert 0 < metrics["restructure_share"] < 1
    # One rebuild per epoch that deadheaded or grew (both in one epoch: one rebuild).
    changed = [r for r in search if any(e.startswith(("deadhead", "grow")) for e in r["events"])]
    assert metrics["restructures"] == len(changed) >= 2
    assert metrics["restructure_seconds_per_change"] == pytest.approx(
        metrics["restructure_seconds"] / len(changed))
    g = G.Genotype.load(str(tmp_path / "genotype.json"))
    assert g.hash() == metrics["genotype_hash"] and len(g.cells) == 2
    assert g.num_ops() < 2 * 5 * 7
    assert os.path.exists(tmp_path / "model.keras")
    assert os.path.isdir(tmp_path / "tensorboard")
    # the trained network learned the signal in the generated data
    assert metrics["test_accuracy"] > 0.5


def test_budget_too_small_is_an_error(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path, memory_budget_mb=0.01)
    with pytest.raises(engine.BudgetError, match="too small for one pattern"):
        run.run()


def test_non_finite_loss_stops_the_run_keeping_the_checkpoint(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path, epochs=2, search_epochs=1, lr_max=1e30)
    with pytest.raises(engine.NonFiniteLoss, match="expected a finite loss"):
        run.run()


def _found_genotype(tmp_path):
    """A pruned two-cell genotype, as a search would leave it, saved to a file."""
    import dataclasses
    g = G.initial("bonsai7", (12, 12, 1), 3, 4, 2, [["n"], ["r"]], 2)
    keep = ("sep_conv_3x3", "max_pool_3x3")
    cells = tuple(dataclasses.replace(c, edges=tuple(
        dataclasses.replace(e, ops=tuple(o for o in e.ops if o[0] in keep)) for e in c.edges))
        for c in g.cells)
    g = dataclasses.replace(g, cells=cells).canonical()
    path = tmp_path / "found.json"
    path.write_text(g.to_json())
    return g, str(path)


@pytest.mark.parametrize("strategy", ["fixed", "random"])
def test_fixed_and_random_strategies_train_a_genotype(tiny_splits, tmp_path, strategy):
    found, path = _found_genotype(tmp_path)
    run = make_run(tiny_splits, tmp_path / "run", strategy=strategy, genotype=path, epochs=2,
                   search_epochs=0, memory_budget_mb=0.0)
    metrics = run.run()
    g = G.Genotype.load(str(tmp_path / "run" / "genotype.json"))
    assert len(g.cells) == len(found.cells)
    assert [c.kind for c in g.cells] == [c.kind for c in found.cells]
    records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["phase"] for r in records] == ["final", "final"]
    if strategy == "fixed":
        # retraining from scratch keeps the architecture exactly
        assert g.hash() == found.hash() == metrics["genotype_hash"]
    else:
        assert g.hash() != found.hash()
    from bonsai_tf import network as N
    rebuilt = N.Network(g, mean=(80.0,), std=(70.0,), with_pruners=False, aux_heads=False)
    assert rebuilt.count_params() == metrics["params"]


def test_config_and_registry_name_the_same_strategies():
    from bonsai_tf import strategies
    assert sorted(config_lib.STRATEGIES) == strategies.names()
    assert set(config_lib.SEARCHING) == {n for n in strategies.names()
                                         if strategies.get(n).searches}
    with pytest.raises(ValueError, match="already registered"):
        strategies.register(strategies.get("bonsai"))
    with pytest.raises(ValueError, match="unknown strategy 'nope'; expected one of"):
        strategies.get("nope")


def _end_epochs(run, first, last):
    """Ends epochs first..last (1-based) on the strategy alone; their events."""
    events = []
    for epoch in range(first, last + 1):
        events += run.strategy.after_epoch(epoch, run.net).events
    return events


@pytest.mark.parametrize("ratio, doubles", [(0.5, True), (1.0, False)])
def test_pressure_doubles_only_while_the_target_is_not_reached(tiny_splits, tmp_path, ratio,
                                                               doubles):
    # One pattern is the cap: nothing grows. Nothing is removed yet, so the hard
    # compression is 1.0: above a 0.5 target (not reached), at a 1.0 one (reached).
    run = make_run(tiny_splits, tmp_path, max_patterns=1, prune_interval=100, cycle_len=1)
    run.prepare()
    run.strategy.ratios = {"1": ratio}
    events = _end_epochs(run, 1, 3)
    cycles = [e for e in events if e.startswith("compression cycle")]
    assert run.strategy.cycles == (3 if doubles else 0), events
    assert len(cycles) == (3 if doubles else 0)


def test_search_settles_after_its_last_change_at_the_cap(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path, max_patterns=1, prune_interval=100, settle_epochs=2)
    run.prepare()
    s = run.strategy
    s.ratios = {"1": 1.0}
    assert not s.search_done(run.net)
    assert not any(e.startswith("settled") for e in _end_epochs(run, 1, 1))
    assert not s.search_done(run.net)                      # 1 epoch without change, 2 asked
    events = _end_epochs(run, 2, 2)
    assert s.search_done(run.net) and any(e.startswith("settled") for e in events), events
    # a change restarts the wait; the state survives a checkpoint
    s.quiet_epochs = 0
    restored = type(s)(s.cfg, s.info)
    restored.load_state(json.loads(json.dumps(s.state())))
    assert not restored.search_done(run.net)
    restored.after_epoch(3, run.net)
    assert not restored.search_done(run.net)
    restored.after_epoch(4, run.net)
    assert restored.search_done(run.net)
    # not at the target yet: the search goes on however long nothing changed
    s.ratios = {"1": 0.5}
    assert not s.search_done(run.net)


def test_search_not_at_the_cap_or_without_settling_does_not_settle(tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path, max_patterns=2, prune_interval=100, settle_epochs=1)
    run.prepare()
    run.strategy.ratios = {"1": 1.0, "2": 1.0}
    _end_epochs(run, 1, 3)
    assert not run.strategy.search_done(run.net)          # one pattern of two: growth ahead
    run = make_run(tiny_splits, tmp_path / "off", max_patterns=1, prune_interval=100)
    run.prepare()
    run.strategy.ratios = {"1": 1.0}
    _end_epochs(run, 1, 5)
    assert not run.strategy.search_done(run.net)          # settle_epochs=0: never


@pytest.mark.parametrize("ratios, why", [
    ({"1": 1.0}, "at the budget's last pattern (2 of the cap's 3"),
    ({}, "without a memory budget nothing grows (2 of 3 patterns)")])
def test_search_settles_where_the_budget_plans_no_more_growth(tiny_splits, tmp_path, ratios,
                                                             why):
    # Two patterns of a cap of three, and a budget whose plan ends at two (e_c(1) only:
    # two patterns plus a third unpruned one never fit) or no budget at all: nothing can
    # grow, so the search settles as at the cap instead of running out its time.
    run = make_run(tiny_splits, tmp_path, max_patterns=3, prune_interval=100, settle_epochs=2)
    s = run.strategy
    run.prepare(G.grow(s.initial_genotype()))
    s.ratios = dict(ratios)
    assert G.num_patterns(run.net.genotype) == 2 and not s.grows_further(run.net)
    events = _end_epochs(run, 1, 2)
    assert s.search_done(run.net), events
    assert not any(e.startswith("grow") for e in events), events
    assert any(e.startswith(f"settled: {why}") for e in events), events
    # with e_c(2) planned, growth is still ahead: no settling
    s.ratios = {"1": 1.0, "2": 1.0}
    assert s.grows_further(run.net) and not s.search_done(run.net)


@pytest.mark.slow
def test_a_settled_search_gives_its_epochs_to_the_final_training(tiny_splits, tmp_path):
    # No budget, one pattern: at the cap from the start, so the search ends once nothing
    # has been removed for 2 epochs, long before its 8 epochs; the run still ends at 10.
    run = make_run(tiny_splits, tmp_path, max_patterns=1, memory_budget_mb=0.0, epochs=10,
                   search_epochs=8, settle_epochs=2, lambda_edge=0.0, lambda_input=0.0)
    run.run()
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == list(range(1, 11))
    settled = [r["epoch"] for r in records if any(e.startswith("settled") for e in r["events"])]
    assert settled and settled[0] < 8, [r["events"] for r in records]
    assert records[settled[0] - 1]["phase"] == "final"
    assert sum(r["phase"] == "final" for r in records) > 2


def test_final_with_val_trains_the_final_network_on_the_validation_examples_too(
        tiny_splits, tmp_path):
    run = make_run(tiny_splits, tmp_path, val_size=48, final_with_val=True)
    metrics = run.run()
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    # The record of the epoch that ended the search already reads "final".
    last = next(i for i, r in enumerate(records) if any("final network" in e for e in r["events"]))
    search, final = records[:last + 1], records[last + 1:]
    assert search and final
    # The search trains on the training split (192 examples: 6 batches of 32) and is
    # validated; the final network trains on 192 + 48 (7 batches) and is not.
    assert all(r["steps"] == 6 and r["val_accuracy"] is not None for r in search)
    assert all(r["steps"] == 7 and r["val_accuracy"] is None for r in final)
    assert metrics["examples"] == {"train": 192, "val": 48, "test": 48, "final": 240}
    assert metrics["final_with_val"] is True
    assert metrics["best_val_accuracy"] == max(r["val_accuracy"] for r in search)
    from bonsai_tf import report as report_lib
    report_lib.write_report(str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    assert "search epochs only" in report and "the final network trained on 240" in report


def test_a_final_only_run_with_final_with_val_is_never_validated(tiny_splits, tmp_path):
    _, path = _found_genotype(tmp_path)
    metrics = make_run(tiny_splits, tmp_path / "run", strategy="fixed", genotype=path, epochs=2,
                       search_epochs=0, memory_budget_mb=0.0, val_size=48,
                       final_with_val=True).run()
    records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(r["steps"], r["val_accuracy"]) for r in records] == [(7, None), (7, None)]
    # No validated epoch: no best validation accuracy (not 0).
    assert metrics["best_val_accuracy"] is None and metrics["examples"]["final"] == 240


def test_final_with_val_needs_held_out_examples():
    with pytest.raises(config_lib.ConfigError, match="final_with_val = True; expected False "
                                                      "with val_size=0"):
        config_lib.RunConfig(val_size=0, final_with_val=True)
