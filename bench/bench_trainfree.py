"""Cost of the train-free metrics (bonsai_tf.trainfree) per candidate, in seconds.

    python bench/bench_trainfree.py                              # batch 16, 28x28x1
    python bench/bench_trainfree.py --batch=64 --scale=16 --repeats=5 --output=/tmp/tf.json

SpiderNet scores every candidate mutation with these metrics before training it,
so their cost per candidate bounds how many candidates a search can afford. The
network is a small, freshly initialised bonsai supernet (every operation of
--space on every edge, pruners on, --patterns patterns); the inputs are random
pixels. Timed, each as the median of --repeats calls after one untimed first call
(whose time is reported too: a new candidate pays it, pfor's tracing included):

  ntk_pfor        ntk_condition_number with GradientTape.jacobian(experimental_use_pfor)
  ntk_loop        the same with one backward pass per example (use_pfor=False)
  linear_regions  linear_regions, recording the tf.nn.relu inputs

Figures and the machine's calibration (bench/calibrate.py; --nocalibrate skips its
few seconds) go to --output as JSON.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import bonsai_tf  # noqa: E402,F401  (before TensorFlow: its oneDNN default applies)

flags.DEFINE_string("space", "bonsai7", "Operation set.")
flags.DEFINE_string("shape", "28x28x1", "Input shape HxWxC.")
flags.DEFINE_integer("scale", 8, "Stem channels.")
flags.DEFINE_integer("nodes", 2, "Nodes per cell.")
flags.DEFINE_integer("patterns", 1, "Patterns (groups of cells) in the network.")
flags.DEFINE_string("pattern_spec", '[["n"],["r"]]', "Pattern list (JSON).")
flags.DEFINE_integer("batch", 16, "Examples per metric call (the kernel is batch x batch).")
flags.DEFINE_integer("repeats", 3, "Timed calls per metric (the median is reported).")
flags.DEFINE_list("metrics", ["ntk_pfor", "ntk_loop", "linear_regions"], "Metrics to time.")
flags.DEFINE_bool("calibrate", True, "Write the machine's calibration figure beside the times.")
flags.DEFINE_string("output", "/tmp/bench_trainfree.json", "Where to write the figures (JSON).")
FLAGS = flags.FLAGS

METRICS = ("ntk_pfor", "ntk_loop", "linear_regions")


def time_metric(fn, repeats):
    """(first call's seconds, median seconds of `repeats` further calls, last value)."""
    import numpy as np
    t = time.perf_counter()
    value = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return first, float(np.median(times)), value


def main(argv):
    del argv
    import numpy as np
    import keras
    import calibrate
    from bonsai_tf import genotype as genotype_lib
    from bonsai_tf import machine
    from bonsai_tf import network as network_lib
    from bonsai_tf import trainfree
    unknown = sorted(set(FLAGS.metrics) - set(METRICS))
    if unknown:
        raise app.UsageError(f"--metrics got {unknown}, expected some of {list(METRICS)}")
    if FLAGS.batch < 2 or FLAGS.repeats < 1:
        raise app.UsageError(f"--batch must be >= 2 and --repeats >= 1, got {FLAGS.batch}, "
                             f"{FLAGS.repeats}")
    threads = machine.configure_threads()
    keras.utils.set_random_seed(0)
    shape = tuple(int(v) for v in FLAGS.shape.split("x"))
    g = genotype_lib.initial(FLAGS.space, shape, 10, FLAGS.scale, FLAGS.nodes,
                             json.loads(FLAGS.pattern_spec), FLAGS.patterns)
    net = network_lib.Network(g, mean=(128.0,) * shape[-1], std=(64.0,) * shape[-1])
    x = np.random.RandomState(0).randint(0, 255, (FLAGS.batch,) + shape).astype(np.float32)
    calls = {
        "ntk_pfor": lambda: trainfree.ntk_condition_number(net.model, x, use_pfor=True),
        "ntk_loop": lambda: trainfree.ntk_condition_number(net.model, x, use_pfor=False),
        "linear_regions": lambda: trainfree.linear_regions(net.model, x),
    }
    _, method = trainfree.jacobian(net.model, x[:2], use_pfor=True)
    results = {}
    for name in FLAGS.metrics:
        first, median, value = time_metric(calls[name], FLAGS.repeats)
        results[name] = {"seconds_per_candidate": median, "first_call_seconds": first,
                         "value": value if np.isfinite(value) else "inf"}
        print(f"{name:>15}: {median:.3f} s/candidate (first call {first:.3f} s), value {value}",
              flush=True)
    out = {"machine": calibrate.describe() if FLAGS.calibrate else None,
           "threads_inter_intra": threads, "space": FLAGS.space, "shape": list(shape),
           "scale": FLAGS.scale, "nodes": FLAGS.nodes, "cells": len(g.cells),
           "operations": g.num_ops(), "params": net.count_params(),
           "trainable_params": int(sum(np.prod(v.shape) for v in net.model.trainable_variables)),
           "batch": FLAGS.batch, "repeats": FLAGS.repeats, "jacobian_method_with_pfor": method,
           "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
