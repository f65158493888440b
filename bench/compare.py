r"""Is the search worth it on my data? One command that answers it (project issue 8).

    python bench/compare.py --dataset=fashion_mnist --time_budget_minutes=120 --seeds=3

Within one wall-clock budget (--time_budget_minutes, or --minutes) it runs, each
as an ordinary run directory under --output_dir made by the project's own entry
scripts in a subprocess:

  1. search-S-sK   every strategy S of --strategies (default: bonsai, asap, bayes,
                   spider) with every seed K: train/search.py under its share of the
                   budget, --search_fraction of it searching; its genotype.json is the
                   found network, whose final network it only times (--final_probe_steps),
                   leaving the rest of its share to the retrainings. A method's own
                   settings (METHOD_FLAGS) come between
                   the flagfile and the flags passed through.
  2. tuner         train/tune.py, after the searches: a KerasTuner random search over
                   the same operation space, as much wall-clock as the costliest
                   strategy's searches took together (at most their shares).
  3. retrain-S-sK  every found network trained from scratch for E epochs
                   (train/train.py --strategy=fixed), the same schedule for every row;
     random-S-sK   a random network matched to it (train/train.py --strategy=random:
                   every cell's operation memory within 5% of the found cell's);
     retrain-tuner the tuner's best network; retrain-cnn a plain CNN of similar size
                   (3x3 convolution chains in the same cell layout, as a genotype, so
                   the same trainer, schedule, export and memory model apply).

then writes compare.md and compare.json (one row per method: test accuracy mean ±
std over seeds, parameters, FLOPs, training memory, int8 TFLite latency at batch 1,
search and total seconds; whether each search beats random beyond the seed
spread) and two plots. --epochs=0 plans E from the search runs' measured speed so
that every retraining fits in what is left, in training steps: where whole passes
would leave time unspent, E is one more epoch of fewer steps (--steps_per_epoch),
the same for every retraining. Every flag not listed below is a run
flag passed to every sub-run (--data_dir, --dataset, --batch_size, ...) over the
--flagfile's settings.

Killed and run again with the same command, it continues: finished sub-runs are
not redone, unfinished ones resume, and the plan is read back from compare.json.
Bad input prints one line `error: ...` and exits with status 2; a sub-run that
failed is reported in compare.md and makes the exit status 1.
"""

import logging
import os
import re
import sys
import time

STARTED = time.time()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "train"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

import runner  # noqa: E402  (the run flags, to check what is passed through; no TensorFlow)
from bonsai_tf import cli  # noqa: E402
from bonsai_tf import comparison as cmp  # noqa: E402
from bonsai_tf import config as config_lib  # noqa: E402
from bonsai_tf import genotype as genotype_lib  # noqa: E402
from bonsai_tf import memory as memory_lib  # noqa: E402
from bonsai_tf import machine  # noqa: E402  (no TensorFlow at import)
from bonsai_tf import run_dir as rd  # noqa: E402
from bonsai_tf import trial_queue  # noqa: E402  (KerasTuner only once trials are queued)

SEARCH = os.path.join(REPO, "train", "search.py")
TRAIN = os.path.join(REPO, "train", "train.py")
TUNE = os.path.join(REPO, "train", "tune.py")
WORKER = os.path.join(REPO, "bench", "compare_worker.py")
DEFAULT_FLAGFILE = os.path.join(REPO, "train", "configs", "fmnist_quick.flags")
STATE_FILE = "compare.json"
FORMAT = "bonsai-tf/compare"
VERSION = 1
# A search run's final network is retrained from scratch here, so the run only times it,
# over this many steps (the speed the retraining epochs are planned from), and ends: the
# rest of its share goes to the retrainings. Training it fully cost a search run of the
# quick flagfile about 300 of its 400-odd seconds (run cmp16d).
FINAL_PROBE_STEPS = 100
# Run flags compare.py sets itself for every sub-run.
CONTROLLED = {"strategy": "--strategies", "seed": "--seeds", "genotype": "the found networks",
              "export": "the retrainings (exported) and searches (not)",
              "overwrite": "nothing: sub-runs resume", "verbose": "the sub-runs' logs",
              "final_probe_steps": f"the searches ({FINAL_PROBE_STEPS} steps)"}

# Settings that belong to a method, given to its search runs after the flagfile and before
# the run flags passed through (which win). SpiderNet: the paper's auxiliary weight, rounds
# short enough for a short search, and a starting width whose minimal network fits the
# quick flagfile's memory budget with room to grow (at its scale 16 that network alone is
# estimated at 114 MB at batch 64, the whole 115 MB budget; at 8, 57 MB, and growth fills
# the rest).
METHOD_FLAGS = {"spider": ["--scale=8", "--aux_weight=0.4", "--round_epochs=2"]}

OWN = flags.FlagValues()
flags.DEFINE_string("output_dir", "", "Where everything goes; default runs/compare-<dataset>. "
                    "Running the same command again continues it.", flag_values=OWN)
