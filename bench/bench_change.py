"""What one structural change of a search costs, written to bench/results/.

    python bench/bench_change.py                                 # the quick configuration's supernet
    python bench/bench_change.py --run_dir=runs/fmnist_quick      # a run's network as its search ended

After a deadhead or a growth the search rebuilds its network and TensorFlow traces and
prepares the new training and validation steps. This times each part on one network,
rebuilt `--repeats` times (a rebuild of the same size every time, as a deadhead's is):
the rebuild itself, the training step's trace, its first call (the runtime preparing the
traced graph), the validation step's trace and its first call, each against a call on a
graph already traced. Python's garbage is collected before every repeat so that a full
collection does not land in one part at random. The figures carry the machine's identity
and calibration (bench/calibrate.py): compare ratios measured on one machine.

Without --run_dir the network is the quick flagfile's supernet (28x28x1, stem stride 2,
scale 16, 2 nodes, the `small` set, 3 patterns) with every operation on, larger than a
settled search's: give a run directory to time what a real search rebuilt at its end.
"""

import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import bonsai_tf  # noqa: E402,F401  (before TensorFlow: its oneDNN default applies)

flags.DEFINE_string("run_dir", "", "A run directory (config.json, genotype.json): time its "
                    "network as its search ended. Empty: the synthetic supernet below.")
flags.DEFINE_string("shape", "28x28x1", "Input shape HxWxC (without --run_dir).")
flags.DEFINE_integer("scale", 16, "Stem channels (without --run_dir).")
flags.DEFINE_integer("nodes", 2, "Nodes per cell (without --run_dir).")
flags.DEFINE_string("space", "small", "Operation set (without --run_dir).")
flags.DEFINE_string("pattern_spec", '[["n"],["r"]]', "Pattern list, JSON (without --run_dir).")
flags.DEFINE_integer("patterns", 3, "Patterns of the supernet (without --run_dir).")
flags.DEFINE_integer("stem_stride", 2, "Stem stride (without --run_dir).")
flags.DEFINE_integer("batch", 64, "Training batch (without --run_dir: the run's own).")
flags.DEFINE_integer("val_batch", 256, "Validation batch (the engine's).")
flags.DEFINE_integer("repeats", 5, "Rebuilds timed; the figures are their medians.")
flags.DEFINE_string("out", "bench/results/change_cost.json", "Where to write the figures.")
FLAGS = flags.FLAGS

PARTS = ("rebuild", "train_trace", "train_first_call", "eval_trace", "eval_first_call")


def _synthetic_config(scale, nodes, space, pattern_spec, stem_stride, batch):
    from bonsai_tf import config as config_lib
    return config_lib.RunConfig(scale=scale, nodes=nodes, space=space, patterns=pattern_spec,
                                batch_size=batch, stem_stride=stem_stride, epochs=1,
                                search_epochs=1, measure_memory=False)


def _load_run(run_dir):
    """(RunConfig, Genotype) of a run directory, with explicit errors."""
    import dataclasses
    from bonsai_tf import config as config_lib
    from bonsai_tf import genotype as genotype_lib
    paths = [os.path.join(run_dir, name) for name in ("config.json", "genotype.json")]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"--run_dir={run_dir}: missing {', '.join(missing)}; expected a run "
                         f"directory written by train/search.py or train/train.py")
    with open(paths[0]) as f:
        cfg = config_lib.RunConfig.from_dict(json.load(f))
    # Memory is not what is timed here, and no budget is kept: the phase is the search's.
    cfg = dataclasses.replace(cfg, measure_memory=False, time_budget_minutes=0.0, epochs=1,
                              search_epochs=1)
    return cfg, genotype_lib.Genotype.load(paths[1])


