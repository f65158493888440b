"""Inference latency of a finished run's model on this CPU, in its four deployable forms.

  python bench/bench_inference.py --run_dir=runs/fmnist_bonsai_s0

Times, at each --batch_sizes (default 1 and 64), the median of --runs calls after
--warmup calls of:

  keras        the Keras model (model.keras) called inside one tf.function
               (float32 input; not model.predict, whose per-call overhead is not the model's)
  saved_model  the exported SavedModel's serving_default signature (uint8 input)
  tflite       model.tflite with ai-edge-litert (set input, invoke, read output)
  tflite_int8  model_int8.tflite likewise

Every call includes reading its result back to numpy.  The exported artifacts of the
run are used when export.json says they belong to its model.keras; otherwise they
are built in a temporary directory (the run directory is never written), the int8
model then calibrated on random images, which changes its accuracy but not its
speed.  Figures go to --out (default bench/results/inference.json) and a table to
stdout.  Bad input prints one line ``error: ...`` and exits with status 2.
"""

import datetime
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runnable as `python bench/bench_inference.py` from the repository root without installing.
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from bonsai_tf import cli  # noqa: E402
from bonsai_tf import export as export_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "Directory of a finished run (model.keras, metrics.json).")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes to time.")
flags.DEFINE_integer("runs", 50, "Timed calls per model and batch size (the median is reported).")
flags.DEFINE_integer("warmup", 5, "Untimed calls first (tracing, allocation, caches).")
flags.DEFINE_integer("num_threads", 0, "Threads for TensorFlow (intra-op) and TFLite; "
                     "0 = TensorFlow's default (all cores) and all cores for TFLite.")
flags.DEFINE_string("out", os.path.join(REPO, "bench", "results", "inference.json"),
                    "Where to write the figures (JSON).")

MODELS = ("keras", "saved_model", "tflite", "tflite_int8")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _exported_artifacts(run_dir):
    """Paths of the run's exported artifacts if export.json vouches for its model.keras."""
    export_json = os.path.join(run_dir, export_lib.EXPORT_FILE)
    if not os.path.isfile(export_json):
        return None
    try:
        with open(export_json) as f:
            recorded = json.load(f)["artifacts"][export_lib.MODEL_FILE].get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if recorded != export_lib.sha256_file(os.path.join(run_dir, export_lib.MODEL_FILE)):
        return None  # exported from an earlier model.keras
    paths = {name: os.path.join(run_dir, f) for name, f in (
        ("saved_model", export_lib.SAVED_MODEL_DIR), ("tflite", export_lib.TFLITE_FILE),
        ("tflite_int8", export_lib.TFLITE_INT8_FILE))}
    return paths if all(os.path.exists(p) for p in paths.values()) else None


def _build_artifacts(model, image_shape, directory):
    import numpy as np
    import tensorflow as tf

    module = export_lib.serving_module(model, image_shape)
    paths = {name: os.path.join(directory, f) for name, f in (
        ("saved_model", export_lib.SAVED_MODEL_DIR), ("tflite", export_lib.TFLITE_FILE),
        ("tflite_int8", export_lib.TFLITE_INT8_FILE))}
    tf.saved_model.save(module, paths["saved_model"],
                        signatures={export_lib.SIGNATURE: module.serve.get_concrete_function()})
    with open(paths["tflite"], "wb") as f:
        f.write(export_lib.tflite_float(model, image_shape))
    # Calibration only sets quantization ranges; latency does not depend on them.
    random_images = np.random.default_rng(0).integers(0, 256, (32, *image_shape), np.uint8)
    with open(paths["tflite_int8"], "wb") as f:
        f.write(export_lib.tflite_int8(model, image_shape, random_images))
    return paths


def _time(fn, warmup, runs):
    import numpy as np

    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    ms = np.asarray(seconds) * 1000.0
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean())}