# ProxylessNAS is a row with --strategies=...,proxyless (its int8 latency measured like every
# row's) but not a default one: every strategy added shares the same budget, and the base
# flagfile names no latency target, so its search would run without its latency term.
flags.DEFINE_list("strategies", ["bonsai", "asap", "bayes", "spider"], "Search strategies to compare "
                  f"(any of {', '.join(config_lib.SEARCHING)}).", flag_values=OWN)
flags.DEFINE_integer("seeds", 3, "Seeds F..F+K-1 (F: --first_seed) of every search and of "
                     "its retrainings.", flag_values=OWN)
flags.DEFINE_integer("first_seed", 0, "The first of the seeds: another comparison with "
                     "--first_seed=K draws new seeds, so that its paired differences add to "
                     "this one's as independent ones (bench/pool_compare.py).", flag_values=OWN)
flags.DEFINE_float("time_budget_minutes", 120.0, "Wall-clock budget of the whole comparison: "
                   "searches, tuner, retrainings, report.", flag_values=OWN)
flags.DEFINE_alias("minutes", "time_budget_minutes", flag_values=OWN)
flags.DEFINE_integer("epochs", 0, "Epochs of every retraining (one fixed schedule); 0: "
                     "planned from the measured speed to fit the budget.", flag_values=OWN)
flags.DEFINE_float("search_share", 0.4, "Share of the budget (after a small reserve) for the "
                   "search side: the search runs, then the KerasTuner run.", flag_values=OWN)
flags.DEFINE_float("search_fraction", 0.75, "Share of a search run's training time that "
                   "searches; the rest would train its final network, which is only timed "
                   f"({FINAL_PROBE_STEPS} steps): the time it does not use goes to the "
                   "retrainings.",
                   flag_values=OWN)
flags.DEFINE_integer("trial_epochs", 2, "Epochs of each KerasTuner trial.", flag_values=OWN)
flags.DEFINE_integer("workers", 1, "Sub-runs at once. 1: one after the other in this process's "
                     "care; N > 1: a KerasTuner chief here hands them out to N worker "
                     "processes (bench/compare_worker.py), each given the machine's cores / "
                     "its local workers as TensorFlow threads. Not part of the comparison's "
                     "identity: a rerun may use another count (the budget split is kept).",
                     flag_values=OWN)
flags.DEFINE_integer("local_workers", -1, "Of --workers, how many this command starts on this "
                     "machine; -1: all. Fewer needs KERASTUNER_TUNER_ID=chief and "
                     "KERASTUNER_ORACLE_IP/PORT set, and the rest started elsewhere with "
                     "bench/compare_worker.py (see the README).", flag_values=OWN)
flags.DEFINE_integer("latency_runs", 50, "Timed single-image calls of each int8 model (the "
                     "median is reported).", flag_values=OWN)

log = logging.getLogger("bonsai_tf.compare")


class UsageError(ValueError):
    pass


# ---- the command line -------------------------------------------------------------------------
def split_argv(argv):
    """(flagfile or None, compare's own flags, run flags to pass through, help kind)."""
    flagfile, own, passthrough = None, [], []
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in cli.HELP_FLAGS:
            return None, [], [], cli.HELP_FLAGS[arg]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise UsageError(f"unexpected argument {arg!r}; expected only --flags")
        name, has_value, value = arg.lstrip("-").partition("=")
        if name == "flagfile":
            if not has_value:
                if i >= len(args):
                    raise UsageError("--flagfile needs a file; expected --flagfile=FILE")
                value, i = args[i], i + 1
            flagfile = value
            continue
        own_name = _flag_name(name, OWN)
        if own_name is not None:
            target, flag = own, OWN[own_name]
        else:
            run_name = _flag_name(name, runner.FLAGS)
            if run_name is None:
                raise UsageError(f"unknown flag --{name}; expected a flag of compare.py or of a "
                                 f"run (python bench/compare.py --helpfull)")
            if run_name in CONTROLLED:
                raise UsageError(f"--{run_name} is set by compare.py for every sub-run (from "
                                 f"{CONTROLLED[run_name]}); expected it left out")
            target, flag = passthrough, runner.FLAGS[run_name]
        target.append(arg)
        if not has_value and flag.flag_type() != "bool" and i < len(args):
            target.append(args[i])  # absl's "--flag value" form
            i += 1
    return flagfile, own, passthrough, None


def _flag_name(name, flag_values):
    """The flag `name` sets in `flag_values` ("noX" sets the boolean X), or None."""
    if name in flag_values:
        return name
    if name.startswith("no") and name[2:] in flag_values and \
            flag_values[name[2:]].flag_type() == "bool":
        return name[2:]
    return None


def resolve_config(flagfile, passthrough, overrides):
    """The RunConfig a sub-run with these flags would have (validated as a run does)."""
    fv = runner.FLAGS
    fv.unparse_flags()
    argv = cli.flagfiles_first(["compare", f"--flagfile={flagfile}", *passthrough], overrides)
    try:
        fv(argv)
    except flags.Error as e:
        raise UsageError(runner.flag_error(e)) from None
    return runner.config_from_flags()


