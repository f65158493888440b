"""Stand-ins for search.py, tune.py and train.py: they write what each entry script
would for bench/compare.py, instantly and deterministically (no TensorFlow).

Used in-process by test_compare's FakeScripts launcher, and as scripts of their own
(`python fake_subrun.py search.py ARGS...`) where compare.py's worker processes run
them. FAKE_KILL_WORKER=NAME makes the first run of sub-run NAME kill its parent (the
worker that launched it), as a worker lost mid-job.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bonsai_tf import genotype as G  # noqa: E402
from bonsai_tf import memory as M  # noqa: E402
from bonsai_tf import run_dir as rd  # noqa: E402

# The stand-in's test accuracies: bonsai's found networks clearly beat their random
# baselines; asap's do not (within the seed spread).
ACCURACY = {("bonsai", "fixed"): 0.90, ("bonsai", "random"): 0.80,
            ("asap", "fixed"): 0.85, ("asap", "random"): 0.85}


def small_genotype(patterns=1, scale=4):
    return G.initial("small", (12, 12, 1), 3, scale, 1, [["n"], ["r"]], patterns).canonical()


def parse(script, args):
    a = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
    a["script"], a["args"] = os.path.basename(script), list(args)
    return a


def write(a):
    """Writes sub-run `a`'s (parse()'s dict) outputs into its --output_dir."""
    out = a["output_dir"]
    name = os.path.basename(out)
    os.makedirs(out, exist_ok=True)
    seed = int(a.get("seed", 0))
    if a["script"] == "search.py":
        g = small_genotype(patterns=1 + seed % 2)
        rd.atomic_write(os.path.join(out, "genotype.json"), g.to_json())
        rd.write_metrics(os.path.join(out, "metrics.jsonl"), [
            {"phase": "search", "step_seconds": 0.05, "steps": 4, "epoch_seconds": 0.5,
             "events": []},
            {"phase": "final", "step_seconds": 0.01, "steps": 4, "epoch_seconds": 0.1,
             "events": ["final network: search finished"]},
            {"phase": "final", "step_seconds": 0.01, "steps": 4, "epoch_seconds": 0.1,
             "events": []}])
        rd.write_json(os.path.join(out, "metrics.json"), {
            "test_accuracy": 0.5, "params": M.estimate(g, 1)["params"],
            "flops": M.estimate(g, 1)["flops"], "total_seconds": 0.7})
    elif a["script"] == "tune.py":
        g = small_genotype(patterns=2)
        rd.atomic_write(os.path.join(out, "genotype.json"), g.to_json())
        rd.write_json(os.path.join(out, "metrics.json"), {
            "train_examples": 96, "val_examples": 20, "test_examples": 24,
            "params_estimate": M.estimate(g, 1)["params"], "best_val_accuracy": 0.7})
    else:
        g = G.Genotype.load(a["genotype"])
        strategy = name.split("-")[1]
        acc = ACCURACY.get((strategy, a["strategy"]), 0.75) + 0.01 * seed
        rd.write_json(os.path.join(out, "metrics.json"), {
            "test_accuracy": acc, "params": M.estimate(g, 1)["params"],
            "flops": M.estimate(g, 1)["flops"], "memory_mb": M.estimate(g, 16)["mb"],
            "memory_measured_mb": 3.0, "epochs": int(a["epochs"]), "total_seconds": 0.1})
        rd.write_json(os.path.join(out, "export.json"), {})


def main(script, args):
    a = parse(script, args)
    name = os.path.basename(a["output_dir"])
    marker = os.path.join(a["output_dir"], "killed-worker")
    if os.environ.get("FAKE_KILL_WORKER") == name and not os.path.exists(marker):
        os.makedirs(a["output_dir"], exist_ok=True)
        open(marker, "w").close()
        os.kill(os.getppid(), signal.SIGKILL)
        return 1
    write(a)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
