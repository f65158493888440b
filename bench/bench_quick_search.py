"""The Fashion-MNIST quick search, end to end, with its figures written to a file.

    python bench/bench_quick_search.py            # -> bench/results/fmnist_quick.json

Runs train/configs/fmnist_quick.flags (search, final training, export) in a fresh
run directory and records test accuracy, parameters, cells, search and total wall
time, and the exported models' figures, with the machine and commit they came from.
"""

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    out_dir = os.path.join(ROOT, "runs", "bench_fmnist_quick")
    result = os.path.join(ROOT, "bench", "results", "fmnist_quick.json")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    import runner  # noqa: E402  (flags are defined on import)
    import calibrate  # noqa: E402
    started = time.time()
    status = runner.main([sys.argv[0], f"--flagfile={ROOT}/train/configs/fmnist_quick.flags",
                          f"--output_dir={out_dir}", "--verbose=0", *sys.argv[1:]])
    wall = time.time() - started
    if status != 0:
        return status
    with open(os.path.join(out_dir, "metrics.json")) as f:
        metrics = json.load(f)
    records = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    export = {}
    if os.path.exists(os.path.join(out_dir, "export.json")):
        with open(os.path.join(out_dir, "export.json")) as f:
            export = json.load(f)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    figures = {
        "config": "train/configs/fmnist_quick.flags", "commit": commit,
        "machine": calibrate.describe(),
        "test_accuracy": metrics["test_accuracy"], "params": metrics["params"],
        "cells": metrics["cells"], "operations": metrics.get("operations"),
        "genotype_hash": metrics["genotype_hash"],
        "search_seconds": metrics["search_seconds"],
        "train_seconds": metrics["total_seconds"],
        "wall_seconds_with_export": wall,
        "events": [e for r in records for e in r.get("events", [])],
        "export": export.get("artifacts", export),
    }
    os.makedirs(os.path.dirname(result), exist_ok=True)
    with open(result, "w") as f:
        json.dump(figures, f, indent=1)
    print(json.dumps({k: v for k, v in figures.items() if k not in ("events", "export")}, indent=1))
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
