"""The wall-clock budget planner (bonsai_tf/budget.py) and runs that keep it (issue 14)."""

import json
import time

import pytest

from bonsai_tf import budget
from bonsai_tf import config as config_lib
from bonsai_tf import engine
from bonsai_tf import run_dir as rd


def planned(phase="final", seconds=900.0, step=0.15, full_pass=843, budget_seconds=1200.0):
    plan = budget.new_plan(budget_seconds, 0.3, startup_seconds=5.0)
    plan.plan_phase(phase, 0, seconds, step, full_pass)
    return plan


def test_a_phase_is_cut_into_epochs_that_fit_its_seconds():
    plan = planned(seconds=900.0, step=0.15, full_pass=843)
    p = plan.phases["final"]
    assert p.steps_per_epoch == 843 and p.epochs == 7           # 6000 steps, 7 full passes
    assert p.steps() * p.step_seconds <= 900.0
    # Too little time for the minimum epochs of full passes: shorter epochs instead.
    short = planned(seconds=60.0, step=0.15, full_pass=843).phases["final"]
    assert short.epochs >= budget.MIN_EPOCHS["final"]
    assert short.steps_per_epoch < 843 and short.steps() * 0.15 <= 60.0


def test_behind_shortens_the_phase_at_once():
    # The quick run that lost its last epoch: planned 6 epochs of 843 steps at the
    # probe's 0.147 s a step, the epochs then took ~142 s.
    plan = planned(seconds=759.0, step=0.147, full_pass=843)
    p = plan.phases["final"]
    assert p.epochs == 6
    plan.epoch_done("final", 143.0, 843, 0.166, 2.0)
    assert plan.replan("final", 1, 759.0 - 143.0)              # 616 s: 4 more, not 5
    assert p.epochs == 5 and plan.log[-1]["was"] == 6 and "behind" in plan.log[-1]["why"]
    # The schedule follows: the last step of the shorter plan is the end of the run.
    assert plan.progress("final", 4, p.steps_per_epoch) == pytest.approx(1.0)
    assert plan.progress("final", 1, 0) < plan.progress("final", 2, 0) < 1.0


def test_ahead_lengthens_only_past_the_noise():
    plan = planned(seconds=900.0, step=0.15, full_pass=843)
    p = plan.phases["final"]
    plan.epoch_done("final", 0.15 * 843, 843, 0.15, 0.15)
    each = p.epoch_seconds()
    # One epoch to spare is within the noise band: no change.
    assert not plan.replan("final", 1, (p.epochs - 1 + 1) * each + 1.0)
    assert p.epochs == 7
    # Three to spare: lengthened to the 1 done and the 9 that fit, and said why.
    assert plan.replan("final", 1, (p.epochs - 1 + 3) * each + 1.0)
    assert p.epochs == 10 and "ahead" in plan.log[-1]["why"]


def test_a_replanned_schedule_never_moves_back_and_still_ends_at_the_last_step():
    # The quick default's final phase (run a0): 33 epochs re-planned to 35 after 21 done,
    # then to 34 and to 33 after the next two.
    plan = planned(seconds=900.0, step=0.03, full_pass=843)
    p = plan.phases["final"]
    p.epochs = 33
    seen = [plan.progress("final", e, s) for e in range(21) for s in (0, 421)]
    for done, wanted in ((21, 35), (22, 34), (23, 33)):
        before = plan.progress("final", done, 0)
        each = 30.0
        plan.epoch_done("final", each, 843, each / 843, each / 843)
        assert plan.replan("final", done, (wanted - done) * p.epoch_seconds() + 1.0)
        assert p.epochs == wanted
        assert plan.progress("final", done, 0) == pytest.approx(before)   # no jump back
        seen += [plan.progress("final", done, s) for s in (0, 421)]
    seen += [plan.progress("final", e, s) for e in range(24, 33) for s in (0, 421)]
    assert all(b >= a for a, b in zip(seen, seen[1:]))                  # monotone throughout
    assert plan.progress("final", 33, 0) == pytest.approx(1.0)          # ends at the end
    # Shortened to what is already done: the phase is over, its schedule at its end.
    plan.epoch_done("final", 600.0, 843, 0.7, 0.7)
    assert plan.replan("final", 30, 1.0) and p.epochs == 30
    assert plan.progress("final", 30, 0) == pytest.approx(1.0)
    # The position survives JSON (a resumed run keeps it), and a plan written before
    # the anchor existed reads back as one never re-planned.
    again = budget.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.progress("final", 29, 0) == plan.progress("final", 29, 0)
    old = planned().to_dict()
    for key in ("anchor_within", "anchor_step"):
        del old["phases"]["final"][key]
    assert budget.Plan.from_dict(old).progress("final", 3, 0) == pytest.approx(0.3 + 0.7 * 3 / 7)


