"""Planning a run to end within a wall-clock budget on the machine at hand.

Machines of the same kind differ by 4x or more in speed, so a run given
`time_budget_minutes` does not count epochs: it measures its own step times and
plans. The budget covers the whole command (start-up, training, the final test
evaluation, export and report). Of the time left for training once start-up is
over and a reserve for the finish is set aside, the search gets `search_fraction`
and the final network the rest.

A phase (search or final) is planned after its first few steps have been timed:
  steps available = phase seconds / measured seconds per step
  steps per epoch = a full pass, or less so that the phase has `min_epochs` epochs
  epochs          = steps available // steps per epoch
and re-planned after each of its epochs from the time that epoch really took, so
that a run that falls behind (a shared machine, a larger network after growth)
shortens its phase, and one that gains (pruned operations) lengthens it.

Learning rates follow the plan: `progress` maps every step to [0, 1] of the run,
the search covering [0, search_fraction) and the final phase the rest, and the
cosine schedules are functions of progress. A re-planned phase keeps the progress it
has reached and spreads the rest over its new step count, so the learning rate never
rises again. Everything here is plain data (JSON
in the checkpoint and in plan.json), so a resumed run keeps its plan.
"""

import dataclasses

# A phase is cut into at least this many epochs (shorter than a pass over the data
# where need be): the search makes its decisions between epochs and needs several,
# and a supernet that grows gets slower, so its plan (made on the first, smallest
# network) shrinks as it goes.
MIN_EPOCHS = {"search": 6, "final": 4}
PROBE_STEPS = 6            # steps timed (after the first, traced one) before planning
RESERVE_FRACTION = 0.06    # of the budget, kept for the test evaluation, export, report
RESERVE_MIN_SECONDS = 45.0
# The finish, once its speed is known: a fixed part (saving, SavedModel, two TFLite
# conversions, the report) and passes over the data (test evaluation; the export
# evaluates Keras, SavedModel and two TFLite models on the test split and two int8
# candidates on the validation split), priced at the validation pass's speed.
FINISH_BASE_SECONDS = 40.0
FINISH_TEST_PASSES = 6
FINISH_VAL_PASSES = 3
# Without an export (compare.py's searches: --noexport) the finish is the test evaluation,
# the saved model and the report: a search run of compare.py's measured 27 s for it,
# against the 159 s priced with an export, and ended 97 s of its 233 s early.
NO_EXPORT_RESERVE_MIN_SECONDS = 20.0
NO_EXPORT_FINISH_BASE_SECONDS = 15.0


@dataclasses.dataclass
class PhasePlan:
    epochs: int
    steps_per_epoch: int
    step_seconds: float     # measured, median of a step after the first
    seconds: float          # allotted when planned
    start_epoch: int        # the run's epoch index at which the phase began
    overhead: list = dataclasses.field(default_factory=list)  # per epoch: seconds not in steps
    # Where the schedule stood at the last replan: its position in [0, 1] within the phase
    # and the phase's step count then. The steps after it cover the rest of the way.
    anchor_within: float = 0.0
    anchor_step: int = 0
    fixed: bool = False     # planned by fix_phase: not fitted to the time left

    def steps(self):
        return self.epochs * self.steps_per_epoch

    def epoch_seconds(self):
        """What an epoch of this phase is expected to take from now on.

        Steps at the measured rate, plus the mean time an epoch spends outside its
        steps (validation, checkpoint, the retracing after a structural change). The
        phase's first epoch also traced the step for the first time: it counts only
        while it is the only one.
        """
        extra = self.overhead[1:] or self.overhead[:1] or [0.0]
        return self.steps_per_epoch * self.step_seconds + sum(extra) / len(extra)
