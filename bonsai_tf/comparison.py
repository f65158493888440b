"""The arithmetic and the report of bench/compare.py ("is the search worth it on my data").

Pure functions on plain data (no TensorFlow): the split of the wall-clock budget,
the planning of the fixed retraining schedule from measured speeds, the plain-CNN
genotype, mean and spread over seeds with the rule that says whether a search
beats the random baseline, and compare.md with its plots.
"""

import math
import os
import statistics

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import memory as memory_lib
from bonsai_tf import space as space_lib

# ---- the budget split -------------------------------------------------------------------
RESERVE_FRACTION = 0.03        # of the budget: timing the int8 models, the report, gaps
RESERVE_MIN_SECONDS = 30.0
SHORT_SEARCH_SECONDS = 120.0   # a search run given less has little beyond start-up and finish
MIN_TUNER_SECONDS = 60.0       # a tuner given less has little beyond start-up and one trial


def retrain_count(n_strategies, n_seeds):
    """Found + random per strategy and seed, plus the tuner's best and the plain CNN."""
    return 2 * n_strategies * n_seeds + 2


def makespan(seconds, workers=1):
    """When the last of jobs lasting `seconds` ends if `workers` run them, longest first,
    each taking the next job as it comes free (as the trial queue hands them out)."""
    if workers < 1:
        raise ValueError(f"workers = {workers}; expected >= 1")
    loads = [0.0] * workers
    for t in sorted((float(t) for t in seconds), reverse=True):
        loads[loads.index(min(loads))] += t
    return max(loads)


def split_budget(total_seconds, n_strategies, n_seeds, search_share=0.4, workers=1):
    """Splits the whole comparison's wall-clock up front; returns a JSON dict.

    A reserve is kept for the comparison's own work. Of the rest, `search_share`
    goes to the search side: every strategy's `n_seeds` search runs, then the
    KerasTuner run, allowed as much as one strategy's searches together (n_seeds
    search shares; tuner_seconds) and given what the costliest strategy's searches
    really took within that (tuner_seconds_for), so the tuner and each strategy cost
    the same. The remainder, and whatever the search side did not use, is for the
    retrainings, whose epochs are planned from measured speeds once the search side
    is done (plan_epochs).

    With `workers` sub-runs at once, a share is as long as lets the search side's
    schedule (the searches, then the tuner alone) end within its part of the wall-clock.
    """
    if not total_seconds > 0:
        raise ValueError(f"total_seconds = {total_seconds}; expected > 0")
    if n_strategies < 1 or n_seeds < 1:
        raise ValueError(f"{n_strategies} strategies and {n_seeds} seeds; expected >= 1 each")
    if not 0 < search_share < 1:
        raise ValueError(f"search_share = {search_share}; expected in (0, 1)")
    reserve = min(0.25 * total_seconds, max(RESERVE_MIN_SECONDS, RESERVE_FRACTION * total_seconds))
    usable = total_seconds - reserve
    search_side = search_share * usable
    shares = (n_strategies + 1) * n_seeds
    # In shares: every search's one, as the queue hands them out, then the tuner's n_seeds
    # (it runs after them: its time is matched to what theirs was).
    span = makespan([1] * (n_strategies * n_seeds), workers) + n_seeds
    each = search_side / span
    retrain = usable - search_side
    why = [f"{total_seconds:.0f} s in all: {reserve:.0f} s kept for timing the int8 models, "
           f"the report and the gaps between sub-runs",
           f"{search_share:.0%} of the remaining {usable:.0f} s to the search side: "
           f"{n_strategies} {'strategy' if n_strategies == 1 else 'strategies'} x "
           f"{_n(n_seeds, 'seed')} search runs, then the KerasTuner run, which gets what one "
           f"strategy's {_n(n_seeds, 'search')} took together (at most theirs), so {shares} "
           f"shares of {each:.0f} s"
           + (f", {workers} at once (the schedule ends after {_n(round(span), 'share')})"
              if workers > 1 else ""),
           f"the other {retrain:.0f} s to the {retrain_count(n_strategies, n_seeds)} "
           f"retrainings, whose epochs are planned from the search runs' measured speed"]
    if each < SHORT_SEARCH_SECONDS:
        why.append(f"warning: {each:.0f} s per search run is short (a run keeps ~45 s for its "
                   f"start-up and finish): give a larger budget for a meaningful search")
    return {"total_seconds": float(total_seconds), "reserve_seconds": reserve,
            "search_share": search_share, "search_run_seconds": each,
            "search_runs": n_strategies * n_seeds, "tuner_seconds": n_seeds * each,
            "retrain_seconds": retrain, "retrain_runs": retrain_count(n_strategies, n_seeds),
            "workers": workers, "why": why}