def test_a_final_network_is_trained_at_least_once_and_a_finished_phase_is_left_alone():
    plan = planned(seconds=30.0, step=1.0, full_pass=100)
    p = plan.phases["final"]
    plan.epoch_done("final", 40.0, 10, 1.0, 1.0)
    assert not plan.replan("final", p.epochs, 0.0)             # nothing remains: as it was
    fresh = planned(seconds=30.0, step=1.0, full_pass=100)
    fresh.phases["final"].overhead = [100.0]
    assert fresh.replan("final", 0, 5.0) and fresh.phases["final"].epochs == 1


def test_the_first_epochs_trace_counts_only_until_there_are_others():
    plan = planned(seconds=900.0, step=0.1, full_pass=100)
    p = plan.phases["final"]
    plan.epoch_done("final", 10.0 + 9.9 + 5.0, 100, 0.1, 10.0)   # traced: 10 s first step
    assert p.overhead == [pytest.approx(5.0)]
    assert p.epoch_seconds() == pytest.approx(100 * 0.1 + 5.0)
    plan.epoch_done("final", 0.1 + 9.9 + 1.0, 100, 0.1, 0.1)
    assert p.epoch_seconds() == pytest.approx(100 * 0.1 + 1.0)   # the trace no longer


def test_search_and_final_share_one_schedule():
    plan = budget.new_plan(600.0, 0.25, startup_seconds=10.0)
    plan.plan_phase("search", 0, 100.0, 0.1, 100)
    s = plan.phases["search"]
    assert plan.progress("search", 0, 0) == 0.0
    assert plan.progress("search", s.epochs, 0) == pytest.approx(0.25)
    plan.plan_phase("final", s.epochs, 300.0, 0.1, 100)
    assert plan.progress("final", 0, 0) == pytest.approx(0.25)
    assert plan.progress("final", plan.phases["final"].epochs, 0) == pytest.approx(1.0)
    assert plan.phase_seconds("search", 0) == pytest.approx(0.25 * plan.training_seconds())


def test_the_finish_reserve_grows_with_a_slow_evaluation():
    plan = budget.new_plan(1200.0, 0.3, startup_seconds=5.0)
    before = plan.reserve_seconds
    assert not plan.reserve_for_finish(3, 1e-6, 10000, 6000)     # fast: the default reserve
    assert plan.reserve_for_finish(3, 3.4e-3, 10000, 6000)       # 3.4 ms an image
    assert plan.reserve_seconds > before and "3.40 ms" in plan.log[-1]["why"]


def test_a_run_without_export_keeps_only_the_test_evaluations_time():
    # 1.5 ms an image, 10,000 test and 6,000 validation images (what a compare.py search
    # run measured): with the export 40 + 1.5e-3 * (6 x 10,000 + 3 x 6,000) = 157 s; without
    # it the test pass and the report, 15 + 15 = 30 s, on a smaller floor to begin with.
    with_export = budget.new_plan(233.0, 0.75, startup_seconds=10.0)
    without = budget.new_plan(233.0, 0.75, startup_seconds=10.0, exports=False)
    assert without.reserve_seconds == budget.NO_EXPORT_RESERVE_MIN_SECONDS < \
        with_export.reserve_seconds == budget.RESERVE_MIN_SECONDS
    for plan in (with_export, without):
        assert plan.reserve_for_finish(2, 1.5e-3, 10000, 6000)
    assert with_export.reserve_seconds == pytest.approx(157.0)
    assert without.reserve_seconds == pytest.approx(30.0)
    assert "test evaluation needs" in without.log[-1]["why"]
    assert "and export" in with_export.log[-1]["why"]
    # A plan written before the field existed reads back as one that exports.
    old = without.to_dict()
    del old["exports"]
    assert budget.Plan.from_dict(old).exports is True


def test_a_plan_survives_json():
    plan = planned()
    plan.epoch_done("final", 130.0, 843, 0.15, 1.0)
    plan.reserve_for_finish(1, 1e-3, 10000, 6000)
    again = budget.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


# ---- runs that keep a budget -----------------------------------------------------------

TINY = dict(scale=4, nodes=1, patterns=(("n",), ("r",)), batch_size=32, space="small",
            prune_interval=1, cycle_len=1, lr_max=0.05, drop_path=0.0, val_size=0, seed=3,
            measure_memory=False, max_patterns=1, search_fraction=0.4)


@pytest.fixture
def small_reserve(monkeypatch):
    # A generated-data run finishes in a second: the reserve for a real finish (test
    # evaluation, exports) would leave such small budgets no training time at all.
    monkeypatch.setattr(budget, "RESERVE_MIN_SECONDS", 2.0)
    monkeypatch.setattr(budget, "FINISH_BASE_SECONDS", 1.0)


def budgeted(tiny_splits, run_dir, minutes):
    cfg = config_lib.RunConfig(**TINY, time_budget_minutes=minutes)
    return engine.Run(cfg, tiny_splits, str(run_dir), verbose=0)


# What a run may overrun its budget by: the epoch in flight when time runs out is
# finished, and a plan made from a few timed steps can be off by one epoch; a tiny
# run's epochs are well under a second, its retraces a few seconds on a slow machine.
TOLERANCE_SECONDS = 8.0


