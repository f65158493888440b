"""bench/compare.py: the budget split, the epoch plan, the verdict rule, the KerasTuner
hypermodel, and the orchestration (every row reported, a killed comparison continues
without redoing finished sub-runs).

The orchestration tests run compare.py's real code with a stand-in launcher that
writes what each entry script would (no TensorFlow, a second each); the end-to-end
test, marked slow, runs the real scripts on generated 12x12 images.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from bonsai_tf import comparison as cmp
from bonsai_tf import genotype as G
from bonsai_tf import memory as M
from bonsai_tf import run_dir as rd
import fake_subrun
from compare_fixtures import COMPARE, RUNS, compare_argv, flagfile, load_compare  # noqa: F401
from helpers import make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the budget split ---------------------------------------------------------------------
@pytest.mark.parametrize("minutes,strategies,seeds", [(120, 2, 3), (60, 1, 1), (2, 2, 2)])
def test_split_budget_adds_up_and_gives_the_tuner_one_strategys_share(minutes, strategies, seeds):
    total = minutes * 60.0
    s = cmp.split_budget(total, strategies, seeds, search_share=0.4)
    searches = s["search_runs"] * s["search_run_seconds"]
    assert s["search_runs"] == strategies * seeds
    assert s["tuner_seconds"] == pytest.approx(seeds * s["search_run_seconds"])
    assert s["reserve_seconds"] + searches + s["tuner_seconds"] + s["retrain_seconds"] == \
        pytest.approx(total)
    assert searches + s["tuner_seconds"] == pytest.approx(0.4 * (total - s["reserve_seconds"]))
    assert 0 < s["reserve_seconds"] <= 0.25 * total
    assert s["retrain_runs"] == 2 * strategies * seeds + 2
    assert all(isinstance(w, str) for w in s["why"])
    assert json.loads(json.dumps(s)) == s  # goes into compare.json as it is


def test_split_budget_warns_of_short_searches_and_refuses_nonsense():
    assert any("short" in w for w in cmp.split_budget(120, 2, 3)["why"])
    assert not any("short" in w for w in cmp.split_budget(6 * 3600, 2, 3)["why"])
    for args in ((0, 1, 1), (60, 0, 1), (60, 1, 0)):
        with pytest.raises(ValueError):
            cmp.split_budget(*args)
    with pytest.raises(ValueError):
        cmp.split_budget(60, 1, 1, search_share=1.0)


# ---- planning the epochs --------------------------------------------------------------------
def test_plan_epochs_fits_every_retraining_in_what_is_left():
    runs = [{"name": f"r{i}", "epoch_seconds": 10.0 + i, "overhead_seconds": 30.0}
            for i in range(4)]
    per_epoch, fixed = sum(10.0 + i for i in range(4)), 4 * 30.0
    left = 2000.0
    plan = cmp.plan_epochs(left, runs, safety=1.2)
    e = plan["epochs"]
    assert fixed + e * per_epoch <= left / 1.2 < fixed + (e + 1) * per_epoch
    assert plan["expected_seconds"] == pytest.approx(fixed + e * per_epoch)
    assert "overrun" not in plan["why"]


def test_plan_epochs_is_at_least_one_and_says_when_the_budget_is_overrun():
    plan = cmp.plan_epochs(50.0, [{"name": "r", "epoch_seconds": 100.0,
                                   "overhead_seconds": 40.0}])
    assert plan["epochs"] == 1 and "overrun" in plan["why"]
    with pytest.raises(ValueError):
        cmp.plan_epochs(100.0, [])


def _stepped(epoch_steps, step, outside, overhead, n=4):
    return [{"name": f"r{i}", "epoch_seconds": epoch_steps * step + outside,
             "step_seconds": step, "outside_seconds": outside, "overhead_seconds": overhead}
            for i in range(n)]


def test_plan_in_steps_spends_what_whole_epochs_would_leave():
    # 4 runs of 30 s overhead, full passes of 100 steps at 0.1 s + 2 s outside (12 s).
    runs = _stepped(100, 0.1, 2.0, 30.0)
    left = 4 * 30.0 + 4 * 12.0 * 6.6          # 6.6 passes of every run
    whole = cmp.plan_epochs(left, runs, safety=1.0)
    plan = cmp.plan_epochs(left, runs, safety=1.0, full_pass_steps=100)
    assert whole["epochs"] == 6 and whole["steps_per_epoch"] is None
    e, s = plan["epochs"], plan["steps_per_epoch"]
    # One more epoch of fewer steps: more training within the same limit.
    assert e == 7 and s < 100 and e * s > 6 * 100
    assert plan["expected_seconds"] == pytest.approx(4 * (30 + 7 * (s * 0.1 + 2.0)))
    assert plan["expected_seconds"] <= left < 4 * (30 + 7 * ((s + 1) * 0.1 + 2.0))
    assert "7 epochs of %d steps (a full pass is 100)" % s in plan["why"]
    assert cmp.schedule_text({**plan, "full_pass_steps": 100}) == f"7 epochs of {s} steps"
    assert cmp.schedule_text(whole) == "6 epochs" and cmp.schedule_text(None) == "? epochs"


def test_plan_in_steps_keeps_whole_passes_when_they_fit_exactly_or_spread_across_workers():
    runs = _stepped(100, 0.1, 2.0, 30.0)
    exact = cmp.plan_epochs(4 * 30.0 + 4 * 12.0 * 5, runs, safety=1.0, full_pass_steps=100)
    assert (exact["epochs"], exact["steps_per_epoch"]) == (5, 100)
    two = cmp.plan_epochs(1000.0, runs, safety=1.0, workers=2, full_pass_steps=100)
    assert two["expected_seconds"] <= 1000.0
    assert two["epochs"] * two["steps_per_epoch"] >= \
        cmp.plan_epochs(1000.0, runs, safety=1.0, workers=2)["epochs"] * 100


def test_plan_in_steps_shortens_a_single_epoch_rather_than_overrun():
    runs = _stepped(100, 1.0, 0.0, 10.0, n=1)      # a full pass: 100 s
    plan = cmp.plan_epochs(60.0, runs, safety=1.0, full_pass_steps=100)
    assert (plan["epochs"], plan["steps_per_epoch"]) == (1, 50)
    assert "overrun" not in plan["why"]
    # Not even one step fits: one full epoch, and it says the budget will be overrun.
    hopeless = cmp.plan_epochs(5.0, runs, safety=1.0, full_pass_steps=100)
    assert (hopeless["epochs"], hopeless["steps_per_epoch"]) == (1, 100)
    assert "overrun" in hopeless["why"]


def test_final_phase_speed_leaves_out_the_epoch_that_ended_the_search():
    records = [
        {"phase": "search", "step_seconds": 0.5, "steps": 10, "epoch_seconds": 6.0, "events": []},
        {"phase": "final", "step_seconds": 0.4, "steps": 10, "epoch_seconds": 5.0,
         "events": ["final network: search finished, 12 operations kept"]},
        {"phase": "final", "step_seconds": 0.1, "steps": 10, "epoch_seconds": 1.5, "events": []},
        {"phase": "final", "step_seconds": 0.1, "steps": 10, "epoch_seconds": 1.3, "events": []},
    ]
    speed = cmp.final_phase_speed(records)
    assert speed["step_seconds"] == pytest.approx(0.1)
    assert speed["outside_seconds"] == pytest.approx(0.4)
    assert speed["epochs"] == 2
    # Only the transition epoch: it is what there is.
    assert cmp.final_phase_speed(records[:2])["step_seconds"] == pytest.approx(0.4)
    assert cmp.final_phase_speed(records[:1]) is None


def test_cost_ratio_takes_the_larger_of_operations_and_flops():
    ref = {"operations": 10, "flops": 1000}
    assert cmp.cost_ratio(ref, {"operations": 20, "flops": 500}) == 2.0
    assert cmp.cost_ratio(ref, {"operations": 5, "flops": 3000}) == 3.0
    assert cmp.cost_ratio(ref, {"operations": 5, "flops": 500}) == 0.5


# ---- mean ± std and the verdict ----------------------------------------------------------------
def test_mean_std_is_the_sample_spread_of_finite_values():
    s = cmp.mean_std([0.9, 0.92, None, float("nan"), 0.94])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.92)
    assert s["std"] == pytest.approx(0.02)
    assert cmp.mean_std([0.5]) == {"n": 1, "mean": 0.5, "std": None}
    assert cmp.mean_std([]) == {"n": 0, "mean": None, "std": None}


@pytest.mark.parametrize("search,random,verdict", [
    ([0.92, 0.93, 0.94], [0.88, 0.89, 0.90], "beats"),          # 0.92 - 0.01 > 0.89 + 0.01
    ([0.88, 0.89, 0.90], [0.92, 0.93, 0.94], "worse"),
    ([0.90, 0.93, 0.96], [0.89, 0.90, 0.91], "within spread"),  # 0.93 - 0.03 < 0.90 + 0.01
    ([0.91, 0.915], [0.90, 0.905], "beats"),
    ([0.95], [0.80, 0.81], "undetermined"),                     # one seed: no spread to judge
])
def test_versus_random_applies_the_rule(search, random, verdict):
    v = cmp.versus_random(search, random)
    assert v["verdict"] == verdict
    assert v["why"]


def test_summarize_means_over_finished_runs_only():
    runs = [{"name": "a", "test_accuracy": 0.9, "params": 100, "memory_measured_mb": None},
            {"name": "b", "test_accuracy": 0.8, "params": 300, "memory_measured_mb": 12.0},
            {"name": "c", "test_accuracy": None}]
    row = cmp.summarize("m", runs)
    assert row["n"] == 2 and row["runs"] == 3 and row["failed"] == ["c"]
    assert row["accuracy_mean"] == pytest.approx(0.85) and row["params"] == 200
    assert row["memory_measured_mb"] == 12.0


# ---- the plain CNN -------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["small", "bonsai7"])
def test_plain_cnn_is_a_valid_conv_chain_of_about_the_target_size(space):
    template = G.initial(space, (28, 28, 1), 10, 16, 2, [["n"], ["r"]], 2, stem_stride=2)
    target = 40000
    g = cmp.plain_cnn(template, 2, target)
    g.validate()
    assert len(g.cells) == len(template.cells)
    assert [c.kind for c in g.cells] == [c.kind for c in template.cells]
    for cell in g.cells:
        assert not cell.inputs
        assert [(e.src, e.dst, e.op_names()) for e in cell.edges] == \
            [("x", 0, ("conv_3x3",)), (0, 1, ("conv_3x3",))]
    params = M.estimate(g, 1)["params"]
    others = [M.estimate(cmp._cnn(template, g.space, 2, s), 1)["params"]
              for s in (g.scale - 1, g.scale + 1)]
    assert all(abs(params - target) <= abs(p - target) for p in others)
    assert G.Genotype.from_json(g.to_json()).hash() == g.hash()


# ---- the KerasTuner hypermodel --------------------------------------------------------------
def test_hypermodel_turns_random_hyperparameters_into_valid_genotypes():
    import keras_tuner as kt

    from bonsai_tf import tuner

    hm = tuner.GenotypeHyperModel("small", (12, 12, 1), 3, scale=4, nodes=2,
                                  patterns=[["n"], ["r"]], max_patterns=2)
    hp = kt.HyperParameters()
    first = hm.genotype(hp)  # declares the space; every choice at its default (off)
    names = {p.name for p in hp.space}
    assert {"patterns", "cell1.input1", "cell1.x-1.conv_3x3", "cell1.fallback"} <= names
    assert "cell1.input2" not in names  # cell 1 sees the stem (0) and cell 0 (1)
    # Nothing chosen: each cell keeps the fallback path x -> last node.
    assert [(e.src, e.dst, e.op_names()) for e in first.cells[0].edges] == \
        [("x", 1, ("conv_3x3",))]
    hashes = set()
    for seed in range(60):
        values = {p.name: p.random_sample(seed * 7919 + i) for i, p in enumerate(hp.space)}
        g = tuner.values_genotype(hm, hp, values)
        g.validate()
        assert g == g.canonical()
        assert len(g.cells) == G.num_patterns(g) == values["patterns"]
        for c, cell in enumerate(g.cells):
            assert cell.edges
            assert all(0 <= j <= c for j, _ in cell.inputs)
        assert G.Genotype.from_json(g.to_json()).hash() == g.hash()
        hashes.add(g.hash())
        # The space does not depend on the values: every draw declares the same names.
        assert {p.name for p in hp.space} == names
    assert len(hashes) > 50


def test_hypermodel_builds_a_compiled_model_of_logits():
    import keras_tuner as kt
    import numpy as np

    from bonsai_tf import tuner

    hm = tuner.GenotypeHyperModel("small", (12, 12, 1), 3, scale=4, nodes=1,
                                  patterns=[["n"], ["r"]], max_patterns=2, mean=(80.0,),
                                  std=(70.0,), decay_steps=2)
    hp = kt.HyperParameters()
    hp.Fixed("patterns", 2)
    model = hm.build(hp)
    assert model.output_shape == (None, 3)
    x = np.random.RandomState(0).randint(0, 255, (8, 12, 12, 1)).astype("float32")
    logs = model.train_on_batch(x, np.arange(8) % 3, return_dict=True)
    assert np.isfinite(logs["loss"]) and "accuracy" in logs


def test_budget_oracle_stops_when_time_is_spent_and_redraws_what_does_not_fit():
    import keras_tuner as kt

    from bonsai_tf import tuner

    hm = tuner.GenotypeHyperModel("small", (12, 12, 1), 3, scale=4, nodes=1,
                                  patterns=[["n"], ["r"]], max_patterns=2)
    hp = kt.HyperParameters()
    hm.genotype(hp)

    class Clock:
        seconds_left = 100.0

        def left(self):
            return self.seconds_left

    clock = Clock()
    oracle = tuner.BudgetOracle(clock, feasible=lambda v: v["patterns"] == 1,
                                objective=kt.Objective("val_accuracy", "max"), max_trials=50,
                                seed=0)
    oracle.update_space(hp)
    for i in range(12):
        response = oracle.populate_space(str(i))
        assert response["status"] == "RUNNING" and response["values"]["patterns"] == 1
    assert oracle.redrawn > 0
    clock.seconds_left = 0.0
    assert oracle.populate_space("x")["status"] == "STOPPED"


def test_tuner_writes_the_best_genotype_and_resumes_its_project(tiny_splits, tmp_path):
    from bonsai_tf import tuner

    out = str(tmp_path / "tuner")
    kwargs = dict(space="small", scale=4, nodes=1, patterns=[["n"], ["r"]], max_patterns=2,
                  stem_stride=1, batch_size=32, lr_max=0.05, lr_min=0.0, momentum=0.9,
                  weight_decay=3e-4, budget_seconds=0, trial_epochs=1, max_trials=2,
                  memory_budget_mb=5.0, settings={"config": "tiny"})
    m = tuner.tune(tiny_splits, out, **kwargs)
    assert m["trials"] == m["completed_trials"] == 2
    assert 0 <= m["best_val_accuracy"] <= 1 and m["memory_mb"] <= 5.0
    assert (m["train_examples"], m["val_examples"], m["test_examples"]) == (192, 48, 48)
    g = G.Genotype.load(os.path.join(out, "genotype.json"))
    assert g.hash() == m["genotype_hash"]
    with open(os.path.join(out, "trials.jsonl")) as f:
        trials = [json.loads(line) for line in f]
    assert len(trials) == 2 and max(t["val_accuracy"] for t in trials) == \
        pytest.approx(m["best_val_accuracy"])
    # Killed before its result was written: KerasTuner reloads its trials, none is redone.
    os.unlink(os.path.join(out, "metrics.json"))
    again = tuner.tune(tiny_splits, out, **kwargs)
    assert again["trials"] == 2 and again["genotype_hash"] == m["genotype_hash"]
    with open(os.path.join(out, "trials.jsonl")) as f:
        assert len(f.readlines()) == 2
    with pytest.raises(rd.RunDirError, match="other settings"):
        tuner.tune(tiny_splits, out, **dict(kwargs, settings={"config": "other"}))


# ---- the orchestration, with a stand-in for the entry scripts ----------------------------------
class FakeScripts:
    """Launcher that writes what search.py / tune.py / train.py would, instantly."""

    def __init__(self, fail=None, interrupt_at=None):
        self.calls = []
        self.fail = fail or {}             # run name -> (exit status, error line)
        self.interrupt_at = interrupt_at   # the call number that is "killed"

    def names(self):
        return [os.path.basename(c["output_dir"]) for c in self.calls]

    def __call__(self, script, args, log_path):
        a = fake_subrun.parse(script, args)
        self.calls.append(a)
        out = a["output_dir"]
        name = os.path.basename(out)
        os.makedirs(out, exist_ok=True)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            rd.write_json(os.path.join(out, "partial.json"), {})
            raise KeyboardInterrupt
        if name in self.fail:
            return self.fail[name]
        fake_subrun.write(a)
        return 0, None


METHODS = ["bonsai (found)", "random (matched to bonsai)", "asap (found)",
           "random (matched to asap)", "keras-tuner best", "plain CNN"]


def test_compare_runs_every_step_and_reports_every_row(flagfile, tmp_path):
    compare = load_compare()
    out = str(tmp_path / "cmp")
    fake = FakeScripts()
    assert compare.main(compare_argv(flagfile, out), launcher=fake) == 0
    assert fake.names() == RUNS
    searches = [c for c in fake.calls if c["script"] == "search.py"]
    state = rd.read_json(os.path.join(out, "compare.json"))
    split, plan = state["split"], state["epochs_plan"]
    for c in searches:
        assert "--noexport" in c["args"] and c["search_fraction"] == "0.75"
        # Their final networks are retrained here: the searches only time them.
        assert c["final_probe_steps"] == str(compare.FINAL_PROBE_STEPS)
        assert float(c["time_budget_minutes"]) == pytest.approx(
            split["search_run_seconds"] / 60, abs=1e-4)
        assert c["output_dir"].startswith(out)
    tune = fake.calls[4]
    # After the searches, given what they took (instant stand-ins: the floor), within
    # its allowance, and recorded for a rerun.
    assert state["tuner_seconds"] == pytest.approx(
        min(split["tuner_seconds"], cmp.MIN_TUNER_SECONDS))
    assert float(tune["time_budget_minutes"]) == pytest.approx(state["tuner_seconds"] / 60,
                                                               abs=1e-4)
    # One schedule for every retraining: the planned E, no time budget, the found genotype.
    trains = [c for c in fake.calls if c["script"] == "train.py"]
    assert plan["epochs"] >= 1 and len(plan["runs"]) == 10
    assert {c["epochs"] for c in trains} == {str(plan["epochs"])}
    assert {c["time_budget_minutes"] for c in trains} == {"0"}
    # Planned in steps: every retraining the same epoch length, given only where it is
    # shorter than a full pass.
    steps, full = plan["steps_per_epoch"], plan["full_pass_steps"]
    assert 1 <= steps <= full
    assert {c.get("steps_per_epoch") for c in trains} == {str(steps) if steps < full else None}
    assert all(c["args"][0] == f"--flagfile={flagfile}" and "--final_subset=64" in c["args"]
               for c in fake.calls)
    retrain = {os.path.basename(c["output_dir"]): c for c in trains}
    assert retrain["random-asap-s1"]["strategy"] == "random"
    assert retrain["random-asap-s1"]["genotype"] == os.path.join(out, "search-asap-s1",
                                                                  "genotype.json")
    assert retrain["retrain-bonsai-s1"]["seed"] == "1"
    assert retrain["retrain-cnn"]["genotype"] == os.path.join(out, "genotypes", "cnn.json")
    assert "full_pass_steps" in plan and plan["full_pass_steps"] == 64 // 16

    rows = {r["method"]: r for r in state["rows"]}
    assert list(rows) == METHODS
    for method, row in rows.items():
        assert row["n"] == row["runs"] == (1 if method in METHODS[4:] else 2)
        assert 0 < row["accuracy_mean"] < 1 and row["params"] > 0 and row["flops"] > 0
        assert row["memory_mb"] > 0 and row["memory_measured_mb"] == 3.0
        assert row["total_seconds"] >= row["search_seconds"] >= 0
    assert rows["bonsai (found)"]["accuracy_mean"] == pytest.approx(0.905)
    assert rows["bonsai (found)"]["accuracy_std"] == pytest.approx(0.00707, abs=1e-4)
    assert rows["plain CNN"]["accuracy_std"] is None
    verdicts = {v["strategy"]: v["verdict"] for v in state["verdicts"]}
    assert verdicts == {"bonsai": "beats", "asap": "within spread"}
    assert all(r["status"] == "done" for r in state["runs"].values())

    md = open(os.path.join(out, "compare.md")).read()
    for method in METHODS:
        assert f"| {method} |" in md
    assert "**bonsai** **beats**" in md and "**asap** does **not** beat" in md
    assert cmp.RULE in md
    for png in ("accuracy_vs_params.png", "accuracy_vs_seconds.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000


def test_a_plan_of_shorter_epochs_reaches_every_retraining(flagfile, tmp_path, monkeypatch):
    compare = load_compare()
    real = cmp.plan_epochs

    def shorter(*args, **kwargs):   # as plan_epochs makes it where whole passes leave time
        plan = real(*args, **kwargs)
        return {**plan, "epochs": 2, "steps_per_epoch": kwargs["full_pass_steps"] - 1}
    monkeypatch.setattr(compare.cmp, "plan_epochs", shorter)
    out = str(tmp_path / "cmp")
    fake = FakeScripts()
    assert compare.main(compare_argv(flagfile, out), launcher=fake) == 0
    trains = [c for c in fake.calls if c["script"] == "train.py"]
    assert len(trains) == 10
    assert {(c["epochs"], c["steps_per_epoch"]) for c in trains} == {("2", str(64 // 16 - 1))}
    md = open(os.path.join(out, "compare.md")).read()
    assert f"every retraining 2 epochs of {64 // 16 - 1} steps from scratch" in md


def test_rerun_continues_without_redoing_finished_sub_runs(flagfile, tmp_path):
    compare = load_compare()
    out = str(tmp_path / "cmp")
    assert compare.main(compare_argv(flagfile, out), launcher=FakeScripts()) == 0
    plan = rd.read_json(os.path.join(out, "compare.json"))["epochs_plan"]

    again = FakeScripts()
    assert compare.main(compare_argv(flagfile, out), launcher=again) == 0
    assert again.calls == []
    # An unfinished sub-run (no metrics.json) is run again, and only it.
    os.unlink(os.path.join(out, "random-asap-s1", "metrics.json"))
    again = FakeScripts()
    assert compare.main(compare_argv(flagfile, out), launcher=again) == 0
    assert again.names() == ["random-asap-s1"]
    state = rd.read_json(os.path.join(out, "compare.json"))
    assert state["epochs_plan"] == plan  # read back, not planned again
    assert state["runs"]["random-asap-s1"]["invocations"] == 2
    assert state["runs"]["retrain-asap-s1"]["invocations"] == 1


def test_killed_comparison_continues_where_it_stopped(flagfile, tmp_path, capsys):
    compare = load_compare()
    out = str(tmp_path / "cmp")
    killed = FakeScripts(interrupt_at=6)  # while retraining the first found network
    assert compare.main(compare_argv(flagfile, out), launcher=killed) == 130
    assert "run the same command again" in capsys.readouterr().err
    state = rd.read_json(os.path.join(out, "compare.json"))
    assert {n for n, r in state["runs"].items() if r.get("status") == "done"} == set(RUNS[:5])
    plan = state["epochs_plan"]
    assert plan is not None

    rest = FakeScripts()
    assert compare.main(compare_argv(flagfile, out), launcher=rest) == 0
    assert rest.names() == RUNS[5:]
    state = rd.read_json(os.path.join(out, "compare.json"))
    assert state["epochs_plan"] == plan
    assert state["runs"]["retrain-bonsai-s0"]["invocations"] == 2
    assert all(state["runs"][n]["invocations"] == 1 for n in RUNS[:5] + RUNS[6:])


def test_a_failed_sub_run_is_reported_and_the_rest_still_runs(flagfile, tmp_path, capsys):
    compare = load_compare()
    out = str(tmp_path / "cmp")
    fake = FakeScripts(fail={"search-asap-s1": (1, "RuntimeError: boom"),
                             "random-bonsai-s0": (2, "error: cell 0: no random cell ...")})
    assert compare.main(compare_argv(flagfile, out), launcher=fake) == 1
    assert "retrain-asap-s1" not in fake.names() and "random-asap-s1" not in fake.names()
    assert "retrain-cnn" in fake.names()
    state = rd.read_json(os.path.join(out, "compare.json"))
    assert state["runs"]["random-bonsai-s0"]["status"] == "failed"
    assert state["runs"]["retrain-asap-s1"]["status"] == "skipped"
    rows = {r["method"]: r for r in state["rows"]}
    assert rows["asap (found)"]["n"] == 1 and rows["random (matched to bonsai)"]["n"] == 1
    md = open(os.path.join(out, "compare.md")).read()
    assert "no random cell" in md and "boom" in md
    assert "sub-run(s) did not finish" in capsys.readouterr().err


def test_bad_input_is_one_error_line_and_status_2(flagfile, tmp_path, capsys):
    compare = load_compare()
    out = str(tmp_path / "cmp")
    cases = [
        (["--seeds=0"], "--seeds=0; expected"),
        (["--first_seed=-1"], "--first_seed=-1; expected an integer >= 0"),
        (["--strategies=bonsai,random"], "expected distinct names among bonsai,asap"),
        (["--strategy=asap"], "--strategy is set by compare.py"),
        (["--nosuchflag=1"], "unknown flag --nosuchflag"),
        (["--minutes=0"], "--time_budget_minutes=0.0; expected minutes > 0"),
        (["--batch_size=0"], "batch_size = 0; expected >= 1"),
    ]
    for extra, message in cases:
        assert compare.main(compare_argv(flagfile, out, *extra), launcher=FakeScripts()) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not os.path.exists(out)
    # The first sub-run refusing its input (a missing dataset, say) stops everything.
    fake = FakeScripts(fail={"search-bonsai-s0": (2, "error: --dataset=folder:/nowhere ...")})
    assert compare.main(compare_argv(flagfile, out), launcher=fake) == 2
    assert "search-bonsai-s0 refused its input: error: --dataset=folder:/nowhere" in \
        capsys.readouterr().err
    assert fake.names() == ["search-bonsai-s0"]
    # A comparison with other settings is not continued.
    shutil.rmtree(out)
    assert compare.main(compare_argv(flagfile, out), launcher=FakeScripts()) == 0
    capsys.readouterr()
    assert compare.main(compare_argv(flagfile, out, "--seeds=3"), launcher=FakeScripts()) == 2
    assert "other settings (differs in: seeds)" in capsys.readouterr().err
    # Nor is a directory that is not a comparison taken over.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert compare.main(compare_argv(flagfile, str(other)), launcher=FakeScripts()) == 2
    assert "holds no compare.json" in capsys.readouterr().err
    assert os.listdir(other) == ["notes.txt"]


# ---- end to end, with the real entry scripts ----------------------------------------------
@pytest.mark.slow
def test_compare_end_to_end_on_tiny_images_survives_a_kill(tmp_path):
    """The real scripts on generated 12x12 images; compare.py is SIGKILLed right after its
    first sub-run finished and the same command then completes the comparison."""
    data = make_folder(tmp_path / "data", classes=3, per_class=30)
    out = str(tmp_path / "cmp")
    argv = [sys.executable, COMPARE, f"--dataset=folder:{data}", "--space=small", "--scale=4",
            "--nodes=1", '--patterns=[["n"],["r"]]', "--max_patterns=2", "--batch_size=16",
            "--val_size=20", "--memory_budget_mb=0", "--strategies=bonsai", "--seeds=1",
            "--minutes=1.5", "--epochs=1", "--trial_epochs=1", "--latency_runs=5",
            "--nomeasure_memory", f"--output_dir={out}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    killed = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=900,
                            env=dict(env, **{rd.FAULT_ENV: "compare:search-bonsai-s0"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = rd.read_json(os.path.join(out, "compare.json"))
    assert state["runs"]["search-bonsai-s0"]["status"] == "done"
    assert "tuner" not in state["runs"]
    finished_at = os.path.getmtime(os.path.join(out, "search-bonsai-s0", "metrics.json"))

    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.getmtime(os.path.join(out, "search-bonsai-s0", "metrics.json")) == finished_at
    state = rd.read_json(os.path.join(out, "compare.json"))
    assert state["runs"]["search-bonsai-s0"]["invocations"] == 1
    assert all(r["status"] == "done" and r["invocations"] == 1 for r in state["runs"].values())
    rows = {r["method"]: r for r in state["rows"]}
    assert list(rows) == ["bonsai (found)", "random (matched to bonsai)", "keras-tuner best",
                          "plain CNN"]
    for row in rows.values():
        assert row["n"] == 1 and 0 <= row["accuracy_mean"] <= 1
        assert row["params"] > 0 and row["flops"] > 0 and row["memory_mb"] > 0
        assert row["int8_latency_ms"] > 0 and row["total_seconds"] > 0
        assert row["epochs"] == 1
    assert state["verdicts"][0]["verdict"] == "undetermined"  # one seed
    md = open(os.path.join(out, "compare.md")).read()
    for method in rows:
        assert f"| {method} |" in md
    tuner = rd.read_json(os.path.join(out, "tuner", "metrics.json"))
    assert tuner["completed_trials"] >= 1
    G.Genotype.load(os.path.join(out, "tuner", "genotype.json"))


def test_a_methods_own_settings_reach_its_searches_only_and_yield_to_passed_flags(flagfile,
                                                                                  tmp_path):
    compare = load_compare()
    out = str(tmp_path / "cmp")
    fake = FakeScripts()
    argv = ["compare.py", f"--flagfile={flagfile}", "--strategies=bonsai,spider", "--seeds=1",
            "--minutes=30", f"--output_dir={out}", "--final_subset=64", "--round_epochs=3"]
    assert compare.main(argv, launcher=fake) == 0
    calls = {os.path.basename(c["output_dir"]): c for c in fake.calls}
    spider = calls["search-spider-s0"]
    # absl takes the last value: the method's scale and aux weight, the passed rounds.
    assert spider["scale"] == "8" and spider["aux_weight"] == "0.4"
    assert spider["round_epochs"] == "3"
    assert spider["args"].index("--scale=8") < spider["args"].index("--round_epochs=3")
    for name in ("search-bonsai-s0", "retrain-spider-s0", "random-spider-s0"):
        assert "--scale=8" not in calls[name]["args"], name


def test_first_seed_draws_new_seeds_for_every_run_and_row(flagfile, tmp_path):
    compare = load_compare()
    out = str(tmp_path / "cmp")
    fake = FakeScripts()
    assert compare.main(compare_argv(flagfile, out, "--seeds=2", "--first_seed=3",
                                     "--strategies=bonsai"), launcher=fake) == 0
    calls = {os.path.basename(c["output_dir"]): c for c in fake.calls}
    assert sorted(calls) == ["random-bonsai-s3", "random-bonsai-s4", "retrain-bonsai-s3",
                             "retrain-bonsai-s4", "retrain-cnn", "retrain-tuner",
                             "search-bonsai-s3", "search-bonsai-s4", "tuner"]
    for name, c in calls.items():
        want = name[-1] if name[-1] in "34" else "3"   # tuner and CNN: the first seed
        assert c["seed"] == want, name
    state = rd.read_json(os.path.join(out, "compare.json"))
    assert state["settings"]["first_seed"] == 3
    found = [r for r in state["per_run"] if r["method"] == "bonsai (found)"]
    assert [r["seed"] for r in found] == [3, 4]
    # Without the flag the settings are those a comparison had before it existed.
    out0 = str(tmp_path / "cmp0")
    assert compare.main(compare_argv(flagfile, out0, "--seeds=1", "--strategies=bonsai"),
                        launcher=FakeScripts()) == 0
    assert "first_seed" not in rd.read_json(os.path.join(out0, "compare.json"))["settings"]


def test_final_with_val_retrainings_are_planned_over_the_validation_examples_too(flagfile,
                                                                               tmp_path):
    compare = load_compare()
    out = str(tmp_path / "cmp")
    fake = FakeScripts()
    assert compare.main(compare_argv(flagfile, out, "--seeds=1", "--strategies=bonsai",
                                     "--final_with_val"), launcher=fake) == 0
    state = rd.read_json(os.path.join(out, "compare.json"))
    assert state["settings"]["final_with_val"] is True
    # --final_subset=64 training examples and the tuner's 20 validation ones, batch 16.
    assert state["epochs_plan"]["full_pass_steps"] == (64 + 20) // 16
    assert all("--final_with_val" in c["args"] for c in fake.calls
               if c["script"] == "train.py")
    # Without it the settings are those a comparison had before the flag existed.
    out0 = str(tmp_path / "cmp0")
    assert compare.main(compare_argv(flagfile, out0, "--seeds=1", "--strategies=bonsai"),
                        launcher=FakeScripts()) == 0
    saved = rd.read_json(os.path.join(out0, "compare.json"))
    assert "final_with_val" not in saved["settings"]
    assert saved["epochs_plan"]["full_pass_steps"] == 64 // 16