@dataclasses.dataclass
class Plan:
    budget_seconds: float
    search_fraction: float
    reserve_seconds: float
    startup_seconds: float
    exports: bool = True      # whether the finish includes the export (priced by its passes)
    phases: dict = dataclasses.field(default_factory=dict)   # phase -> PhasePlan
    log: list = dataclasses.field(default_factory=list)      # what was decided, when, why

    # ---- time ----------------------------------------------------------------------
    def training_seconds(self):
        return max(0.0, self.budget_seconds - self.startup_seconds - self.reserve_seconds)

    def phase_seconds(self, phase, elapsed):
        """Seconds the phase may use; `elapsed` is the whole run's so far."""
        if phase == "search":
            return self.search_fraction * self.training_seconds()
        # The final phase gets whatever is left before the reserve.
        return max(0.0, self.budget_seconds - self.reserve_seconds - elapsed)

    # ---- planning --------------------------------------------------------------------
    def plan_phase(self, phase, epoch, seconds, step_seconds, full_pass_steps):
        """Plans `phase`, starting at run epoch `epoch`, into `seconds`."""
        step_seconds = max(step_seconds, 1e-6)
        available = max(1, int(seconds / step_seconds))
        per_epoch = max(1, min(full_pass_steps, available // MIN_EPOCHS[phase]))
        epochs = max(1, available // per_epoch)
        self.phases[phase] = PhasePlan(epochs, per_epoch, step_seconds, seconds, epoch)
        self.log.append({"epoch": epoch, "phase": phase, "epochs": epochs,
                         "steps_per_epoch": per_epoch, "step_seconds": round(step_seconds, 4),
                         "seconds": round(seconds, 1),
                         "why": f"{seconds:.0f} s for the {phase} at {step_seconds:.3f} s/step "
                                f"measured: {available} steps"})
        return self.phases[phase]

    def fix_phase(self, phase, epoch, steps, step_seconds, why):
        """Plans `phase` as one epoch of `steps` steps, whatever the time left: a final
        network that is only timed (RunConfig.final_probe_steps). `replan` leaves it."""
        steps = max(1, int(steps))
        self.phases[phase] = PhasePlan(1, steps, max(step_seconds, 1e-6),
                                       steps * step_seconds, epoch, fixed=True)
        self.log.append({"epoch": epoch, "phase": phase, "epochs": 1, "steps_per_epoch": steps,
                         "step_seconds": round(step_seconds, 4), "why": why})
        return self.phases[phase]

    def epoch_done(self, phase, epoch_seconds, steps, step_seconds, first_step_seconds):
        """Notes what an epoch of `phase` took: its steps' rate and the rest."""
        p = self.phases[phase]
        if steps > 1:
            p.step_seconds = step_seconds
        outside = epoch_seconds - first_step_seconds - max(0, steps - 1) * p.step_seconds
        if p.overhead:
            outside += first_step_seconds - p.step_seconds  # a retrace after a rebuild
        p.overhead.append(max(0.0, outside))

    def replan(self, phase, epochs_done, seconds_left):
        """After an epoch of `phase`: fit the remaining epochs into `seconds_left`.

        Behind (the remaining epochs no longer fit), it shortens the phase at once: the
        learning-rate schedule then still reaches its end. Waiting for the last epoch to
        notice cut a quick run's final training from 6 epochs to 5 with the cosine at
        1/6 of its way from the end (its probe had timed 0.147 s a step, the epochs ran
        at 0.166). Ahead, it lengthens only by more than an epoch and a tenth of what
        remains, so timing noise does not stretch the schedule back and forth.
        """
        p = self.phases[phase]
        if p.fixed:
            return False
        each = p.epoch_seconds()
        fit = max(0, int(seconds_left / max(each, 1e-6)))
        remaining = p.epochs - epochs_done
        if remaining <= 0 or remaining <= fit <= remaining + max(1, 0.1 * remaining):
            return False
        wanted = epochs_done + fit
        if phase == "final" and wanted == epochs_done and epochs_done == 0:
            wanted = 1  # a final network is trained at least once
        if wanted == p.epochs:
            return False
        why = (f"{'behind' if wanted < p.epochs else 'ahead'}: an epoch takes {each:.1f} s, "
               f"{seconds_left:.0f} s left")
        self.log.append({"epoch": p.start_epoch + epochs_done, "phase": phase,
                         "epochs": wanted, "was": p.epochs, "why": why})
        # The schedule keeps the position it has reached and spreads the rest of its way
        # over the steps now planned. Recomputing the position from the new epoch count
        # moved it back whenever a phase was lengthened, raising the learning rate: the
        # quick default's final phase re-planned 33 -> 35 -> 34 -> 33 epochs after 21, 22
        # and 23 of them (run a0), so its learning rate rose in the second half of its
        # schedule, where it should only fall.
        p.anchor_within = self._within(p, epochs_done, 0)
        p.anchor_step = epochs_done * p.steps_per_epoch
        p.epochs = wanted
        return True

    @staticmethod
    def _within(p, epochs_done, step):
        """Position in [0, 1] of the schedule within phase plan `p`: it never moves back."""
        done = epochs_done * p.steps_per_epoch + step
        left = p.steps() - p.anchor_step
        if left <= 0:
            return 1.0
        within = p.anchor_within + (1.0 - p.anchor_within) * (done - p.anchor_step) / left
        return min(1.0, max(p.anchor_within, within))

    def progress(self, phase, epochs_done, step):
        """Position in [0, 1] of the run's learning-rate schedules at this step."""
        p = self.phases.get(phase)
        within = self._within(p, epochs_done, step) if p is not None and p.steps() else 0.0
        f = self.search_fraction
        return f * within if phase == "search" else f + (1.0 - f) * within

    def reserve_for_finish(self, epoch, seconds_per_example, n_test, n_val):
        """Raises the reserve to what the finish is expected to take at the measured speed."""
        if self.exports:
            need = FINISH_BASE_SECONDS + seconds_per_example * (
                FINISH_TEST_PASSES * n_test + FINISH_VAL_PASSES * n_val)
        else:
            need = NO_EXPORT_FINISH_BASE_SECONDS + seconds_per_example * n_test
        if need <= self.reserve_seconds:
            return False
        self.log.append({"epoch": epoch, "phase": "finish", "reserve_seconds": round(need, 1),
                         "was": round(self.reserve_seconds, 1),
                         "why": f"evaluation runs at {1000 * seconds_per_example:.2f} ms an "
                                f"image: the test evaluation{' and export' if self.exports else ''} "
                                f"need{'' if self.exports else 's'} about {need:.0f} s"})
        self.reserve_seconds = need
        return True

    # ---- JSON ----------------------------------------------------------------------
    def to_dict(self):
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["phases"] = {k: PhasePlan(**v) for k, v in d.get("phases", {}).items()}
        d["log"] = list(d.get("log", []))
        return cls(**d)


def new_plan(budget_seconds, search_fraction, startup_seconds, searches=True, exports=True):
    """exports: whether the run exports after its test evaluation (its finish is longer)."""
    floor = RESERVE_MIN_SECONDS if exports else NO_EXPORT_RESERVE_MIN_SECONDS
    reserve = max(floor, RESERVE_FRACTION * budget_seconds)
    return Plan(budget_seconds=float(budget_seconds),
                search_fraction=float(search_fraction if searches else 0.0),
                reserve_seconds=float(reserve), startup_seconds=float(startup_seconds),
                exports=bool(exports))