def parse(argv):
    """Returns (settings dict, help kind or None); settings identify the comparison."""
    flagfile, own, passthrough, help_kind = split_argv(argv)
    if help_kind:
        return None, help_kind
    OWN.unparse_flags()  # a second parse in one process starts from the defaults too
    try:
        OWN(["compare"] + own)
    except flags.Error as e:
        raise UsageError(str(e).splitlines()[0]) from None
    strategies = [s.strip() for s in OWN.strategies if s.strip()]
    bad = [s for s in strategies if s not in config_lib.SEARCHING]
    if not strategies or bad or len(set(strategies)) != len(strategies):
        raise UsageError(f"--strategies={','.join(OWN.strategies)}; expected distinct names "
                         f"among {','.join(config_lib.SEARCHING)}")
    checks = (("seeds", OWN.seeds >= 1, "an integer >= 1"),
              ("first_seed", OWN.first_seed >= 0, "an integer >= 0"),
              ("time_budget_minutes", OWN.time_budget_minutes > 0, "minutes > 0 (the whole "
               "comparison's wall-clock)"),
              ("epochs", OWN.epochs >= 0, "an integer >= 0 (0: planned from the budget)"),
              ("search_share", 0 < OWN.search_share < 1, "a fraction in (0, 1)"),
              ("search_fraction", 0 < OWN.search_fraction < 1, "a fraction in (0, 1)"),
              ("trial_epochs", OWN.trial_epochs >= 1, "an integer >= 1"),
              ("latency_runs", OWN.latency_runs >= 1, "an integer >= 1"),
              ("workers", OWN.workers >= 1, "an integer >= 1 (sub-runs at once)"),
              ("local_workers", -1 <= OWN.local_workers <= OWN.workers,
               f"-1 (all) or 0..--workers={OWN.workers}"))
    for name, ok, expected in checks:
        if not ok:
            raise UsageError(f"--{name}={getattr(OWN, name)}; expected {expected}")
    flagfile = flagfile or DEFAULT_FLAGFILE
    if not os.path.isfile(flagfile):
        raise UsageError(f"--flagfile={flagfile} does not exist; expected a run's flag file such "
                         f"as train/configs/fmnist_quick.flags")
    # Every kind of sub-run's configuration is checked now, not an hour from now.
    cfgs = [resolve_config(flagfile, METHOD_FLAGS.get(s, []) + passthrough,
                           [f"--strategy={s}", "--time_budget_minutes=1",
                            f"--search_fraction={OWN.search_fraction}"])
            for s in strategies]
    resolve_config(flagfile, passthrough, ["--strategy=fixed", "--genotype=found.json",
                                           "--time_budget_minutes=0", "--epochs=1"])
    if cfgs[0].val_size == 0:
        raise UsageError("--val_size=0; expected > 0: KerasTuner scores its trials on the "
                         "validation split")
    dataset = cfgs[0].dataset
    output_dir = OWN.output_dir or os.path.join(
        "runs", f"compare-{dataset.replace(':', '_').replace('/', '_')}")
    settings = {"flagfile": flagfile, "passthrough": passthrough, "strategies": strategies,
                "seeds": OWN.seeds, "time_budget_minutes": OWN.time_budget_minutes,
                "epochs": OWN.epochs, "search_share": OWN.search_share,
                "search_fraction": OWN.search_fraction, "trial_epochs": OWN.trial_epochs,
                "dataset": dataset, "output_dir": output_dir,
                "batch_size": cfgs[0].batch_size, "final_subset": cfgs[0].final_subset,
                "steps_per_epoch": cfgs[0].steps_per_epoch}
    if OWN.first_seed:
        # Only when set: a comparison begun before the flag existed continues unchanged.
        settings["first_seed"] = OWN.first_seed
    if cfgs[0].final_with_val:
        # Only when set, as first_seed: the retrainings then also train on the validation
        # examples, which the epoch plan counts.
        settings["final_with_val"] = True
    return settings, None


def pool_plan(workers, local_workers, environ=os.environ):
    """Where the trial queue is served and how many workers start here: a dict, or None
    for one sub-run at a time. Raises UsageError when the chief's address is wanted."""
    local = workers if local_workers < 0 else local_workers
    env = {v: environ.get(v) for v in trial_queue.ENV_VARS}
    chief = env[trial_queue.ENV_ID] is not None and "chief" in env[trial_queue.ENV_ID]
    if chief:
        missing = [v for v in (trial_queue.ENV_IP, trial_queue.ENV_PORT) if not env[v]]
        if missing:
            raise UsageError(f"{trial_queue.ENV_ID}={env[trial_queue.ENV_ID]} but "
                             f"{', '.join(missing)} not set; expected the address the "
                             f"workers reach this machine at")
        try:
            port = int(env[trial_queue.ENV_PORT])
        except ValueError:
            raise UsageError(f"{trial_queue.ENV_PORT}={env[trial_queue.ENV_PORT]!r}; expected "
                             f"a port number") from None
        return {"ip": env[trial_queue.ENV_IP], "port": port, "local": local,
                "remote": local < workers, "workers": workers}
    if local < workers:
        raise UsageError(f"--local_workers={local} of --workers={workers}: the other "
                         f"{workers - local} need this chief's address; expected "
                         f"{trial_queue.ENV_ID}=chief and {trial_queue.ENV_IP}/"
                         f"{trial_queue.ENV_PORT} set (or --local_workers=-1)")
    if workers == 1:
        return None
    return {"ip": "127.0.0.1", "port": 0, "local": local, "remote": False, "workers": workers}