def tuner_seconds_for(split, search_seconds):
    """The KerasTuner run's wall-clock: what the costliest strategy's searches took
    together, within its allowance (split["tuner_seconds"]), and not under
    MIN_TUNER_SECONDS where the allowance holds that much.

    search_seconds: {strategy: [wall seconds of each of its search runs]}. Searches
    that settle early (the quick flagfile's BonsaiNet searches used about 100 of 466
    s: cmp16d) would otherwise leave the tuner several times their compute. Returns
    (seconds, why).
    """
    allowance = float(split["tuner_seconds"])
    took = {s: float(sum(v)) for s, v in search_seconds.items() if v}
    if not took:
        return allowance, f"{allowance:.0f} s: no search run timed, its whole allowance"
    strategy = max(took, key=took.get)
    seconds = min(allowance, max(took[strategy], MIN_TUNER_SECONDS))
    floored = took[strategy] < MIN_TUNER_SECONDS <= allowance
    return seconds, (f"{seconds:.0f} s: {strategy}'s {len(search_seconds[strategy])} searches "
                     f"took {took[strategy]:.0f} s together (allowance {allowance:.0f} s"
                     + (f", at least {MIN_TUNER_SECONDS:.0f} s" if floored else "") + ")")


# ---- planning the retraining epochs ------------------------------------------------------------
SAFETY = 1.15                 # estimates are scaled by this: retrainings keep no budget themselves
EXPORT_BASE_SECONDS = 20.0    # SavedModel + two TFLite conversions, at the least


def final_phase_speed(records):
    """Step time and per-epoch time outside the steps of a run's final network.

    records: the run's metrics.jsonl records. An epoch that ended the search (its
    events say "final network") trained the supernet, so it is left out where a
    purely final epoch exists. Returns {"step_seconds", "outside_seconds",
    "epochs"} or None when the run has no final epoch.
    """
    final = [r for r in records if r.get("phase") == "final" and r.get("step_seconds")]
    pure = [r for r in final
            if not any(str(e).startswith("final network") for e in r.get("events") or ())]
    use = pure or final
    if not use:
        return None
    step = statistics.median(float(r["step_seconds"]) for r in use)
    outside = statistics.median(max(0.0, float(r.get("epoch_seconds") or 0.0)
                                    - int(r.get("steps") or 0) * float(r["step_seconds"]))
                                for r in use)
    return {"step_seconds": step, "outside_seconds": outside, "epochs": len(use)}


def cost_ratio(reference, other):
    """How much slower a step of `other` is than one of `reference`, conservatively.

    Both are {"operations": n, "flops": f}. On a CPU a small network's step is
    bound by the number of operations dispatched, a large one's by its FLOPs; the
    larger of the two ratios is taken.
    """
    ratios = [other[k] / reference[k] for k in ("operations", "flops")
              if reference.get(k) and other.get(k) is not None]
    return max(ratios) if ratios else 1.0


def export_seconds(step_seconds, batch_size, n_test, n_val):
    """What a retraining's export is expected to take: conversions, then the test split
    through four artifacts and the validation split through two int8 candidates, at
    roughly a third of a training step's time per image."""
    return EXPORT_BASE_SECONDS + (4 * n_test + 2 * n_val) * step_seconds / (3.0 * batch_size)


def run_seconds(run, epochs, steps=None):
    """A retraining's estimated seconds: its overhead and `epochs` epochs, each of `steps`
    training steps (a full pass, `run["epoch_seconds"]`, when steps is None)."""
    if steps is None:
        return float(run["overhead_seconds"]) + epochs * float(run["epoch_seconds"])
    return float(run["overhead_seconds"]) + epochs * (
        steps * float(run["step_seconds"]) + float(run["outside_seconds"]))


