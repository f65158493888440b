r"""Pools the found-vs-random pairs of several comparisons (bench/compare.py) into one test.

    python bench/pool_compare.py runs/cmp-a runs/cmp-b --output_dir=runs/pooled

One comparison of three seeds rarely tells a gain of a few tenths of a point from the
seed spread. Comparisons run with the same flagfile and settings on other seeds
(`bench/compare.py --first_seed=3`, ...) add independent pairs: each seed gives one
difference, found network minus the random network matched to it and trained with
the same seed. This reads every comparison's compare.json, checks that they compared
the same thing, and writes pool.json and pool.md: per strategy, every pair, the mean
difference and its 95% Student t interval (bonsai_tf.comparison.paired_differences).

Refused, with one line `error: ...` and status 2:
  - a directory without a finished comparison (compare.json with its per-run table);
  - comparisons that differ in anything but their seeds and where they ran: compare.py's
    settings (the flagfile by name, flags passed through, budget, ...) and every kind of
    sub-run's resolved configuration (config.json of its search, retraining and random
    runs, seed and paths aside; a field that one of them predates reads as its default),
    which also tells two versions of the code apart when they planned other budgets or
    epochs. Their differences would not measure one thing;
  - a seed that two comparisons share: the same seed gives the same data order,
    augmentation and initialisation, so the two pairs are not independent. --allow_repeated_seeds
    keeps them (each is then its own pair) and says so in the output.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import flags  # noqa: E402

from bonsai_tf import cli  # noqa: E402
from bonsai_tf import comparison as cmp  # noqa: E402
from bonsai_tf import run_dir as rd  # noqa: E402

# Its own flags: importable beside the run scripts, whose --output_dir is another flag.
FLAGS = flags.FlagValues()
flags.DEFINE_string("output_dir", "", "Where pool.json and pool.md go; empty: print only.",
                    flag_values=FLAGS)
flags.DEFINE_bool("allow_repeated_seeds", False, "Pool pairs of a seed that several "
                  "comparisons share (not independent: see above).", flag_values=FLAGS)

# Settings that may differ between comparisons pooled: which seeds, where it ran.
FREE = ("seeds", "first_seed", "output_dir")
# What may differ between two sub-runs of one kind (config.json): the seed and the paths;
# and where compare.py plans them from the machine's measured speed (--epochs=0), their
# epochs, epoch length (steps_per_epoch: the plan is made in steps) and minutes: the same
# budget buys another count on another machine, while the two networks of a pair still
# share theirs. (A --steps_per_epoch passed through is in compare.py's settings.)
RUN_FREE = ("seed", "output_dir", "genotype", "data_dir")
PLANNED = ("epochs", "steps_per_epoch", "time_budget_minutes")
KINDS = ("search", "retrain", "random")


class PoolError(ValueError):
    pass


def _run_defaults():
    """RunConfig's defaults as a config.json holds them: an absent field reads as its
    default, not as a difference (cmp16h's `final_with_val: false` against cmp16e-g,
    which predate the field; RunConfig.defaults)."""
    from bonsai_tf import config as config_lib
    return config_lib.RunConfig.defaults()


def _identity(directory, settings):
    """What must match between comparisons pooled: compare.py's settings and one resolved
    config.json of each kind of sub-run, without seeds and paths."""
    ident = {k: v for k, v in settings.items() if k not in FREE}
    ident["flagfile"] = os.path.basename(settings.get("flagfile") or "")
    free = RUN_FREE + (PLANNED if not settings.get("epochs") else ())
    defaults = _run_defaults()
    for strategy in settings.get("strategies", ()):
        for kind in KINDS:
            runs = sorted(d for d in os.listdir(directory) if d.startswith(f"{kind}-{strategy}-s"))
            for d in runs:
                path = os.path.join(directory, d, "config.json")
                if os.path.isfile(path):
                    cfg = {**defaults, **rd.read_json(path)}
                    ident[f"{kind}-{strategy}"] = {k: v for k, v in cfg.items()
                                                   if k not in free}
                    break
    return ident


def _differences(a, b, prefix=""):
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(prefix + k)
    return out


def load(directory):
    """(settings, per_run, retraining schedule: "6 epochs", "7 epochs of 819 steps") of a
    finished comparison in `directory`."""
    path = os.path.join(directory, "compare.json")
    if not os.path.isfile(path):
        raise PoolError(f"{directory}: no compare.json; expected the --output_dir of a "
                        f"finished bench/compare.py")
    state = rd.read_json(path)
    if not isinstance(state, dict) or "settings" not in state or not state.get("per_run"):
        raise PoolError(f"{path} has no per-run results; expected a finished comparison "
                        f"(run its compare.py command again to finish it)")
    return state["settings"], state["per_run"], cmp.schedule_text(state.get("epochs_plan"))


def pool(directories, allow_repeated_seeds=False):
    """The pooled result (a JSON-able dict) of the comparisons in `directories`."""
    if len(directories) < 1:
        raise PoolError("no comparison given; expected one or more compare.py output dirs")
    loaded = [(d, *load(d)) for d in directories]
    first_dir, first, _, _ = loaded[0]
    same = _identity(first_dir, first)
    for d, settings, _, _ in loaded[1:]:
        diff = _differences(same, _identity(d, settings))
        if diff:
            raise PoolError(f"{d} compared other settings than {first_dir} (differs in: "
                            f"{', '.join(diff)}); expected comparisons that differ only "
                            f"in their seeds")
    result = {"comparisons": [{"dir": os.path.abspath(d), "retraining": schedule,
                               "seeds": sorted({r["seed"] for r in per_run})}
                              for d, _, per_run, schedule in loaded],
              "settings": {k: v for k, v in first.items() if k not in FREE},
              "rule": cmp.PAIRED, "allow_repeated_seeds": allow_repeated_seeds,
              "strategies": {}}
    for strategy in first["strategies"]:
        found_m, rand_m = f"{strategy} (found)", f"random (matched to {strategy})"
        pairs, seen = [], {}
        for d, _, per_run, _ in loaded:
            acc = {m: cmp.accuracies_by_seed(per_run, m) for m in (found_m, rand_m)}
            for seed in sorted(acc[found_m]):
                if seed in seen and not allow_repeated_seeds:
                    raise PoolError(f"seed {seed} is in both {seen[seed]} and {d}: its pairs "
                                    f"are not independent (same data order, augmentation "
                                    f"and initialisation); expected comparisons of other seeds "
                                    f"(compare.py --first_seed), or --allow_repeated_seeds")
                seen[seed] = d
                pairs.append({"comparison": os.path.abspath(d), "seed": seed,
                              "found": acc[found_m][seed], "random": acc[rand_m].get(seed)})
        # Keyed by position: with repeated seeds allowed a seed may stand for several pairs.
        p = cmp.paired_differences({i: q["found"] for i, q in enumerate(pairs)},
                                   {i: q["random"] for i, q in enumerate(pairs)})
        p["seeds"] = [pairs[i]["seed"] for i in p["seeds"]]
        result["strategies"][strategy] = {"pairs": pairs, "paired": p}
    return result


def markdown(result):
    s = result["settings"]
    lines = ["# Found against random networks, pooled over comparisons", "",
             f"Configuration `{s.get('flagfile')}`"
             + (f" with `{' '.join(s['passthrough'])}`" if s.get("passthrough") else "")
             + f", {s.get('time_budget_minutes')} minutes per comparison; comparisons:", ""]
    lines += [f"- `{c['dir']}`: seeds {', '.join(map(str, c['seeds']))}, every retraining "
              f"{c['retraining']}" for c in result["comparisons"]]
    if result["allow_repeated_seeds"]:
        lines += ["", "Seeds shared between comparisons were kept (--allow_repeated_seeds): "
                  "those pairs are not independent and the interval is too narrow."]
    for strategy, r in result["strategies"].items():
        lines += ["", f"## {strategy}", "", "| comparison | seed | found | random | found - random |",
                  "|---|---|---|---|---|"]
        for q in r["pairs"]:
            diff = (None if q["found"] is None or q["random"] is None
                    else q["found"] - q["random"])
            lines.append(f"| `{os.path.basename(q['comparison'])}` | {q['seed']} | "
                         f"{_pct(q['found'])} | {_pct(q['random'])} | "
                         f"{'–' if diff is None else f'{100 * diff:+.2f}'} |")
        lines += ["", f"Found - random: {cmp.paired_line(r['paired'])}."]
    lines += ["", result["rule"]]
    return "\n".join(lines) + "\n"


def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}%"


def main(argv):
    """Exit status: 0, or 2 after one `error:` line for bad input."""
    kind = cli.help_requested(argv)
    if kind:
        cli.print_help(FLAGS, "full", doc=__doc__)
        return 0
    FLAGS.unparse_flags()   # called again in one process (tests), it starts from the defaults
    argv, status = cli.parse_argv(FLAGS, argv, positional=True)
    if status is not None:
        return status
    dirs = argv[1:]
    try:
        result = pool(dirs, FLAGS.allow_repeated_seeds)
        text = markdown(result)
        if FLAGS.output_dir:
            os.makedirs(FLAGS.output_dir, exist_ok=True)
            rd.write_json(os.path.join(FLAGS.output_dir, "pool.json"), result)
            rd.atomic_write(os.path.join(FLAGS.output_dir, "pool.md"), text)
    except (PoolError, rd.RunDirError) as e:
        return cli.error(e)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
