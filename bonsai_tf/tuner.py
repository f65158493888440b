"""A KerasTuner multi-trial search over the operation space (the baseline of bench/compare.py).

`GenotypeHyperModel` is a `keras_tuner.HyperModel` whose hyperparameters are the
choices a one-shot search makes, so that both search the same space:

  patterns                  how many patterns of the configuration's layout, 1..cap
  cell{c}.{src}-{dst}.{op}  whether operation `op` of the space sits on that edge of
                            cell c (no operation at all on an edge is allowed)
  cell{c}.input{j}          whether earlier output j (0 = stem) feeds the cell's y input
  cell{c}.fallback          the operation put on edge x -> last node when the choices
                            above leave no path from an input to the cell's output

Every cell of the largest network has its hyperparameters declared on every build,
so the space is the same whatever `patterns` is, and the last one keeps every drawn
network valid. `build(hp)` turns the values into a canonical, validated
`genotype.Genotype` and returns a compiled Keras model of
`network.Network(genotype, with_pruners=False, aux_heads=False)`.

KerasTuner has no wall-clock limit; `BudgetOracle` (a RandomSearchOracle) stops
proposing trials when the budget is spent and redraws proposals whose training
memory exceeds the memory budget the searches run under, and `BudgetTuner`
stops a trial's training at the budget. Time counts over every process that
worked on the same directory (clock.json), so a killed tuner resumes (KerasTuner
reloads its own project) with the time it had left.
"""

import dataclasses
import json
import logging
import os
import shutil
import time

import keras
import keras_tuner as kt
import numpy as np

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import memory as memory_lib
from bonsai_tf import run_dir as rd
from bonsai_tf import space as space_lib

log = logging.getLogger("bonsai_tf")

OBJECTIVE = "val_accuracy"
PROJECT = "keras_tuner"          # KerasTuner's own project directory inside the run directory
CLOCK_FILE = "clock.json"
CONFIG_FILE = "tune_config.json"
METRICS_FILE = "metrics.json"    # written last: marks a finished tuner run
TRIALS_FILE = "trials.jsonl"
FALLBACK_OP_PREFERENCE = ("conv_3x3", "sep_conv_3x3", "dil_conv_3x3")
MAX_DRAWS = 200                  # proposals redrawn per trial before giving up on the budget
FINISH_RESERVE_SECONDS = 2.0     # writing the result after the last trial


class TunerError(ValueError):
    """The tuner cannot run as asked (no validation data, no trial finished, ...)."""


