r"""A KerasTuner random search over the operation space, under a wall-clock budget.

    python train/tune.py --flagfile=train/configs/fmnist_quick.flags \
        --time_budget_minutes=30 --output_dir=runs/fmnist-tuner

The multi-trial baseline of bench/compare.py: each trial draws a network of the
search space (bonsai_tf.tuner.GenotypeHyperModel: operations per edge, inputs per
cell, number of patterns), trains it for --trial_epochs on the search's
--train_subset and scores it on the validation split; proposals over
--memory_budget_mb are redrawn. It stops when --time_budget_minutes (counted from
the command's start, over every resumed process) is spent or after --max_trials.
The best trial's network is written as genotype.json; retrain it with
`train/train.py --genotype=DIR/genotype.json`. It takes every flag of a run (so a
search's flagfile works); the search-only ones are unused. Running the same
command again resumes. Bad input prints one line `error: ...` and exits with 2.
"""

import os
import sys
import time

STARTED = time.time()  # the budget counts from here

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402  (defines the run flags; no TensorFlow import)
from absl import flags  # noqa: E402

from bonsai_tf import cli  # noqa: E402
from bonsai_tf import config as config_lib  # noqa: E402

flags.DEFINE_integer("trial_epochs", 2, "Epochs each trial trains (on --train_subset images).")
flags.DEFINE_integer("max_trials", 0, "Most trials (0: until the time budget is spent).")
FLAGS = flags.FLAGS


def settings(cfg):
    """What identifies a tuner run: resuming it needs the same."""
    return {"config": cfg.identity(), "trial_epochs": FLAGS.trial_epochs,
            "max_trials": FLAGS.max_trials}


def _main(argv):
    argv = cli.flagfiles_first(argv)
    kind = cli.help_requested(argv)
    if kind:
        cli.print_help(FLAGS, "full")  # the run flags it shares are the point
        return 0
    try:
        rest = FLAGS(argv)[1:]
    except flags.Error as e:
        raise runner.UsageError(runner.flag_error(e)) from None
    if rest:
        raise runner.UsageError(f"unexpected arguments {rest}; expected only --flags")
    for name, low in (("trial_epochs", 1), ("max_trials", 0)):
        if getattr(FLAGS, name) < low:
            raise runner.UsageError(f"--{name}={getattr(FLAGS, name)}; expected an integer "
                                    f">= {low}")
    cfg = runner.config_from_flags()
    if cfg.time_budget_minutes <= 0 and FLAGS.max_trials <= 0:
        raise runner.UsageError("--time_budget_minutes=0 and --max_trials=0; expected a time "
                                "budget > 0 or --max_trials > 0 (the tuner must stop)")
    output_dir = FLAGS.output_dir or os.path.join(
        "runs", f"{cfg.dataset.replace(':', '_').replace('/', '_')}-tuner")
    runner.check_output_dir(output_dir)
    from bonsai_tf import data as data_lib
    from bonsai_tf import machine
    from bonsai_tf import tuner as tuner_lib
    machine.configure_threads(*(runner.parse_threads(FLAGS.threads) or (None, None)))
    splits = data_lib.load_dataset(cfg.dataset, cfg.data_dir or None, val_size=cfg.val_size,
                                   train_subset=None, seed=cfg.seed,
                                   image_size=cfg.image_size or None)
    cap = config_lib.pattern_cap(cfg, splits.info.image_shape)
    if len(splits.val[1]) == 0:  # refused before the directory is made
        raise runner.UsageError(f"--val_size={cfg.val_size} leaves no validation images; "
                                f"expected > 0 (the trials are scored on them)")
    ident = settings(cfg)
    tuner_lib.claim(output_dir, ident, FLAGS.overwrite)
    log = cli.setup_logging("bonsai_tf", os.path.join(output_dir, "log.txt"))
    log.info("dataset %s: %d training, %d validation, %d test images; tuner in %s",
             splits.info.name, len(splits.train[1]), len(splits.val[1]), len(splits.test[1]),
             output_dir)
    metrics = tuner_lib.tune(
        splits, output_dir, space=cfg.space, scale=cfg.scale, nodes=cfg.nodes,
        patterns=cfg.patterns, max_patterns=cap, stem_stride=cfg.stem_stride,
        batch_size=cfg.batch_size, lr_max=cfg.lr_max, lr_min=cfg.lr_min, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, budget_seconds=cfg.time_budget_minutes * 60.0,
        trial_epochs=FLAGS.trial_epochs, train_subset=cfg.train_subset,
        memory_budget_mb=cfg.memory_budget_mb, max_trials=FLAGS.max_trials, seed=cfg.seed,
        started=STARTED, settings=ident, overwrite=False)
    log.info("best validation accuracy %.4f after %d trials in %.0f s",
             metrics["best_val_accuracy"], metrics["trials"], metrics["seconds"])
    return 0


def main(argv):
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised unless it is bad input
        errors = runner.input_errors()
        if "bonsai_tf.tuner" in sys.modules:
            errors += (sys.modules["bonsai_tf.tuner"].TunerError,)
        if not isinstance(e, errors):
            raise
        return cli.error(e)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
