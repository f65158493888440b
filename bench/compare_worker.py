r"""A worker of bench/compare.py's trial queue: runs the sub-runs its chief hands out.

    KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8470 KERASTUNER_TUNER_ID=w1 \
        python bench/compare_worker.py

compare.py --workers=N starts N of these on its own machine. To use more machines,
start the chief with KERASTUNER_TUNER_ID=chief and the address and port it serves
at, --workers counting every worker and --local_workers those it starts itself, then
start this script on each other machine with the same address and port and an id
of its own (KerasTuner's distributed-tuning variables). Every machine needs the
repository, its environment and the comparison's paths at the same place (a shared
filesystem). The worker stops when the chief says the comparison is done; a
worker stopped early gives its sub-run up, and the chief's rerun resumes it.
"""

import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from bonsai_tf import cli  # noqa: E402
from bonsai_tf import trial_queue  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("threads", "auto", "TensorFlow threads of every sub-run as INTER,INTRA "
                    "(passed as its --threads unless the comparison sets it), or auto: the "
                    "sub-runs' own choice for the whole machine.")
flags.DEFINE_string("directory", os.path.join(tempfile.gettempdir(), "bonsai_tf_workers"),
                    "Where KerasTuner keeps this worker's own small state files.")
flags.DEFINE_float("poll_seconds", trial_queue.POLL_SECONDS, "Wait between asks while the "
                   "chief has no sub-run to hand out (its next phase waits on running ones).")


def main(argv):
    if len(argv) > 1:
        return cli.error(ValueError(f"unexpected arguments {argv[1:]}; expected only --flags"))
    if FLAGS.threads != "auto" and len(FLAGS.threads.split(",")) != 2:
        return cli.error(ValueError(f"--threads={FLAGS.threads!r}; expected auto or "
                                    f"INTER,INTRA"))
    if not FLAGS.poll_seconds > 0:
        return cli.error(ValueError(f"--poll_seconds={FLAGS.poll_seconds}; expected > 0"))
    extra = [] if FLAGS.threads == "auto" else [f"--threads={FLAGS.threads}"]
    try:
        ran = trial_queue.run_worker(FLAGS.directory, trial_queue.subprocess_launcher,
                                     FLAGS.poll_seconds, extra)
    except ValueError as e:
        return cli.error(e)
    print(f"done: ran {len(ran)} sub-run(s): {', '.join(ran) or 'none'}")
    return 0


if __name__ == "__main__":
    app.run(main)