# ---- the hypermodel -----------------------------------------------------------------
class GenotypeHyperModel(kt.HyperModel):
    """Hyperparameters -> bonsai_tf genotype -> compiled Keras model.

    Args:
      space, input_shape, num_classes, scale, nodes, patterns, stem_stride: the
        genotype layout, as a search of the same configuration uses it.
      max_patterns: the largest number of patterns a network may have (>= 1).
      mean, std: per-channel input statistics (the model normalises raw pixels).
      lr_max, lr_min, momentum, weight_decay: SGD with a cosine schedule over
        `decay_steps` steps (a trial's whole training).
      batch_size: for the memory estimate (`memory_mb` of a genotype).
    """

    def __init__(self, space, input_shape, num_classes, scale, nodes, patterns, max_patterns,
                 stem_stride=1, mean=(0.0,), std=(1.0,), lr_max=0.05, lr_min=0.0, momentum=0.9,
                 weight_decay=3e-4, decay_steps=1000, batch_size=64):
        super().__init__(name="bonsai_genotype")
        if max_patterns < 1:
            raise TunerError(f"max_patterns = {max_patterns}; expected >= 1")
        self.ops = space_lib.space_ops(space)
        self.space, self.input_shape, self.num_classes = space, tuple(input_shape), num_classes
        self.scale, self.nodes, self.stem_stride = scale, nodes, stem_stride
        self.patterns = genotype_lib.parse_patterns(patterns)
        self.max_patterns = max_patterns
        self.mean, self.std = tuple(mean), tuple(std)
        self.lr_max, self.lr_min, self.momentum = lr_max, lr_min, momentum
        self.weight_decay, self.decay_steps, self.batch_size = weight_decay, decay_steps, batch_size
        # A full convolution where the space has one: the plainest path there is.
        self.fallback_ops = [o for o in FALLBACK_OP_PREFERENCE if o in self.ops] or list(self.ops)

    def genotype(self, hp):
        """The canonical, validated genotype that the values of `hp` describe."""
        n = hp.Int("patterns", 1, self.max_patterns)
        cells, channels, c = [], self.scale, 0
        for p in range(self.max_patterns):
            for code in genotype_lib.pattern_codes(self.patterns, p):
                kind = "reduction" if code[0] == "r" else "normal"
                if kind == "reduction":
                    channels *= 2
                cell = self._cell(hp, c, kind, channels, aux=code.endswith("a"))
                if p < n:
                    cells.append(cell)
                c += 1
        g = genotype_lib.Genotype(space=self.space, input_shape=self.input_shape,
                                  num_classes=self.num_classes, scale=self.scale, nodes=self.nodes,
                                  patterns=self.patterns, cells=tuple(cells),
                                  stem_stride=self.stem_stride)
        return g.canonical().validate()

    def _cell(self, hp, c, kind, channels, aux):
        # Every hyperparameter is declared before any is used, so every build
        # declares the same space whatever the values are.
        inputs = tuple((j, 1.0) for j in range(c + 1) if hp.Boolean(f"cell{c}.input{j}"))
        edges = []
        for src, dst in genotype_lib.edge_keys(self.nodes):
            ops = tuple((o, 1.0) for o in self.ops if hp.Boolean(f"cell{c}.{src}-{dst}.{o}"))
            edges.append(genotype_lib.Edge(src, dst, ops))
        fallback = hp.Choice(f"cell{c}.fallback", self.fallback_ops)
        cell = genotype_lib.Cell(kind=kind, channels=channels, nodes=self.nodes, aux=aux,
                                 inputs=inputs, edges=tuple(edges))
        if not _reaches_output(cell):
            last = (self.nodes - 1)
            edges = [dataclasses.replace(e, ops=e.ops + ((fallback, 1.0),))
                     if (e.src, e.dst) == ("x", last) and fallback not in e.op_names() else e
                     for e in edges]
            cell = dataclasses.replace(cell, edges=tuple(edges))
        return cell

    def memory_mb(self, hp):
        return memory_lib.estimate(self.genotype(hp), self.batch_size)["mb"]

    def build(self, hp):
        from bonsai_tf import network as network_lib
        g = self.genotype(hp)
        net = network_lib.Network(g, self.mean, self.std, with_pruners=False, aux_heads=False)
        inputs = keras.Input(self.input_shape, name="image")
        outputs = net.model(inputs)
        # Network's model returns a list of logits (final head first): keep the final one.
        logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        model = keras.Model(inputs, logits, name="trial")
        alpha = self.lr_min / self.lr_max if self.lr_max else 0.0
        lr = keras.optimizers.schedules.CosineDecay(self.lr_max, max(1, self.decay_steps), alpha)
        model.compile(optimizer=keras.optimizers.SGD(lr, momentum=self.momentum,
                                                     weight_decay=self.weight_decay or None),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        return model


def _reaches_output(cell):
    # Canonical form drops every edge of a cell whose output cannot be reached.
    probe = genotype_lib.Genotype(space="small", input_shape=(1, 1, 1), num_classes=2, scale=1,
                                  nodes=cell.nodes, patterns=(("n",),), cells=(cell,))
    return bool(probe.canonical().cells[0].edges)


def values_genotype(hypermodel, space, values):
    """The genotype of hyperparameter `values` in the declared `space` (kt.HyperParameters)."""
    hp = space.copy()
    hp.values = dict(values)
    return hypermodel.genotype(hp)


# ---- the time budget ----------------------------------------------------------------------
class Clock:
    """Seconds used by every process that worked on `directory` against `budget_seconds`.

    started: time.time() when this process began (its start-up counts).
    """

    def __init__(self, directory, budget_seconds, started=None):
        self.path = os.path.join(directory, CLOCK_FILE)
        self.budget = float(budget_seconds)
        self.started = time.time() if started is None else started
        self.before = 0.0
        if os.path.exists(self.path):
            self.before = float(rd.read_json(self.path).get("seconds", 0.0))

    def used(self):
        return self.before + (time.time() - self.started)

    def left(self):
        return self.budget - self.used()

    def save(self):
        rd.write_json(self.path, {"seconds": self.used(), "budget_seconds": self.budget})


class StopAtBudget(keras.callbacks.Callback):
    """Stops a trial's training when the budget is spent (Keras still validates the
    epoch, so the trial keeps a score), and notes the time used after every epoch."""

    def __init__(self, clock, reserve=FINISH_RESERVE_SECONDS):
        super().__init__()
        self.clock, self.reserve = clock, reserve

    def on_train_batch_end(self, batch, logs=None):
        if self.clock.left() <= self.reserve:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.clock.save()


class BudgetOracle(kt.oracles.RandomSearchOracle):
    """Random search that stops when the clock runs out and keeps to a memory budget.

    feasible(values) -> bool: whether a proposal fits (its training-memory estimate
    is within the budget); a proposal that does not is redrawn, never trained.
    """

    def __init__(self, clock, feasible=None, reserve=FINISH_RESERVE_SECONDS, **kwargs):
        super().__init__(**kwargs)
        self.clock, self.feasible, self.reserve = clock, feasible, reserve
        self.redrawn = 0

    def populate_space(self, trial_id):
        if self.clock.left() <= self.reserve:
            return {"status": kt.engine.trial.TrialStatus.STOPPED, "values": None}
        for _ in range(MAX_DRAWS):
            response = super().populate_space(trial_id)
            if response["status"] != kt.engine.trial.TrialStatus.RUNNING or \
                    self.feasible is None or self.feasible(response["values"]):
                return response
            self.redrawn += 1
        log.info("tuner: no proposal within the memory budget in %d draws; stopping", MAX_DRAWS)
        return {"status": kt.engine.trial.TrialStatus.STOPPED, "values": None}


class BudgetTuner(kt.Tuner):
    """Trains each trial (KerasTuner's documented run_trial form: build, then fit) with
    the budget's stop callback, seeded by the trial, and logs one line per trial."""

    def __init__(self, clock, seed=0, trials_path=None, **kwargs):
        super().__init__(**kwargs)
        self.clock, self.seed, self.trials_path = clock, seed, trials_path

    def run_trial(self, trial, *args, **kwargs):
        started = time.time()
        keras.utils.set_random_seed(self.seed * 100003 + int(trial.trial_id))
        hp = trial.hyperparameters
        model = self.hypermodel.build(hp)
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [StopAtBudget(self.clock)]
        history = self.hypermodel.fit(hp, model, *args, **kwargs)
        g = self.hypermodel.genotype(hp)
        best = max(history.history.get(OBJECTIVE) or [float("nan")])
        record = {"trial": trial.trial_id, OBJECTIVE: best, "epochs": len(history.epoch),
                  "operations": g.num_ops(), "cells": len(g.cells),
                  "params": int(model.count_params()),
                  "memory_mb": memory_lib.estimate(g, self.hypermodel.batch_size)["mb"],
                  "seconds": time.time() - started, "genotype_hash": g.hash()}
        log.info("trial %s: %s %.4f, %d cells, %d operations, %d parameters, %.1f s",
                 trial.trial_id, OBJECTIVE, best, record["cells"], record["operations"],
                 record["params"], record["seconds"])
        if self.trials_path:
            with open(self.trials_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        self.clock.save()
        return history


# ---- the whole tuner run --------------------------------------------------------------------
def tune(splits, output_dir, *, space, scale, nodes, patterns, max_patterns, stem_stride,
         batch_size, lr_max, lr_min, momentum, weight_decay, budget_seconds, trial_epochs=2,
         train_subset=0, memory_budget_mb=0.0, max_trials=0, seed=0, started=None,
         settings=None, overwrite=False):
    """Runs (or resumes) a KerasTuner random search in `output_dir`; returns metrics.

    splits: data.Splits; trials train on the first `train_subset` training images
      (0: all) for `trial_epochs` epochs and are scored on the validation split.
    budget_seconds: the wall-clock of the whole tuner run over all its processes
      (0: none, then `max_trials` must be > 0), counted from `started`.
    memory_budget_mb: proposals whose training memory exceeds it are redrawn (0: none).
    settings: a JSON dict identifying the run (the caller's configuration): a
      directory made with other settings is refused unless `overwrite`.
    Writes genotype.json (the best trial's network), trials.jsonl, clock.json and,
    last, metrics.json.
    """
    if budget_seconds <= 0 and max_trials <= 0:
        raise TunerError("no budget and no --max_trials; expected a time budget > 0 or "
                         "max_trials > 0 (KerasTuner would never stop)")
    if trial_epochs < 1:
        raise TunerError(f"trial_epochs = {trial_epochs}; expected >= 1")
    if len(splits.val[1]) == 0:
        raise TunerError("the validation split is empty; expected --val_size > 0 (trials are "
                         "scored on it)")
    settings = dict(settings or {})
    metrics_path = os.path.join(output_dir, METRICS_FILE)
    claim(output_dir, settings, overwrite)
    if os.path.exists(metrics_path):
        log.info("%s is finished", output_dir)
        return rd.read_json(metrics_path)
    info = splits.info
    x, y = splits.train
    if train_subset:
        x, y = x[:train_subset], y[:train_subset]  # data.load_dataset shuffled (seeded)
    xv, yv = splits.val
    steps = max(1, len(y) // batch_size)
    hm = GenotypeHyperModel(space, info.image_shape, info.num_classes, scale, nodes, patterns,
                            max_patterns, stem_stride=stem_stride, mean=info.mean,
                            std=tuple(s if s > 0 else 1.0 for s in info.std), lr_max=lr_max,
                            lr_min=lr_min, momentum=momentum, weight_decay=weight_decay,
                            decay_steps=steps * trial_epochs, batch_size=batch_size)
    clock = Clock(output_dir, budget_seconds if budget_seconds > 0 else float("inf"), started)
    oracle = BudgetOracle(
        clock, objective=kt.Objective(OBJECTIVE, "max"), max_trials=max_trials or 100000,
        seed=seed, max_consecutive_failed_trials=10)
    if memory_budget_mb > 0:
        # The searches fill this training-memory budget: the tuner's networks keep to it too.
        oracle.feasible = lambda values: memory_lib.estimate(
            values_genotype(hm, oracle.get_space(), values), batch_size)["mb"] <= memory_budget_mb
    tuner = BudgetTuner(clock, seed=seed, trials_path=os.path.join(output_dir, TRIALS_FILE),
                        oracle=oracle, hypermodel=hm, directory=output_dir, project_name=PROJECT)
    log.info("tuner: %.0f s budget, %.0f s used; trials of %d epochs on %d images, scored on %d",
             clock.budget, clock.used(), trial_epochs, len(y), len(yv))
    tuner.search(x.astype(np.float32), y, validation_data=(xv.astype(np.float32), yv),
                 epochs=trial_epochs, batch_size=batch_size, verbose=0)
    clock.save()
    ended = [t for t in oracle.trials.values() if t.status == "COMPLETED"]
    scored = [t for t in ended if t.score is not None]
    if not scored:
        raise TunerError(f"no trial finished within {clock.budget:.0f} s; expected a budget "
                         f"that holds at least one trial of {trial_epochs} epoch(s)")
    # The best score, ties to the first trial: KerasTuner's own order among equal scores
    # changed when a project was reloaded (tiny trials tie often), and a resumed
    # comparison must pick the network it picked before.
    top = max(t.score for t in scored)
    best = min((t for t in scored if t.score == top), key=lambda t: t.trial_id)
    g = values_genotype(hm, oracle.get_space(), best.hyperparameters.values)
    est = memory_lib.estimate(g, batch_size)
    metrics = {"best_val_accuracy": float(best.score), "best_trial": best.trial_id,
               "trials": len(oracle.trials), "completed_trials": len(ended),
               "redrawn_proposals": oracle.redrawn, "seconds": clock.used(),
               "time_budget_seconds": budget_seconds, "trial_epochs": trial_epochs,
               "trial_train_examples": int(len(y)), "train_examples": int(len(splits.train[1])),
               "val_examples": int(len(yv)), "test_examples": int(len(splits.test[1])),
               "genotype_hash": g.hash(), "cells": len(g.cells), "operations": g.num_ops(),
               "params_estimate": est["params"], "flops": memory_lib.estimate(g, 1)["flops"],
               "memory_mb": est["mb"], "memory_budget_mb": memory_budget_mb}
    rd.atomic_write(os.path.join(output_dir, "genotype.json"), g.to_json())
    rd.write_json(metrics_path, metrics)
    log.info("tuner: best trial %s of %d: %s %.4f, %d cells, %d operations; %s", best.trial_id,
             len(oracle.trials), OBJECTIVE, best.score, len(g.cells), g.num_ops(),
             os.path.join(output_dir, "genotype.json"))
    return metrics


def claim(output_dir, settings, overwrite):
    """Creates `output_dir`, or resumes it when it was made with the same settings."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if os.path.exists(path):
        old = rd.read_json(path)
        if old == settings:
            return
        if not overwrite:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise rd.RunDirError(f"tuner directory {output_dir} was made with other settings "
                                 f"(differs in: {', '.join(diff[:6])}); expected the same flags "
                                 f"to resume it, or pass --overwrite or another --output_dir")
        for name in (PROJECT, CLOCK_FILE, METRICS_FILE, TRIALS_FILE, "genotype.json"):
            p = os.path.join(output_dir, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
    elif os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise rd.RunDirError(f"--output_dir={output_dir} exists and is not a tuner directory; "
                             f"expected a new or empty directory (or pass --overwrite)")
    os.makedirs(output_dir, exist_ok=True)
    rd.write_json(path, settings)