def time_changes(cfg, genotype, repeats, val_batch=256):
    """Times `repeats` rebuilds of `genotype` under `cfg`; returns a JSON-able dict."""
    import numpy as np
    import tensorflow as tf
    from bonsai_tf import data as data_lib
    from bonsai_tf import engine
    from bonsai_tf import genotype as genotype_lib
    import synthetic

    x, y, info = synthetic.images(genotype.input_shape, max(cfg.batch_size, val_batch),
                                  genotype.num_classes)
    splits = data_lib.Splits(train=(x, y), val=(x, y), test=(x, y), info=info)
    with tempfile.TemporaryDirectory() as tmp:
        run = engine.Run(cfg, splits, tmp, verbose=0, exports=False)
        run.prepare(genotype=genotype)
        run._set_lrs(0)
        xb = tf.constant(x[:cfg.batch_size], tf.float32)
        yb = tf.constant(y[:cfg.batch_size], tf.int64)
        xv, yv = tf.constant(x[:val_batch], tf.float32), tf.constant(y[:val_batch], tf.int64)
        inputs = {k: tf.constant(v, tf.float32)
                  for k, v in run.strategy.step_inputs(run.net).items()}

        def clock(fn):
            started = time.perf_counter()
            out = fn()
            return time.perf_counter() - started, out

        rows = []
        for _ in range(repeats + 1):     # the first builds what every later one reuses
            g = genotype_lib.Genotype.from_dict(run.state.genotype)
            gc.collect()
            row = {}
            row["rebuild"], _ = clock(lambda: run._rebuild(g))
            row["train_trace"], concrete = clock(
                lambda: run.train_step.get_concrete_function(xb, yb, inputs))
            row["train_first_call"], _ = clock(
                lambda: run.train_step(xb, yb, inputs)["loss"].numpy())
            row["train_call"], _ = clock(lambda: run.train_step(xb, yb, inputs)["loss"].numpy())
            row["eval_trace"], _ = clock(lambda: run.eval_step.get_concrete_function(xv, yv))
            row["eval_first_call"], _ = clock(lambda: run.eval_step(xv, yv)["correct"].numpy())
            row["eval_call"], _ = clock(lambda: run.eval_step(xv, yv)["correct"].numpy())
            row["train_graph_ops"] = len(concrete.graph.get_operations())
            rows.append(row)
        rows = rows[1:]
        median = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        # What the change costs beyond ordinary calls: the first calls' excess over later ones.
        change = (median["rebuild"] + median["train_trace"]
                  + max(0.0, median["train_first_call"] - median["train_call"])
                  + median["eval_trace"]
                  + max(0.0, median["eval_first_call"] - median["eval_call"]))
        return {"phase": run.state.phase, "cells": len(genotype.cells),
                "operations": genotype.num_ops(), "params": run.net.count_params(),
                "batch": cfg.batch_size, "val_batch": val_batch, "repeats": repeats,
                "median": median, "change_seconds": change, "rows": rows}


def main(argv):
    del argv
    import calibrate
    import synthetic
    from bonsai_tf import machine
    machine.configure_threads()
    if FLAGS.repeats < 1:
        raise SystemExit(f"--repeats={FLAGS.repeats}; expected >= 1")
    if FLAGS.run_dir:
        cfg, g = _load_run(FLAGS.run_dir)
        source = {"run_dir": os.path.abspath(FLAGS.run_dir)}
    else:
        shape = tuple(int(v) for v in FLAGS.shape.split("x"))
        spec = json.loads(FLAGS.pattern_spec)
        cfg = _synthetic_config(FLAGS.scale, FLAGS.nodes, FLAGS.space, spec, FLAGS.stem_stride,
                                FLAGS.batch)
        g = synthetic.supernet(FLAGS.space, shape, FLAGS.scale, FLAGS.nodes, spec,
                               FLAGS.patterns, FLAGS.stem_stride)
        source = {"synthetic": {"shape": list(shape), "scale": FLAGS.scale,
                                "nodes": FLAGS.nodes, "space": FLAGS.space,
                                "pattern_spec": spec, "patterns": FLAGS.patterns,
                                "stem_stride": FLAGS.stem_stride}}
    r = time_changes(cfg, g, FLAGS.repeats, FLAGS.val_batch)
    m = r["median"]
    print(f"{r['phase']} network: {r['cells']} cells, {r['operations']} operations, "
          f"{r['params']:,} parameters, training step {int(m['train_graph_ops'])} graph ops")
    for part in PARTS:
        print(f"  {part:<18} {m[part]:.3f} s")
    print(f"  (calls once traced: training {m['train_call']:.3f} s, validation "
          f"{m['eval_call']:.3f} s)")
    print(f"one change: {r['change_seconds']:.2f} s (medians of {FLAGS.repeats})")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"machine": calibrate.describe(), "source": source, **r}, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
