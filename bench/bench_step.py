"""Training throughput of the supernet step (images/s), written to bench/results/.

    python bench/bench_step.py                      # the issue's grid, bonsai7 space
    python bench/bench_step.py --scales=16 --nodes=2 --shapes=28x28x1 --steps=10

Every configuration is the full, unpruned supernet (every operation on every edge,
pruners and compression loss on), batch 64, one step = forward + backward + SGD.
--strategies=bonsai,proxyless steps the same supernet as ProxylessNAS does (a sampled
pair of operations per edge, one active): its memory is that of one sampled network.
--mixed_precision=none,mixed_bfloat16,mixed_float16 times each precision policy.
--profile_steps=N profiles N more steps and writes where their time went, by kernel type.
--devices=1,2 times the step on one device and mirrored over 2 logical CPU devices (the
CPU split at start, as --distribute=mirrored does) at the same global batch.
--workers=1,2 times it in one process and in 2 local processes under
--distribute=multi_worker (TF_CONFIG on 127.0.0.1 ports, each process given its share of
the cores as threads), at the same global batch; the chief's figures are written.
The reference point is the original PyTorch BonsaiNet (batch 64, 32x32x3, scale 16,
3 cells, all 7 operations): 11 to 16.4 s per step on 2-core machines of this kind
(../shared/BENCHMARKS.md), 7.94 s side by side with this script's 1.51 s on an AVX-512 one
and 6.48 s against 1.91 s on an AVX2 one (README, "Supernet training step";
bench/reference_step.py times the reference). Compare on one machine: the output carries
its calibration, and the two codes gain differently from a faster CPU.
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

flags.DEFINE_list("scales", ["16", "36"], "Stem channels to time.")
flags.DEFINE_list("patterns", ["1", "2"], "Pattern counts to time.")
flags.DEFINE_list("shapes", ["32x32x3", "28x28x1"], "Input shapes HxWxC.")
flags.DEFINE_integer("nodes", 4, "Nodes per cell.")
flags.DEFINE_string("space", "bonsai7", "Operation set.")
flags.DEFINE_string("pattern_spec", '[["n","na"],["r"]]', "Pattern list (JSON).")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_integer("stem_stride", 1, "Stem stride (2: the quick configuration's).")
flags.DEFINE_list("mixed_precision", ["none"], "Precision policies to time: none (float32), "
                  "mixed_float16, mixed_bfloat16.")
flags.DEFINE_list("strategies", ["bonsai"], "Strategies whose training step to time on the same "
                  "supernet (bonsai: every operation runs; proxyless: a sampled path).")
flags.DEFINE_list("devices", ["1"], "Replicas to time: 1 (one device) or N (--distribute="
                  "mirrored over N logical CPU devices), at the same global batch.")
flags.DEFINE_list("workers", ["1"], "Processes to time: 1, or N local worker processes under "
                  "--distribute=multi_worker, at the same global batch.")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration (after 2 warm-up steps).")
flags.DEFINE_bool("jit_compile", False, "Compile the step with XLA.")
flags.DEFINE_enum("graph_optimizer", "auto", ["auto", "on", "off"],
                  "TensorFlow's graph optimizer (Grappler), as --graph_optimizer of search.py.")
flags.DEFINE_integer("profile_steps", 0, "After timing, profile this many more steps of each "
                     "configuration (TensorFlow profiler) and write their kernel seconds by "
                     "operation type beside its figures (bench/profile_ops.py); 0: none.")
flags.DEFINE_string("out", "bench/results/step_throughput.json", "Where to write the figures.")
FLAGS = flags.FLAGS


def time_config(scale, patterns, shape, nodes, space, pattern_spec, batch, steps, jit,
                graph_optimizer="auto", strategy="bonsai", mixed_precision="none", stem_stride=1,
                devices=1, workers=1, profile_steps=0):
    import numpy as np
    import tensorflow as tf
    from bonsai_tf import config as config_lib
    from bonsai_tf import data as data_lib
    from bonsai_tf import engine
    from bonsai_tf import machine
    from bonsai_tf import memory as memory_lib
    import synthetic

    shape = tuple(shape)
    x, y, info = synthetic.images(shape, batch)
    splits = data_lib.Splits(train=(x, y), val=(x[:0], y[:0]), test=(x, y), info=info)
    # val_size 1 only satisfies the bi-level strategies' check: no architecture step runs.
    cfg = config_lib.RunConfig(scale=scale, nodes=nodes, space=space, patterns=pattern_spec,
                               batch_size=batch, epochs=1, search_epochs=1, jit_compile=jit,
                               drop_path=0.3, measure_memory=False,
                               graph_optimizer=graph_optimizer, strategy=strategy, val_size=1,
                               proxyless_warmup_epochs=0, mixed_precision=mixed_precision,
                               stem_stride=stem_stride,
                               distribute=("multi_worker" if workers > 1 else
                                           "mirrored" if devices > 1 else "none"),
                               devices=devices if devices > 1 else 0)
    run = engine.Run(cfg, splits, "/tmp/bench_step_unused", verbose=0)
    g = synthetic.supernet(space, shape, scale, nodes, pattern_spec, patterns, stem_stride)
    # The full supernet of `patterns` patterns; ProxylessNAS runs a sampled path of it
    # (two operations per edge, one active), so its step's memory is that of one path.
    run.prepare(genotype=g)
    run._set_lrs(0)
    xb, yb = tf.constant(x, tf.float32), tf.constant(y, tf.int64)
    if run.distributed:   # one global batch, split over the replicas once
        # (repeated: under multi_worker each worker takes its share of the batches)
        xb, yb = next(iter(run._distributed(tf.data.Dataset.from_tensors((xb, yb)).repeat())))
    inputs = {k: tf.constant(v, tf.float32) for k, v in run.strategy.step_inputs(run.net).items()}
    # The first step traces and optimises the graph: what a search pays again after
    # every structural change.
    started = time.perf_counter()
    run.train_step(xb, yb, inputs)["loss"].numpy()
    first = time.perf_counter() - started
    run.train_step(xb, yb, inputs)["loss"].numpy()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run.train_step(xb, yb, inputs)["loss"].numpy()
        times.append(time.perf_counter() - t)
    measured = memory_lib.measure_step_peak(
        lambda: run.train_step(xb, yb, inputs)["loss"].numpy())
    step = float(np.median(times))
    profiled = {}
    if profile_steps:
        import profile_ops
        profiled = {"profile": profile_ops.profile(
            lambda: run.train_step(xb, yb, inputs)["loss"].numpy(), profile_steps)}
    return {"strategy": strategy, "mixed_precision": mixed_precision, "scale": scale,
            "devices": devices, "workers": workers,
            "stem_stride": stem_stride,
            "patterns": patterns, "shape": list(shape), "nodes": nodes,
            "space": space, "cells": len(g.cells), "operations": g.num_ops(), "batch": batch,
            "params": run.net.count_params(), "seconds_per_step": step,
            "images_per_second": batch / step, "jit_compile": jit,
            "first_step_seconds": first, "graph_optimizer": graph_optimizer,
            "graph_optimizer_on": machine.graph_optimizer_on(graph_optimizer, bool(machine.gpus())),
            "memory_estimate_mb": memory_lib.estimate(g, batch)["mb"],
            "memory_measured_mb": measured.mb, "memory_measured_source": measured.source,
            **profiled}


WORKER_ENV = "BONSAI_TF_BENCH_STEP_WORKER"   # a worker process's job (JSON), set by main


def time_workers(workers, args):
    """time_config(*args) in `workers` local processes under multi_worker; the chief's result."""
    import subprocess
    import tempfile
    from bonsai_tf import distribute
    from bonsai_tf import machine
    tf_configs = distribute.local_tf_configs(workers)
    threads = max(1, machine.usable_cpus() // workers)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "chief.json")
        procs = []
        for i in range(workers):
            env = dict(os.environ, TF_CONFIG=tf_configs[i],
                       **{WORKER_ENV: json.dumps({"args": args, "threads": threads,
                                                  "out": out if i == 0 else ""})})
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"worker processes exited with {codes}; expected 0 each")
        with open(out) as f:
            return json.load(f)