def bench(run_dir, batch_sizes, runs, warmup, num_threads):
    """Times the four forms of run_dir's model; returns the figures as a dict."""
    import numpy as np
    import tensorflow as tf

    if num_threads:
        # Must precede the first TensorFlow op of the process.
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
    model = export_lib.load_keras_model(os.path.join(run_dir, export_lib.MODEL_FILE))
    image_shape = tuple(int(v) for v in model.inputs[0].shape[1:])

    keras_fn = tf.function(lambda x: export_lib.model_logits(model, x),
                           input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
    with tempfile.TemporaryDirectory() as tmp:
        paths = _exported_artifacts(run_dir)
        source = "exported"
        if paths is None:
            source = "built by the bench (run not exported; int8 calibrated on random images)"
            paths = _build_artifacts(model, image_shape, tmp)
        saved = export_lib.SavedModelClassifier(paths["saved_model"])
        lite = {name: export_lib.TFLiteClassifier(paths[name], num_threads=num_threads or None)
                for name in ("tflite", "tflite_int8")}

        rng = np.random.default_rng(0)
        results = []
        for batch in batch_sizes:
            images = rng.integers(0, 256, (batch, *image_shape), np.uint8)
            as_float = tf.constant(images.astype(np.float32))
            calls = {
                "keras": lambda: keras_fn(as_float).numpy(),
                "saved_model": lambda: saved.run_batch(images),
                "tflite": lambda: lite["tflite"].run_batch(images),
                "tflite_int8": lambda: lite["tflite_int8"].run_batch(images),
            }
            for name in MODELS:
                figures = _time(calls[name], warmup, runs)
                figures.update(model=name, batch=batch,
                               images_per_s=batch / (figures["median_ms"] / 1000.0))
                results.append(figures)
        sizes = {name: (export_lib.tree_size(p) if os.path.isdir(p) else os.path.getsize(p))
                 for name, p in paths.items()}

    return {
        "run_dir": os.path.abspath(run_dir),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                 "platform": platform.platform()},
        "tensorflow": tf.__version__,
        "num_threads": num_threads or "default",
        "runs": runs, "warmup": warmup,
        "artifacts": source,
        "params": int(sum(int(np.prod(v.shape)) for v in model.trainable_weights)),
        "size_bytes": {"keras": os.path.getsize(os.path.join(run_dir, export_lib.MODEL_FILE)),
                       **sizes},
        "results": results,
    }


def format_table(figures):
    rows = [("model", "batch", "median ms", "p90 ms", "images/s")]
    for r in figures["results"]:
        rows.append((r["model"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
                     f"{r['images_per_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def main(argv):
    """Benchmarks --run_dir; returns the exit status (0, or 2 for bad input)."""
    argv, status = cli.parse_argv(FLAGS, argv)
    if status is not None:
        return status
    if not FLAGS.run_dir:
        return cli.error("no --run_dir given: expected --run_dir=DIR, the directory of a "
                      "finished run")
    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1:
        return cli.error(f"--batch_sizes={','.join(FLAGS.batch_sizes)}: expected positive "
                      "integers such as 1,64")
    for name in ("runs", "warmup", "num_threads"):
        if getattr(FLAGS, name) < (1 if name == "runs" else 0):
            return cli.error(f"--{name}={getattr(FLAGS, name)}: expected an integer >= "
                          f"{1 if name == 'runs' else 0}")
    try:
        export_lib.check_finished_run(FLAGS.run_dir)
        figures = bench(FLAGS.run_dir, batch_sizes, FLAGS.runs, FLAGS.warmup, FLAGS.num_threads)
    except export_lib.ExportError as e:
        return cli.error(e)
    from bonsai_tf import run_dir as rd
    try:
        rd.write_json(FLAGS.out, figures)
    except rd.RunDirError as e:
        return cli.error(e)
    print(f"{figures['run_dir']}: {figures['params']} parameters, {figures['host']['cpu']}, "
          f"{figures['num_threads']} threads, artifacts {figures['artifacts']}")
    print(format_table(figures))
    print(f"wrote {FLAGS.out}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(FLAGS))