def plan_epochs(seconds_left, runs, safety=SAFETY, workers=1, full_pass_steps=None):
    """The one schedule for every retraining, E epochs (of S steps), so that all fit.

    runs: [{"name", "epoch_seconds", "overhead_seconds"}], the estimated seconds of
    one epoch and of everything else (start-up, test evaluation, export) of each;
    with "step_seconds" and "outside_seconds" (an epoch's seconds outside its steps)
    besides, and `full_pass_steps` given, the plan is made in training steps.
    E is the largest count, at least 1, whose schedule on `workers` at once
    (makespan) fits seconds_left / safety; with one worker that is
    floor((seconds_left / safety - sum overhead) / sum epoch_seconds).
    In steps, one epoch more of S < full_pass_steps steps is taken where it trains
    more steps within the limit than E full passes: rounding down to whole passes left
    up to an epoch of every retraining unspent (cmp16i: 6 epochs, 28% of its hour
    unused). Every retraining still gets the same E and S, so pairs train alike.
    Returns {"epochs", "steps_per_epoch" (None unless planned in steps), "why", ...}.
    """
    if not runs:
        raise ValueError("no retraining to plan; expected at least one")
    fixed = sum(float(r["overhead_seconds"]) for r in runs)
    per_epoch = sum(float(r["epoch_seconds"]) for r in runs)
    limit = seconds_left / safety

    def span(e, steps=None):
        return makespan([run_seconds(r, e, steps) for r in runs], workers)
    epochs = 1
    if per_epoch > 0:
        # The one-worker count bounds it (a schedule never beats the total / workers).
        hi = max(1, int((workers * limit - fixed) // per_epoch) + 1)
        lo = 1
        while lo < hi:   # the largest e with span(e) <= limit; span grows with e
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if span(mid) <= limit else (lo, mid - 1)
        epochs = lo
    steps = None
    in_steps = bool(full_pass_steps) and all("step_seconds" in r and "outside_seconds" in r
                                              for r in runs)
    if in_steps:
        full = int(full_pass_steps)
        best = (epochs * full if span(epochs) <= limit else 0, epochs, full)
        for e in (epochs, epochs + 1):
            lo, hi = 0, full   # the most steps per epoch (0: none) that e epochs fit in
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if span(e, mid) <= limit else (lo, mid - 1)
            if lo and e * lo > best[0]:
                best = (e * lo, e, lo)
        epochs, steps = best[1], best[2]
    at_once = f" ({workers} at once)" if workers > 1 else ""
    expected = span(epochs, steps)
    schedule = f"{epochs} epoch{'s' if epochs != 1 else ''}"
    if steps is not None and steps < int(full_pass_steps):
        schedule += f" of {steps} steps (a full pass is {int(full_pass_steps)})"
    why = (f"{seconds_left:.0f} s left for {len(runs)} retrainings{at_once}; with a {safety:g}x "
           f"margin {limit:.0f} s; they take {fixed:.0f} s of start-up, test evaluation and "
           f"export and {per_epoch:.0f} s per epoch of all of them -> {schedule}")
    if expected > limit:
        why += " (less than one epoch fits: the budget will be overrun)"
    return {"epochs": epochs, "steps_per_epoch": steps, "seconds_left": seconds_left,
            "safety": safety, "workers": workers, "overhead_seconds": fixed,
            "epoch_seconds_all_runs": per_epoch, "expected_seconds": expected, "runs": runs,
            "why": why}


def schedule_text(plan):
    """ "6 epochs" or "7 epochs of 819 steps" for a retraining plan (compare.json's
    epochs_plan; older ones and --epochs=N have no steps_per_epoch)."""
    plan = plan or {}
    e = plan.get("epochs")
    if e is None:
        return "? epochs"
    text = f"{e} epoch{'s' if e != 1 else ''}"
    steps, full = plan.get("steps_per_epoch"), plan.get("full_pass_steps")
    if steps and full and steps < full:
        text += f" of {steps} steps"
    return text


# ---- the plain CNN ---------------------------------------------------------------------------
CNN_OP = "conv_3x3"


def plain_cnn(template, n_patterns, target_params):
    """A plain CNN as a genotype: the template's cell layout, each cell a chain of
    3x3 convolutions (x -> node 0 -> ... -> last node, no skip inputs), its stem
    width chosen so that its parameters come closest to `target_params`.

    template: a genotype of the comparison (input shape, classes, nodes, patterns,
    stem stride). The space is the template's when it has conv_3x3, else "small"
    (the genotype names its own space; a fixed run builds what the genotype says).
    """
    space = template.space if CNN_OP in space_lib.space_ops(template.space) else "small"
    best = None
    for scale in range(1, 4 * template.scale + 1):
        g = _cnn(template, space, n_patterns, scale)
        gap = abs(memory_lib.estimate(g, 1)["params"] - target_params)
        if best is None or gap < best[0]:
            best = (gap, g)
    return best[1]


def _cnn(template, space, n_patterns, scale):
    nodes = template.nodes
    cells, channels, c = [], scale, 0
    for p in range(max(1, n_patterns)):
        for code in genotype_lib.pattern_codes(template.patterns, p):
            kind = "reduction" if code[0] == "r" else "normal"
            if kind == "reduction":
                channels *= 2
            chain = ["x"] + list(range(nodes))
            edges = tuple(genotype_lib.Edge(src, dst, ((CNN_OP, 1.0),))
                          for src, dst in zip(chain, chain[1:]))
            cells.append(genotype_lib.Cell(kind=kind, channels=channels, nodes=nodes,
                                           aux=code.endswith("a"), inputs=(), edges=edges))
            c += 1
    return genotype_lib.Genotype(space=space, input_shape=tuple(template.input_shape),
                                 num_classes=template.num_classes, scale=scale, nodes=nodes,
                                 patterns=template.patterns, cells=tuple(cells),
                                 stem_stride=template.stem_stride).validate()


# ---- statistics and the verdict -------------------------------------------------------------
RULE = ("A search beats the random baseline at matched size when its mean test accuracy minus "
        "one standard deviation over seeds is above the random networks' mean plus one "
        "standard deviation (the mean ± std intervals do not overlap); it is worse when the "
        "reverse holds, and otherwise the difference is within the seed spread. Standard "
        "deviations are sample ones (n - 1); the rule needs at least two seeds of each.")


def mean_std(values):
    """{"n", "mean", "std"} of the finite numbers in `values`; std needs two (else None)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(vals), "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else None}


def versus_random(search_accuracies, random_accuracies):
    """The verdict of RULE: {"verdict": beats|worse|within spread|undetermined, ...}."""
    s, r = mean_std(search_accuracies), mean_std(random_accuracies)
    out = {"search": s, "random": r}
    if s["n"] < 2 or r["n"] < 2:
        out["verdict"] = "undetermined"
        out["why"] = (f"needs at least two seeds of each (has {s['n']} searched and {r['n']} "
                      f"random)")
        return out
    lo_s, hi_s = s["mean"] - s["std"], s["mean"] + s["std"]
    lo_r, hi_r = r["mean"] - r["std"], r["mean"] + r["std"]
    if lo_s > hi_r:
        out["verdict"], rel = "beats", ">"
    elif lo_r > hi_s:
        out["verdict"], rel = "worse", "<"
    else:
        out["verdict"], rel = "within spread", "overlaps"
    out["why"] = (f"[{lo_s:.4f}, {hi_s:.4f}] {rel} [{lo_r:.4f}, {hi_r:.4f}]")
    return out


# Two-sided 95% quantiles of Student's t by degrees of freedom (standard tables); above 30
# the Cornish-Fisher term z + (z^3 + z) / (4 df), within 0.004 of the table from 31 on.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df):
    """The two-sided 95% quantile of Student's t with `df` (>= 1) degrees of freedom."""
    if df < 1:
        raise ValueError(f"df={df}; expected >= 1")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4.0 * df)


PAIRED = ("Paired by seed: a found network and the random network matched to it share their "
          "seed (data order, augmentation, initialisation), so each seed gives one difference "
          "found - random; the mean difference is shown with its 95% Student t interval over "
          "the seeds. An interval above 0 says the search gains at this budget, one across 0 "
          "that these seeds cannot tell.")


def accuracies_by_seed(per_run, method):
    """{seed: test accuracy or None} of `method`'s rows in a comparison's per-run table."""
    return {r["seed"]: r.get("test_accuracy") for r in per_run if r["method"] == method}


def paired_differences(search_by_seed, random_by_seed):
    """{"n", "seeds", "differences", "mean", "std", "ci95", "wins", "verdict"} of the seeds
    with both a found and a random accuracy (dicts seed -> accuracy or None)."""
    seeds = sorted(k for k in search_by_seed
                   if _finite(search_by_seed[k]) and _finite(random_by_seed.get(k)))
    diffs = [float(search_by_seed[k]) - float(random_by_seed[k]) for k in seeds]
    stats = mean_std(diffs)
    out = {"n": len(diffs), "seeds": seeds, "differences": diffs, "mean": stats["mean"],
           "std": stats["std"], "wins": sum(d > 0 for d in diffs), "ci95": None}
    if stats["std"] is None:
        out["verdict"] = "undetermined"
        return out
    half = t95(len(diffs) - 1) * stats["std"] / math.sqrt(len(diffs))
    lo, hi = stats["mean"] - half, stats["mean"] + half
    out["ci95"] = [lo, hi]
    out["verdict"] = "gains" if lo > 0 else "loses" if hi < 0 else "cannot tell"
    return out


def _finite(v):
    return v is not None and math.isfinite(float(v))


def paired_line(p):
    """One sentence of a paired_differences dict, in points."""
    if p["n"] == 0:
        return "no seed has both a found and a random network"
    mean = f"{100 * p['mean']:+.2f} points over {p['n']} seed(s), found higher for {p['wins']}"
    if p["ci95"] is None:
        return f"{mean} (one seed: no interval)"
    lo, hi = p["ci95"]
    what = {"gains": "above 0: the search gains", "loses": "below 0: the search loses",
            "cannot tell": "across 0: these seeds cannot tell"}[p["verdict"]]
    return f"{mean}; 95% interval [{100 * lo:+.2f}, {100 * hi:+.2f}], {what}"


def summarize(method, runs):
    """One row of the table: means over the method's finished runs (one per seed)."""
    done = [r for r in runs if r.get("test_accuracy") is not None]
    acc = mean_std(r["test_accuracy"] for r in done)

    def mean_of(key):
        vals = [r[key] for r in done if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None
    return {"method": method, "runs": len(runs), "n": acc["n"], "accuracy_mean": acc["mean"],
            "accuracy_std": acc["std"], "params": mean_of("params"), "flops": mean_of("flops"),
            "memory_mb": mean_of("memory_mb"), "memory_measured_mb": mean_of("memory_measured_mb"),
            "int8_latency_ms": mean_of("int8_latency_ms"),
            "search_seconds": mean_of("search_seconds"),
            "total_seconds": mean_of("total_seconds"), "epochs": mean_of("epochs"),
            "seeds": [r.get("seed") for r in done],
            "failed": [r["name"] for r in runs if r.get("test_accuracy") is None]}


# ---- the report --------------------------------------------------------------------------------
def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def _mb(v):
    return "–" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _n(count, word):
    return f"{count} {word}{'' if count == 1 else 'es' if word.endswith('h') else 's'}"


def _acc(row):
    if row["accuracy_mean"] is None:
        return "–"
    text = f"{100 * row['accuracy_mean']:.2f}%"
    return text + (f" ± {100 * row['accuracy_std']:.2f}" if row["accuracy_std"] is not None else
                   " (one run)")


def _eng(v):
    if v is None:
        return "–"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def markdown(result):
    """compare.md from the compare.json dict."""
    s, split, plan = result["settings"], result["split"], result.get("epochs_plan") or {}
    first = s.get("first_seed", 0)
    lines = ["# Is the search worth it on this data?", "",
             f"Command: `{' '.join(result.get('command') or [])}`", "",
             f"Dataset `{s.get('dataset')}`, configuration `{s['flagfile']}`"
             + (f" with `{' '.join(s['passthrough'])}`" if s["passthrough"] else "")
             + f"; strategies {', '.join(s['strategies'])}; seeds "
             f"{first}..{first + s['seeds'] - 1}; every retraining {schedule_text(plan)} "
             f"from scratch with the same schedule "
             f"(`train/train.py --strategy=fixed` / `--strategy=random`).", "",
             "## Verdict", ""]
    for v in result.get("verdicts", []):
        name, verdict = v["strategy"], v["verdict"]
        s_, r_ = v["search"], v["random"]
        fig = (f"{100 * s_['mean']:.2f}% ± {_pct(s_['std'])} vs {100 * r_['mean']:.2f}% ± "
               f"{_pct(r_['std'])}" if s_["mean"] is not None and r_["mean"] is not None else
               "missing runs")
        text = {"beats": "**beats** random networks of matched size beyond the seed spread",
                "worse": "is **worse** than random networks of matched size beyond the seed "
                         "spread",
                "within spread": "does **not** beat random networks of matched size beyond the "
                                 "seed spread",
                "undetermined": "cannot be judged"}[verdict]
        lines.append(f"- **{name}** {text} ({fig}; {v['why']}).")
        if v.get("paired"):
            lines.append(f"  Paired by seed, found - random: {paired_line(v['paired'])}.")
    lines += ["", f"Rule: {RULE}", "", PAIRED, "", "## Results", "",
              "| method | runs | test accuracy | parameters | FLOPs | training memory MB "
              "(predicted / measured) | int8 latency ms, batch 1 | search s | total s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['n']}/{row['runs']} | {_acc(row)} | {_eng(row['params'])} | "
            f"{_eng(row['flops'])} | {_mb(row['memory_mb'])} / "
            f"{_mb(row['memory_measured_mb'])} | {_f(row['int8_latency_ms'], '.2f')} | "
            f"{_f(row['search_seconds'], '.0f')} | {_f(row['total_seconds'], '.0f')} |")
    lines += ["",
              "Means over seeds (± sample standard deviation). FLOPs are multiply-adds per "
              "image; training memory is the analytical estimate at the run's batch size and "
              "the allocator peak measured on a training step; latency is the median of "
              f"{result.get('latency_runs', '?')} single-image calls of model_int8.tflite "
              "(ai-edge-litert, one thread). Search s: the wall-clock of the run that found the "
              "network (the KerasTuner run for its row); total s: that plus the retraining's.",
              "", "![accuracy against parameters](accuracy_vs_params.png)",
              "![accuracy against wall-clock](accuracy_vs_seconds.png)", "",
              "## Budget", ""]
    lines += [f"- {w}" for w in split["why"]]
    if plan:
        lines.append(f"- retraining epochs: {plan['why']}")
    used = result.get("elapsed_seconds")
    if used is not None:
        lines.append(f"- used {used:.0f} s of {split['total_seconds']:.0f} s "
                     f"({used / split['total_seconds']:.0%})")
    failed = [f"`{name}`: {r.get('error') or r.get('status')}"
              for name, r in sorted(result.get("runs", {}).items())
              if r.get("status") not in ("done",)]
    if failed:
        lines += ["", "## Sub-runs that did not finish", ""] + [f"- {f}" for f in failed]
    lines += ["", "Every sub-run is a run directory here (its report.md, metrics.json, "
              "genotype.json); `compare.json` holds every figure of this page and the plan."]
    return "\n".join(lines) + "\n"


def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}"


def plot(result, out_dir):
    """accuracy_vs_params.png and accuracy_vs_seconds.png; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    markers = "osD^vP*Xh<>"
    paths = []
    for key, name, label, log in (("params", "accuracy_vs_params.png", "parameters", True),
                                  ("total_seconds", "accuracy_vs_seconds.png",
                                   "wall-clock of search + retraining (s)", False)):
        fig = Figure(figsize=(6.4, 4.4), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, row in enumerate(result["rows"]):
            runs = [r for r in result["per_run"] if r["method"] == row["method"]
                    and r.get("test_accuracy") is not None and r.get(key) is not None]
            if not runs:
                continue
            colour = f"C{i % 10}"
            ax.scatter([r[key] for r in runs], [100 * r["test_accuracy"] for r in runs],
                       color=colour, alpha=0.35, s=18, marker=markers[i % len(markers)])
            if row[key] is not None:
                # Hollow markers: methods at the same point (a random network as large
                # as the found one, at the same accuracy) all stay visible.
                ax.errorbar([row[key]], [100 * row["accuracy_mean"]],
                            yerr=[100 * (row["accuracy_std"] or 0.0)], color=colour,
                            marker=markers[i % len(markers)], markersize=7 + 3 * (i % 3),
                            fillstyle="none", markeredgewidth=1.6, capsize=4,
                            label=row["method"])
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"test accuracy against {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path)
        paths.append(path)
    return paths