@pytest.mark.slow
def test_a_smaller_budget_plans_fewer_epochs_and_both_end_within_their_budgets(
        tiny_splits, tmp_path, small_reserve):
    epochs, took = {}, {}
    for minutes in (0.25, 0.75):
        started = time.time()
        metrics = budgeted(tiny_splits, tmp_path / str(minutes), minutes).run()
        took[minutes] = time.time() - started
        assert took[minutes] <= 60 * minutes + TOLERANCE_SECONDS, (minutes, took[minutes])
        assert metrics["time_budget_seconds"] == 60 * minutes
        epochs[minutes] = metrics["epochs"]
        plan = json.loads((tmp_path / str(minutes) / "plan.json").read_text())
        assert set(plan["phases"]) == {"search", "final"} and plan["log"]
    assert epochs[0.25] < epochs[0.75]
    # The larger budget was used, not ended early: most of it went into training.
    assert took[0.75] > 0.6 * 45


class Killed(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_run_keeps_its_plan(tiny_splits, tmp_path, small_reserve, monkeypatch):
    run_dir = tmp_path / "run"
    first = budgeted(tiny_splits, run_dir, 0.4)

    def die_in_the_second_final_epoch(name):
        # Both phases have been planned by then.
        st = first.state
        if name.startswith("mid_epoch:") and st.phase == "final" and st.phase_epochs == 1:
            raise Killed(name)
    monkeypatch.setattr(rd, "fault_point", die_in_the_second_final_epoch)
    with pytest.raises(Killed):
        first.run()
    before = json.loads((run_dir / "plan.json").read_text())
    monkeypatch.setattr(rd, "fault_point", lambda name: None)   # the resumed run lives

    again = budgeted(tiny_splits, run_dir, 0.4)
    metrics = again.run()
    after = json.loads((run_dir / "plan.json").read_text())
    # The same plan, carried on: its start, its phases as planned, its log continued.
    for key in ("budget_seconds", "search_fraction", "startup_seconds"):
        assert after[key] == before[key]
    assert after["log"][:len(before["log"])] == before["log"]
    for phase in ("search", "final"):
        for key in ("steps_per_epoch", "start_epoch"):
            assert after["phases"][phase][key] == before["phases"][phase][key]
    assert after["phases"]["search"]["epochs"] == before["phases"]["search"]["epochs"]
    # The budget counts both processes.
    assert metrics["wall_seconds"] <= 60 * 0.4 + 2 * TOLERANCE_SECONDS


# ---- a final network that is only timed (final_probe_steps, bench/compare.py's searches) ----

def test_a_fixed_phase_is_one_epoch_that_replanning_leaves_alone():
    plan = budget.new_plan(1200.0, 0.3, startup_seconds=5.0)
    p = plan.fix_phase("final", 7, 100, 0.05, "timed only")
    assert (p.epochs, p.steps_per_epoch, p.start_epoch) == (1, 100, 7)
    plan.epoch_done("final", 9.0, 100, 0.05, 1.0)
    # However much or little time is left, it stays one epoch.
    assert not plan.replan("final", 0, 1000.0) and not plan.replan("final", 0, 0.5)
    assert plan.phases["final"].epochs == 1
    again = budget.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.phases["final"].fixed


@pytest.mark.parametrize("minutes", [0.0, 0.3])
def test_a_probed_final_network_is_timed_over_its_steps_and_the_run_ends(
        tiny_splits, tmp_path, small_reserve, minutes):
    from bonsai_tf import comparison
    extra = dict(epochs=8, search_epochs=2) if not minutes else {}
    cfg = config_lib.RunConfig(**{**TINY, "max_patterns": 2, "final_probe_steps": 2},
                               time_budget_minutes=minutes, **extra)
    metrics = engine.Run(cfg, tiny_splits, str(tmp_path), verbose=0).run()
    records = rd.read_metrics(str(tmp_path / "metrics.jsonl"))
    final = [r for r in records if r["phase"] == "final"]
    # The epoch that ended the search (its record already reads "final"), then the probe.
    assert any(str(e).startswith("final network") and "only timed over 2 steps" in e
               for e in final[0]["events"])
    assert len(final) == 2 and final[1]["steps"] == 2
    assert metrics["final_probe_steps"] == 2 and metrics["epochs"] == len(records)
    # What bench/compare.py plans its retrainings from.
    speed = comparison.final_phase_speed(records)
    assert speed is not None and speed["epochs"] == 1 and speed["step_seconds"] > 0
    if minutes:
        plan = json.loads((tmp_path / "plan.json").read_text())
        assert plan["phases"]["final"]["epochs"] == 1 and plan["phases"]["final"]["fixed"]
        # The budget was not spent training a network nobody uses.
        assert metrics["wall_seconds"] < 0.8 * 60 * minutes
    from bonsai_tf import report as report_lib
    report_lib.write_report(str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    assert "2 timing steps" in report and "not a trained final network" in report


def test_a_probe_needs_a_search():
    with pytest.raises(config_lib.ConfigError, match="final_probe_steps = 5; expected 0 with "
                                                      "strategy=fixed"):
        config_lib.RunConfig(strategy="fixed", genotype="g.json", final_probe_steps=5)
