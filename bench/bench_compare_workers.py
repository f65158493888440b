r"""bench/compare.py one sub-run at a time against N worker processes, same budget.

    python bench/bench_compare_workers.py --workers=1,2 -- --minutes=12 \
        --strategies=bonsai --seeds=2 --epochs=2 --final_subset=10000

Runs the same comparison (every argument after `--` goes to compare.py) once per
worker count, each in its own output directory under --output_dir, and writes
bench/results/compare_workers.json: the machine and its calibration, then per
count the total and per-phase wall-clock, the epochs each search reached within its
share (the search side is budgeted: more workers buy more epochs, not less time),
the retraining epochs and the rows' test accuracies. With --epochs=N the
retrainings are a fixed amount of work, so their phase's wall-clock compares directly.
Runs one after the other: timing two at once would measure neither.
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from bonsai_tf import run_dir as rd  # noqa: E402

flags.DEFINE_list("workers", ["1", "2"], "Worker counts to run the comparison with.")
flags.DEFINE_string("output_dir", "runs/bench-compare-workers", "One comparison per count "
                    "in workers-N below it (a rerun continues unfinished ones).")
flags.DEFINE_string("out", "bench/results/compare_workers.json", "Where to write the figures.")
FLAGS = flags.FLAGS


def summary(out):
    """The figures of one finished comparison directory."""
    state = rd.read_json(os.path.join(out, "compare.json"))
    searches = {}
    for name in state["runs"]:
        path = os.path.join(out, name, "metrics.jsonl")
        if name.startswith("search-") and os.path.exists(path):
            searches[name] = sum(r.get("phase") == "search" for r in rd.read_metrics(path))
    return {"elapsed_seconds": state["elapsed_seconds"],
            "phase_seconds": state.get("phase_seconds"),
            "search_run_seconds": state["split"]["search_run_seconds"],
            "search_epochs": searches,
            "retrain_epochs": (state.get("epochs_plan") or {}).get("epochs"),
            "retrain_steps_per_epoch": (state.get("epochs_plan") or {}).get("steps_per_epoch"),
            "rows": {r["method"]: r.get("accuracy_mean") for r in state.get("rows", [])},
            "failed": sorted(n for n, r in state["runs"].items() if r.get("status") != "done")}


def main(argv):
    import calibrate
    passthrough = argv[1:]
    if passthrough and passthrough[0] == "--":
        passthrough = passthrough[1:]
    if any(a.startswith(("--workers", "--output_dir", "--local_workers")) for a in passthrough):
        print("error: --workers, --local_workers and --output_dir are this script's; expected "
              "them left out of compare.py's arguments", file=sys.stderr)
        return 2
    figures = {"machine": calibrate.describe(), "compare_args": passthrough, "runs": {}}
    for w in FLAGS.workers:
        out = os.path.join(FLAGS.output_dir, f"workers-{int(w)}")
        t0 = time.time()
        code = subprocess.call([sys.executable, os.path.join(REPO, "bench", "compare.py"),
                                *passthrough, f"--workers={int(w)}", f"--output_dir={out}"])
        figures["runs"][w] = {"exit": code, "command_seconds": time.time() - t0,
                              **summary(out)}
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(figures, f, indent=1)
    print(json.dumps(figures["runs"], indent=1))
    return 0


if __name__ == "__main__":
    app.run(main)
