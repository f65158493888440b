"""Exports a finished run: SavedModel, float and int8 TFLite, with export.json.

  python export/export.py --run_dir=runs/fmnist_bonsai_s0

Writes into the run directory (see bonsai_tf/export.py for what each artifact takes
and returns) and prints a table of size, test accuracy and agreement with the Keras
model.  The data set is reloaded from the run's config.json for int8 calibration
(training images) and evaluation (test images).  Bad input prints one line
``error: ...`` and exits with status 2.
"""

import os
import sys

# Runnable as `python export/export.py` from the repository root without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from bonsai_tf import cli  # noqa: E402
from bonsai_tf import export as export_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "Directory of a finished run (model.keras, metrics.json).")
flags.DEFINE_integer("representative_count", 200,
                     "Training images used to calibrate the int8 model.")
flags.DEFINE_integer("seed", 0, "Seed picking the calibration images.")
flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")
flags.DEFINE_integer("num_threads", 0, "TFLite interpreter threads; 0 = all cores.")



def main(argv):
    """Exports --run_dir; returns the exit status (0, or 2 for bad input).

    Callable directly as main(["export.py", "--run_dir=DIR"]) as well as through app.run.
    """
    argv, status = cli.parse_argv(FLAGS, argv, example="--run_dir=DIR")
    if status is not None:
        return status
    if not FLAGS.run_dir:
        return cli.error("no --run_dir given: expected --run_dir=DIR, the directory of a "
                      "finished run")
    try:
        export_lib.check_finished_run(FLAGS.run_dir)
    except export_lib.ExportError as e:
        return cli.error(e)
    # Imported only now: a bad --run_dir is reported without waiting for TensorFlow.
    from bonsai_tf import data as data_lib
    from bonsai_tf import run_dir as rd
    try:
        with cli.dropping_stderr_lines(cli.EXPORT_NOISE):  # the converter's debug lines
            result = export_lib.export_run(
                FLAGS.run_dir, representative_count=FLAGS.representative_count, seed=FLAGS.seed,
                batch_size=FLAGS.batch_size, num_threads=FLAGS.num_threads or None)
    except (export_lib.ExportError, rd.RunDirError, data_lib.DataError) as e:
        return cli.error(e)
    print(format_table(result))
    print(f"wrote {os.path.join(FLAGS.run_dir, export_lib.EXPORT_FILE)}")
    return 0


def format_table(result):
    rows = [("artifact", "size", "accuracy", "max |dp|", "top-1 agree")]
    for name, a in result["artifacts"].items():
        size = a.get("size_bytes")
        diff, agree = a.get("max_abs_diff"), a.get("top1_agreement")
        rows.append((name, "-" if size is None else f"{size / 1024:.1f} KiB",
                     f"{a['accuracy']:.4f}", "-" if diff is None else f"{diff:.2e}",
                     "-" if agree is None else f"{agree:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(FLAGS))