def _worker():
    job = json.loads(os.environ[WORKER_ENV])
    from bonsai_tf import machine
    machine.configure_threads(job["threads"], 1)
    r = time_config(*job["args"])
    r["threads_per_worker"] = job["threads"]
    if job["out"]:
        with open(job["out"], "w") as f:
            json.dump(r, f)


def main(argv):
    del argv
    import json as _json
    import tensorflow as tf
    import calibrate
    from bonsai_tf import machine
    machine.configure_threads()
    workers = [int(w) for w in FLAGS.workers]
    devices = [int(d) for d in FLAGS.devices]
    if max(devices) > 1:
        from bonsai_tf import distribute
        distribute.split_cpu(max(devices))   # before anything starts TensorFlow's runtime
    results = []
    for shape in FLAGS.shapes:
        shape = tuple(int(v) for v in shape.split("x"))
        for scale in FLAGS.scales:
            for n, strategy, mp, d, w in [(n, s, m, d, w) for n in FLAGS.patterns
                                          for s in FLAGS.strategies
                                          for m in FLAGS.mixed_precision
                                          for d in devices for w in workers
                                          if d == 1 or w == 1]:
                args = [int(scale), int(n), list(shape), FLAGS.nodes, FLAGS.space,
                        _json.loads(FLAGS.pattern_spec), FLAGS.batch, FLAGS.steps,
                        FLAGS.jit_compile, FLAGS.graph_optimizer, strategy, mp,
                        FLAGS.stem_stride, d, w, FLAGS.profile_steps]
                r = time_workers(w, args) if w > 1 else time_config(*args)
                print(f"{strategy:>9} {mp:>14} x{d} w{w} {'x'.join(map(str, shape)):>8} scale {r['scale']:>3} patterns {n} cells "
                      f"{r['cells']} ops {r['operations']:>4}: {r['seconds_per_step']:.3f} s/step, "
                      f"{r['images_per_second']:.0f} img/s, first step {r['first_step_seconds']:.1f} s, memory est {r['memory_estimate_mb']:.0f} MB "
                      f"measured {r['memory_measured_mb'] or float('nan'):.0f} MB", flush=True)
                for kind, share in list(r.get("profile", {}).get("op_share", {}).items())[:12]:
                    print(f"    {kind:>32} {100 * share:5.1f}% "
                          f"{r['profile']['op_seconds_per_step'][kind]:.3f} s/step", flush=True)
                results.append(r)
                tf.keras.backend.clear_session()
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"machine": calibrate.describe(), "results": results}, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    if os.environ.get(WORKER_ENV):
        _worker()
    else:
        app.run(main)