# ---- running sub-runs -------------------------------------------------------------------------
class Comparison:
    """Runs (or continues) the comparison `settings` describes; see the module doc.

    launcher(script, args, log_path) -> (exit status, error line) runs one sub-run.
    started: time.time() when the command began.
    """

    def __init__(self, settings, launcher=trial_queue.subprocess_launcher, started=None,
                 latency_runs=50, command=None, pool=None):
        self.settings, self.launcher = settings, launcher
        self.started = time.time() if started is None else started
        self.out = settings["output_dir"]
        # pool_plan()'s dict: sub-runs go to worker processes through a trial queue.
        self.pool_plan, self.pool = pool, None
        self.workers = pool["workers"] if pool else 1
        self.latency_runs = latency_runs
        self.command = command or []
        self.state = None
        self.any_done = False

    # ---- state ---------------------------------------------------------------------------------
    def _path(self, *parts):
        return os.path.join(self.out, *parts)

    def _load(self):
        path = self._path(STATE_FILE)
        if os.path.exists(path):
            state = rd.read_json(path)
            old = state.get("settings") if isinstance(state, dict) else None
            if old is None or state.get("format") != FORMAT:
                raise UsageError(f"{path} is not a compare.py state file; expected the "
                                 f"compare.json of a comparison, or another --output_dir")
            if old != self.settings:
                diff = sorted(k for k in set(old) | set(self.settings)
                              if old.get(k) != self.settings.get(k))
                raise UsageError(f"{self.out} holds a comparison with other settings (differs "
                                 f"in: {', '.join(diff)}); expected the same command to "
                                 f"continue it, or another --output_dir")
            self.state = state
            self.before = float(state.get("elapsed_seconds", 0.0))
            log.info("continuing the comparison in %s (%.0f s used before)", self.out,
                     self.before)
            return
        self.check_output_dir(ours=("compare.log",))
        s = self.settings
        split = cmp.split_budget(s["time_budget_minutes"] * 60.0, len(s["strategies"]),
                                 s["seeds"], s["search_share"], workers=self.workers)
        self.before = 0.0
        self.state = {"format": FORMAT, "version": VERSION, "settings": s, "split": split,
                      "epochs_plan": None, "runs": {}, "elapsed_seconds": 0.0}
        os.makedirs(self.out, exist_ok=True)
        self._save()
        for line in split["why"]:
            log.info("budget: %s", line)

    def check_output_dir(self, ours=()):
        """Refuses an --output_dir that is neither new, empty nor a comparison."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UsageError(f"--output_dir={self.out} is a file; expected a directory")
        if os.path.exists(self._path(STATE_FILE)):
            return
        if os.path.isdir(self.out) and set(os.listdir(self.out)) - set(ours):
            raise UsageError(f"--output_dir={self.out} exists and holds no compare.json; "
                             f"expected a new or empty directory, or a comparison to continue")

    def elapsed(self):
        return self.before + (time.time() - self.started)

    def _save(self):
        self.state["elapsed_seconds"] = self.elapsed()
        self.state["command"] = self.command
        rd.write_json(self._path(STATE_FILE), self.state)

    # ---- one sub-run ----------------------------------------------------------------------------
    def _common(self, strategy=None):
        s = self.settings
        return [f"--flagfile={s['flagfile']}", *METHOD_FLAGS.get(strategy, []),
                *s["passthrough"], "--verbose=0"]

    def _entry(self, name):
        entry = self.state["runs"].setdefault(name, {"wall_seconds": 0.0, "invocations": 0})
        entry["dir"] = name
        return entry

    def _finished(self, name, done_files):
        return all(os.path.exists(self._path(name, f)) for f in done_files)

    def _already_done(self, name, done_files):
        """Whether sub-run `name` finished before (marked done in the state if so)."""
        if not self._finished(name, done_files):
            return False
        entry = self._entry(name)
        if entry.get("status") != "done":
            entry["status"] = "done"
            self._save()
        self.any_done = True
        return True

    def _ensure(self, name, script, args, done_files):
        """Runs sub-run `name` unless it is finished; returns whether it is finished now."""
        if self._already_done(name, done_files):
            return True
        entry = self._entry(name)
        log.info("%s: %s", name, "resuming" if os.path.exists(self._path(name)) else "starting")
        t0 = time.time()
        try:
            code, error = self.launcher(script, args, self._path("logs", f"{name}.log"))
        finally:
            entry["wall_seconds"] += time.time() - t0
            entry["invocations"] += 1
            self._save()
        return self._outcome(name, done_files, code, error, time.time() - t0)

    def _outcome(self, name, done_files, code, error, seconds):
        entry = self._entry(name)
        entry["exit"] = code
        if code == 0 and self._finished(name, done_files):
            entry["status"], entry["error"] = "done", None
            self.any_done = True
            log.info("%s: done in %.0f s", name, seconds)
        else:
            entry["status"], entry["error"] = "failed", error
            log.info("%s: failed (exit %s): %s", name, code, error)
            if code == 2 and not self.any_done:
                # The first sub-run refused its input: so would every other one.
                self._save()
                raise UsageError(f"{name} refused its input: {error} (log: "
                                 f"{self._path('logs', name + '.log')})")
        self._save()
        rd.fault_point(f"compare:{name}")
        return entry["status"] == "done"

    def _run_jobs(self, jobs, phase):
        """Runs [(name, script, args, done files)]: in turn, or all at once on the workers.
        The phase's wall-clock adds up in compare.json's phase_seconds (over reruns)."""
        t0 = time.time()
        try:
            self._run_phase(jobs)
        finally:
            phases = self.state.setdefault("phase_seconds", {})
            phases[phase] = phases.get(phase, 0.0) + time.time() - t0
            self._save()

    def _run_phase(self, jobs):
        if self.pool_plan is None:
            for job in jobs:
                self._ensure(*job)
            return
        waiting = {}
        specs = []
        for name, script, args, done in jobs:
            if self._already_done(name, done):
                continue
            log.info("%s: queued (%s)", name,
                     "resuming" if os.path.exists(self._path(name)) else "starting")
            waiting[name] = done
            specs.append(trial_queue.job_spec(name, script, args,
                                              self._path("logs", f"{name}.log"), os.getcwd()))
        if not specs:
            return
        pool = self._pool()
        pool.submit(specs)
        while waiting:
            for name, r in pool.wait(list(waiting)).items():
                done = waiting.pop(name)
                entry = self._entry(name)
                entry["wall_seconds"] += r["seconds"]
                entry["invocations"] += 1
                entry["worker"] = r["tuner"]
                error = None if r["exit"] == 0 else (
                    trial_queue.last_error(self._path("logs", f"{name}.log"))
                    or r.get("message"))
                self._outcome(name, done, r["exit"], error, r["seconds"])

    def _pool(self):
        if self.pool is None:
            plan = self.pool_plan
            cores = machine.usable_cpus()
            # What thread_plan() gives one run on few cores, split between the runs here.
            threads = f"--threads={max(1, cores // max(1, plan['local']))},1"
            self.pool = trial_queue.Chief(
                plan["ip"], plan["port"], plan["local"],
                lambda i: [sys.executable, WORKER, threads,
                           f"--directory={self._path('workers')}"],
                self._path("logs"), remote=plan["remote"])
            log.info("trial queue at %s:%s: %d worker process(es) here%s", plan["ip"],
                     self.pool.port, plan["local"],
                     f", {plan['workers'] - plan['local']} expected from elsewhere"
                     if plan["remote"] else "")
        return self.pool

    def close(self, finished):
        if self.pool is not None:
            if finished:
                self.pool.finish()
            else:
                self.pool.close()
            self.pool = None

    def _skip(self, name, why):
        entry = self._entry(name)
        if entry.get("status") != "done":
            entry.update(status="skipped", error=why)

    # ---- the steps ------------------------------------------------------------------------------
    def seeds(self):
        first = self.settings.get("first_seed", 0)
        return list(range(first, first + self.settings["seeds"]))

    def pairs(self):
        return [(s, k) for k in self.seeds() for s in self.settings["strategies"]]

    def run(self):
        self._load()
        finished = False
        try:
            self._run_jobs(self._search_jobs(), "search side")
            self._run_jobs([self._tuner_job()], "search side")
            self._cnn_genotype()
            self._plan()
            self._run_jobs(self._retrain_jobs(), "retrainings")
            finished = True
        finally:
            self.close(finished)
        return self.report()

    def _search_jobs(self):
        s, split = self.settings, self.state["split"]
        minutes = round(split["search_run_seconds"] / 60.0, 4)
        searches = [(f"search-{strategy}-s{k}", SEARCH, self._common(strategy) + [
            f"--strategy={strategy}", f"--seed={k}", f"--time_budget_minutes={minutes}",
            f"--search_fraction={s['search_fraction']}", "--noexport",
            f"--final_probe_steps={FINAL_PROBE_STEPS}",
            f"--output_dir={self._path(f'search-{strategy}-s{k}')}"], ["metrics.json"])
            for strategy, k in self.pairs()]
        return searches

    def _tuner_job(self):
        """The KerasTuner run, after the searches: as much wall-clock as the costliest
        strategy's searches took (comparison.tuner_seconds_for), fixed once in
        compare.json so that a rerun resumes it with the same budget."""
        s, state = self.settings, self.state
        if state.get("tuner_seconds") is None:
            took = {}
            for strategy, k in self.pairs():
                entry = state["runs"].get(f"search-{strategy}-s{k}", {})
                took.setdefault(strategy, []).append(float(entry.get("wall_seconds") or 0.0))
            state["tuner_seconds"], why = cmp.tuner_seconds_for(state["split"], took)
            self._save()
            log.info("tuner: %s", why)
        return ("tuner", TUNE, self._common() + [
            f"--seed={self.seeds()[0]}",
            f"--time_budget_minutes={round(state['tuner_seconds'] / 60.0, 4)}",
            f"--trial_epochs={s['trial_epochs']}", f"--output_dir={self._path('tuner')}"],
            ["metrics.json"])

    def _retrain_jobs(self):
        retrain = ["metrics.json", "export.json"]
        jobs = []
        for strategy, k in self.pairs():
            found = self._path(f"search-{strategy}-s{k}", "genotype.json")
            for kind, name in (("fixed", f"retrain-{strategy}-s{k}"),
                               ("random", f"random-{strategy}-s{k}")):
                if self.state["runs"][f"search-{strategy}-s{k}"].get("status") != "done":
                    self._skip(name, f"search-{strategy}-s{k} did not finish")
                    continue
                jobs.append((name, TRAIN, self._retrain_args(kind, found, k, name), retrain))
        for name, source, what in (("retrain-tuner", self._path("tuner", "genotype.json"),
                                    "tuner"),
                                   ("retrain-cnn", self._path("genotypes", "cnn.json"),
                                    "genotypes/cnn.json")):
            if not os.path.exists(source):
                self._skip(name, f"{what} has no genotype")
                continue
            jobs.append((name, TRAIN, self._retrain_args("fixed", source, self.seeds()[0], name),
                         retrain))
        if self.pool_plan:
            # The longest first, by the plan's estimates (the schedule plan_epochs assumed).
            plan = self.state["epochs_plan"]
            est = {r["name"]: cmp.run_seconds(r, plan["epochs"], plan.get("steps_per_epoch")
                                              if "step_seconds" in r else None)
                   for r in plan.get("runs") or ()}
            jobs.sort(key=lambda job: -est.get(job[0], 0.0))
        return jobs

    def _retrain_args(self, strategy, genotype, seed, name):
        plan = self.state["epochs_plan"]
        # An epoch shorter than a full pass where the plan made one (plan_epochs); after
        # the passthrough flags, so it wins over a --steps_per_epoch given there.
        steps = plan.get("steps_per_epoch")
        shorter = ([f"--steps_per_epoch={steps}"]
                   if steps and steps < plan.get("full_pass_steps", steps + 1) else [])
        return self._common() + [
            f"--strategy={strategy}", f"--genotype={genotype}", f"--seed={seed}",
            f"--epochs={plan['epochs']}"] + shorter + [
            "--time_budget_minutes=0", "--export", f"--output_dir={self._path(name)}"]

    def _found(self):
        """[(strategy, seed, Genotype, metrics)] of the finished searches."""
        out = []
        for strategy, k in self.pairs():
            d = self._path(f"search-{strategy}-s{k}")
            if os.path.exists(os.path.join(d, "metrics.json")):
                g = genotype_lib.Genotype.load(os.path.join(d, "genotype.json"))
                out.append((strategy, k, g, rd.read_json(os.path.join(d, "metrics.json"))))
        return out

    def _cnn_genotype(self):
        """genotypes/cnn.json: a plain CNN with about the found networks' parameters."""
        path = self._path("genotypes", "cnn.json")
        if os.path.exists(path):
            return
        found = self._found()
        tuner = self._path("tuner", "genotype.json")
        if found:
            template = found[0][2]
            n = sorted(genotype_lib.num_patterns(g) for _, _, g, _ in found)[len(found) // 2]
            target = sorted(m["params"] for _, _, _, m in found)[len(found) // 2]
        elif os.path.exists(tuner):
            template = genotype_lib.Genotype.load(tuner)
            n, target = genotype_lib.num_patterns(template), rd.read_json(
                self._path("tuner", "metrics.json"))["params_estimate"]
        else:
            log.info("plain CNN: no found network to take the layout and size from")
            return
        g = cmp.plain_cnn(template, n, target)
        rd.atomic_write(path, g.to_json())
        log.info("plain CNN: %d cells of %s chains, stem width %d, ~%d parameters (found "
                 "networks: ~%d)", len(g.cells), cmp.CNN_OP, g.scale,
                 memory_lib.estimate(g, 1)["params"], target)

    def _sizes(self):
        """(train, val, test) example counts of the data the sub-runs use."""
        path = self._path("tuner", "metrics.json")
        if os.path.exists(path):
            m = rd.read_json(path)
            return m["train_examples"], m["val_examples"], m["test_examples"]
        for strategy, k in self.pairs():
            try:
                with open(self._path(f"search-{strategy}-s{k}", "log.txt")) as f:
                    found = re.search(r": (\d+) training, (\d+) validation, (\d+) test", f.read())
            except OSError:
                continue
            if found:
                return tuple(int(v) for v in found.groups())
        return None

    def _plan(self):
        """The retraining epochs E, once (read back from compare.json on a rerun)."""
        if self.state.get("epochs_plan"):
            return
        s = self.settings
        n_runs = 2 * len(self._found()) + 2
        if s["epochs"]:
            plan = {"epochs": s["epochs"], "why": f"--epochs={s['epochs']} given"}
        else:
            plan = self._plan_from_speed()
        plan["planned_at_seconds"] = self.elapsed()
        plan["retrain_runs"] = n_runs
        self.state["epochs_plan"] = plan
        self._save()
        log.info("plan: %s", plan["why"])

    def _plan_from_speed(self):
        s, split = self.settings, self.state["split"]
        sizes = self._sizes()
        refs = []
        for strategy, k, g, m in self._found():
            d = self._path(f"search-{strategy}-s{k}")
            speed = cmp.final_phase_speed(rd.read_metrics(os.path.join(d, "metrics.jsonl")))
            wall = self.state["runs"].get(f"search-{strategy}-s{k}", {}).get("wall_seconds")
            if speed is None or not wall:
                continue
            speed.update(name=f"search-{strategy}-s{k}", operations=g.num_ops(),
                         flops=m["flops"], startup_seconds=max(0.0, wall - m["total_seconds"]))
            refs.append((strategy, k, speed))
        if not refs or sizes is None:
            raise UsageError("cannot plan the retraining epochs: no search run finished with a "
                             "measured final network; expected --epochs=N to be given")
        n_train, n_val, n_test = sizes
        n = min(n_train, s["final_subset"] or n_train) + (n_val if s.get("final_with_val") else 0)
        full_steps = max(1, n // s["batch_size"])
        if s["steps_per_epoch"]:
            full_steps = min(full_steps, s["steps_per_epoch"])

        def cost(speed, ratio):
            """{epoch, step, outside (of an epoch), overhead (of a run)} seconds."""
            step = speed["step_seconds"] * ratio
            return {"epoch_seconds": full_steps * step + speed["outside_seconds"],
                    "step_seconds": step, "outside_seconds": speed["outside_seconds"],
                    "overhead_seconds": speed["startup_seconds"] + cmp.export_seconds(
                        step, s["batch_size"], n_test, n_val)}

        runs = []
        for strategy, k, speed in refs:
            # A random network matches the found one's operation memory: the same speed.
            for name in (f"retrain-{strategy}-s{k}", f"random-{strategy}-s{k}"):
                runs.append({"name": name, **cost(speed, 1.0), "reference": speed["name"]})
        for name, path in (("retrain-tuner", self._path("tuner", "genotype.json")),
                           ("retrain-cnn", self._path("genotypes", "cnn.json"))):
            if not os.path.exists(path):
                continue
            g = genotype_lib.Genotype.load(path)
            other = {"operations": g.num_ops(), "flops": memory_lib.estimate(g, 1)["flops"]}
            # The slowest prediction of any reference: these networks were never timed.
            slowest = max(({**cost(sp, cmp.cost_ratio(sp, other)), "reference": sp["name"]}
                           for _, _, sp in refs),
                          key=lambda c: (c["epoch_seconds"], c["overhead_seconds"]))
            runs.append({"name": name, **slowest})
        left = split["total_seconds"] - self.elapsed() - split["reserve_seconds"]
        plan = cmp.plan_epochs(left, runs, workers=self.workers, full_pass_steps=full_steps)
        plan.update(full_pass_steps=full_steps, train_examples=n_train, val_examples=n_val,
                    test_examples=n_test, speeds=[sp for _, _, sp in refs])
        return plan

    # ---- the report ---------------------------------------------------------------------------
    def _collect(self, name, method, seed, search_name=None):
        entry = self.state["runs"].get(name, {})
        r = {"name": name, "method": method, "seed": seed, "status": entry.get("status")}
        d = self._path(name)
        if entry.get("status") != "done":
            return r
        m = rd.read_json(os.path.join(d, "metrics.json"))
        r.update({k: m.get(k) for k in ("test_accuracy", "params", "flops", "memory_mb",
                                        "memory_measured_mb", "epochs", "genotype_hash")})
        if not r.get("memory_measured_mb"):
            r["memory_measured_mb"] = None  # 0 or missing: not measured on this machine
        r["retrain_seconds"] = entry.get("wall_seconds") or None
        search = 0.0
        if search_name:
            search = self.state["runs"].get(search_name, {}).get("wall_seconds") or None
        r["search_seconds"] = search
        r["total_seconds"] = (None if r["retrain_seconds"] is None or search is None
                              else r["retrain_seconds"] + search)
        if entry.get("int8_latency_ms") is None:
            entry["int8_latency_ms"] = int8_latency_ms(os.path.join(d, "model_int8.tflite"),
                                                       self.latency_runs)
        r["int8_latency_ms"] = entry["int8_latency_ms"]
        return r

    def report(self):
        s = self.settings
        per_run, methods = [], []
        for strategy in s["strategies"]:
            found = f"{strategy} (found)"
            rand = f"random (matched to {strategy})"
            methods += [found, rand]
            for k in self.seeds():
                per_run.append(self._collect(f"retrain-{strategy}-s{k}", found, k,
                                             f"search-{strategy}-s{k}"))
                per_run.append(self._collect(f"random-{strategy}-s{k}", rand, k))
        methods += ["keras-tuner best", "plain CNN"]
        first = self.seeds()[0]
        per_run.append(self._collect("retrain-tuner", "keras-tuner best", first, "tuner"))
        per_run.append(self._collect("retrain-cnn", "plain CNN", first))
        rows = [cmp.summarize(m, [r for r in per_run if r["method"] == m]) for m in methods]
        verdicts = []
        for strategy in s["strategies"]:
            found = cmp.accuracies_by_seed(per_run, f"{strategy} (found)")
            rand = cmp.accuracies_by_seed(per_run, f"random (matched to {strategy})")
            v = cmp.versus_random(list(found.values()), list(rand.values()))
            v["paired"] = cmp.paired_differences(found, rand)
            v["strategy"] = strategy
            verdicts.append(v)
        self.state.update(rows=rows, per_run=per_run, verdicts=verdicts, rule=cmp.RULE,
                          paired_rule=cmp.PAIRED,
                          latency_runs=self.latency_runs,
                          plots=["accuracy_vs_params.png", "accuracy_vs_seconds.png"])
        self._save()
        cmp.plot(self.state, self.out)
        rd.atomic_write(self._path("compare.md"), cmp.markdown(self.state))
        self._save()
        for v in verdicts:
            log.info("%s vs random: %s (%s)", v["strategy"], v["verdict"], v["why"])
        log.info("wrote %s and %s", self._path("compare.md"), self._path(STATE_FILE))
        return self.state


def int8_latency_ms(path, runs, warmup=5):
    """Median milliseconds of one single-image call of an int8 TFLite model (one thread:
    what a small device gives it, and steadier on a shared machine); None without one."""
    import numpy as np

    from bonsai_tf import export as export_lib
    if not os.path.isfile(path):
        return None
    with cli.dropping_stderr_lines(cli.EXPORT_NOISE):  # LiteRT announces its delegate
        lite = export_lib.TFLiteClassifier(path, num_threads=1)
        lite.run_batch(np.zeros((1, *lite.image_shape), np.uint8))
    image = np.random.default_rng(0).integers(0, 256, (1, *lite.image_shape), np.uint8)
    for _ in range(warmup):
        lite.run_batch(image)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        lite.run_batch(image)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0)


def _help(kind):
    own = OWN.module_help(OWN.find_module_defining_flag("seeds"))
    text = __doc__.rstrip() + "\n\nflags:\n" + own + "\n  --flagfile: the search " \
        "configuration every sub-run shares (default train/configs/fmnist_quick.flags)\n"
    if kind == "full":
        text += "\nrun flags passed through to every sub-run:\n" + \
            runner.FLAGS.module_help(runner.__name__) + "\n"
    else:
        text += "\nEvery other run flag passes through to the sub-runs: --helpfull lists them.\n"
    sys.stdout.write(text)
    return 0


def main(argv, launcher=trial_queue.subprocess_launcher, started=None):
    """Runs the comparison; returns the exit status (0, 1: a sub-run failed, 2: bad input)."""
    try:
        settings, help_kind = parse(argv)
        if help_kind:
            return _help(help_kind)
        comparison = Comparison(settings, launcher, started=started or STARTED,
                                latency_runs=OWN.latency_runs, command=list(argv),
                                pool=pool_plan(OWN.workers, OWN.local_workers))
        comparison.check_output_dir()  # before anything is written there
        os.makedirs(settings["output_dir"], exist_ok=True)
        cli.setup_logging("bonsai_tf.compare",
                          os.path.join(settings["output_dir"], "compare.log"))
        state = comparison.run()
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    except (UsageError, runner.UsageError, config_lib.ConfigError, genotype_lib.GenotypeError,
            rd.RunDirError) as e:
        return cli.error(e)
    except trial_queue.QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = [n for n, r in state["runs"].items() if r.get("status") != "done"]
    if failed:
        print(f"error: {len(failed)} sub-run(s) did not finish ({', '.join(sorted(failed))}); "
              f"see {os.path.join(settings['output_dir'], 'compare.md')} and the logs in "
              f"{os.path.join(settings['output_dir'], 'logs')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
