"""Flags shared by train/search.py and train/train.py, and the run that they drive.

Flags live only here and in the entry scripts: they become a validated, frozen
`RunConfig` that is written to the run directory as config.json.
"""

import errno
import json
import os
import sys
import time

STARTED = time.time()  # the command's start: a --time_budget_minutes counts from here

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from bonsai_tf import cli  # noqa: E402  (no TensorFlow import)
from bonsai_tf import config as config_lib  # noqa: E402  (no TensorFlow import)
from bonsai_tf import distribute as distribute_lib  # noqa: E402  (no TensorFlow import)

D = config_lib.RunConfig()  # defaults: BonsaiNet's paper values
flags.DEFINE_string("dataset", D.dataset, "fashion_mnist, a TFDS image-classification name "
                    "(cifar10, cifar100, mnist, svhn_cropped, ...) or folder:PATH.")
flags.DEFINE_string("data_dir", D.data_dir, "Where the data is: IDX files, CIFAR archives or a "
                    "prepared TFDS data_dir. Nothing is downloaded.")
flags.DEFINE_string("output_dir", "", "Run directory; default runs/<dataset>-<strategy>. Running "
                    "the same command again resumes it.")
flags.DEFINE_bool("overwrite", False, "Replace a run directory made by a different configuration.")
flags.DEFINE_bool("export", True, "Export SavedModel and TFLite at the end.")
flags.DEFINE_integer("verbose", 1, "0: no progress bars; 1: a progress bar, redrawn in place on a "
                     "terminal; when stdout is not a terminal (redirected to a file) one line "
                     "per epoch instead, as 2; 2: one line per epoch.")
flags.DEFINE_enum("strategy", D.strategy, list(config_lib.STRATEGIES),
                  "bonsai: BonsaiNet search (pruning and growth); asap: ASAP search "
                  "(annealing and pruning); bayes: BayesNAS (relevance priors, Laplace updates; "
                  "with --genotype it compresses that network); proxyless: ProxylessNAS (sampled binary "
                  "paths, BinaryConnect gradients); random: random baseline matching "
                  "--genotype; fixed: train --genotype from scratch.")
flags.DEFINE_string("space", D.space, "Operation set: bonsai7, darts8, small or mbconv "
                    "(ProxylessNAS's mobile space: inverted residuals, kernel 3/5/7 x "
                    "expansion 3/6, and skip).")
flags.DEFINE_integer("scale", D.scale, "Stem channels C.")
flags.DEFINE_integer("nodes", D.nodes, "Intermediate nodes per cell.")
flags.DEFINE_integer("stem_stride", D.stem_stride, "Stem stride: 2 halves the resolution.")
flags.DEFINE_string("patterns", json.dumps([list(p) for p in D.patterns]),
                    "Cell patterns as JSON, e.g. [[\"n\",\"na\"],[\"r\"]].")
flags.DEFINE_integer("max_patterns", D.max_patterns, "Most patterns (0: spatial limit).")
flags.DEFINE_integer("reduction_target", D.reduction_target, "Smallest spatial size.")
flags.DEFINE_float("init_weight", D.init_weight, "Initial pruner weight.")
flags.DEFINE_string("genotype", D.genotype, "Genotype JSON for --strategy=random/fixed (and "
                    "bayes: the network to compress).")
flags.DEFINE_integer("epochs", D.epochs, "Epochs in all (search + final training).")
flags.DEFINE_integer("search_epochs", D.search_epochs, "Search epochs (0: half of --epochs).")
flags.DEFINE_integer("batch_size", D.batch_size, "Batch size.")
flags.DEFINE_float("lr_max", D.lr_max, "Peak learning rate (cosine annealing).")
flags.DEFINE_float("lr_min", D.lr_min, "Final learning rate.")
flags.DEFINE_float("gate_lr", D.gate_lr, "Pruner learning rate (0: --lr_max).")
flags.DEFINE_float("momentum", D.momentum, "SGD momentum.")
flags.DEFINE_float("weight_decay", D.weight_decay, "L2 weight decay (not on pruners).")
flags.DEFINE_float("drop_path", D.drop_path, "Drop-path rate of non-identity operations.")
flags.DEFINE_float("aux_weight", D.aux_weight, "Weight of auxiliary losses.")
flags.DEFINE_float("label_smoothing", D.label_smoothing, "Label smoothing.")
flags.DEFINE_float("lambda_edge", D.lambda_edge, "Weight of the operation compression loss.")
flags.DEFINE_float("lambda_input", D.lambda_input, "Weight of the input compression loss.")
flags.DEFINE_integer("prune_interval", D.prune_interval, "Epochs between deadheads.")
flags.DEFINE_integer("cycle_len", D.cycle_len, "Epochs per compression cycle.")
flags.DEFINE_integer("settle_epochs", D.settle_epochs,
                     "BonsaiNet: end the search once it has grown to the pattern cap, its "
                     "compression is at its target and nothing was removed for this many epochs; "
                     "the time left goes to the final training. 0 = search for all its epochs.")
flags.DEFINE_float("time_budget_minutes", D.time_budget_minutes, "Wall-clock budget of the whole "
                   "command (start-up, search, final training, export, report). The run times "
                   "its steps and plans its epochs to end within it on this machine; --epochs "
                   "and --search_epochs are then not used. 0: no budget.")
flags.DEFINE_float("search_fraction", D.search_fraction, "Under a time budget: the share of the "
                   "training time given to the search.")
flags.DEFINE_float("arch_lr", D.arch_lr, "Bi-level strategies (asap): Adam learning rate of the "
                   "architecture weights.")
flags.DEFINE_float("asap_tau0", D.asap_tau0, "ASAP: initial softmax temperature.")
flags.DEFINE_float("asap_beta", D.asap_beta, "ASAP: temperature decay per epoch.")
flags.DEFINE_float("asap_threshold", D.asap_threshold, "ASAP: an operation whose weight falls "
                   "below threshold / (operations on its edge) is removed.")
flags.DEFINE_float("bayes_lambda_edge", D.bayes_lambda_edge, "BayesNAS: group-lasso lambda of "
                   "the edge (parent) switches (the authors used 0.01, 0.007, 0.005).")
flags.DEFINE_float("bayes_lambda_op", D.bayes_lambda_op, "BayesNAS: group-lasso lambda of the "
                   "operation (child) switches.")
flags.DEFINE_float("bayes_threshold", D.bayes_threshold, "BayesNAS: a switch group whose "
                   "relevance gamma falls below this is pruned (edges first); 0: never.")
flags.DEFINE_enum("bayes_hessian", D.bayes_hessian, ["hutchinson", "exact"], "BayesNAS: the "
                  "Hessian diagonal: Hutchinson's estimator (one product per batch) or exact "
                  "(one product per switch and batch).")
flags.DEFINE_integer("bayes_hessian_batches", D.bayes_hessian_batches, "BayesNAS: held-out "
                     "batches per Laplace update.")
flags.DEFINE_integer("bayes_warmup_epochs", D.bayes_warmup_epochs, "BayesNAS: epochs that "
                     "train the weights only, switches held at 1.")
flags.DEFINE_integer("proxyless_warmup_epochs", D.proxyless_warmup_epochs, "ProxylessNAS: "
                     "epochs that train the weights only, on uniformly drawn paths.")
flags.DEFINE_enum("proxyless_grad", D.proxyless_grad, list(config_lib.PROXYLESS_GRADS),
                  "ProxylessNAS: the alphas' gradient. binaryconnect: two operations drawn per "
                  "edge, one active, BinaryConnect's gradient over the pair and the pair's "
                  "rescale; reinforce: one operation drawn per edge from the full softmax, "
                  "REINFORCE with reward -(validation loss) and a moving-average baseline.")
flags.DEFINE_float("latency_target_ms", D.latency_target_ms, "ProxylessNAS: batch-1 TFLite "
                   "latency target on this machine (ms); the expected latency from a table "
                   "measured here (bench/latency_table.py, cached per machine) enters the loss "
                   "as --latency_weight * log(E / target)^2. 0: no latency term.")
flags.DEFINE_float("latency_weight", D.latency_weight, "ProxylessNAS: weight of the latency term.")
flags.DEFINE_bool("latency_int8", D.latency_int8, "ProxylessNAS: the target is the int8 model's "
                  "latency (else the float32 model's).")
flags.DEFINE_enum("latency_select", D.latency_select, list(config_lib.LATENCY_SELECTS),
                  "ProxylessNAS under a target: the final network. measured: from the argmax, "
                  "switch the edges whose cheaper operation costs the least probability per ms "
                  "until the whole network, timed here, is at or under the target; table: the "
                  "same on the table's predictions alone; argmax: each edge's most probable "
                  "operation (the paper's rule).")
flags.DEFINE_integer("reductions", D.reductions, "SpiderNet: reduction cells; the network "
                     "starts as reductions + 1 minimal cells (--scale channels, doubled at each "
                     "reduction) and grows itself.")
flags.DEFINE_integer("round_epochs", D.round_epochs, "SpiderNet: epochs of training per round; "
                     "each round ends with a deadhead and at most one edge split per cell.")
flags.DEFINE_integer("spider_rounds", D.spider_rounds, "SpiderNet: rounds of the search (a time "
                     "budget may end it sooner).")
flags.DEFINE_float("spider_deadhead", D.spider_deadhead, "SpiderNet: an operation whose gate "
                   "was open in under this share of a round's batches is removed.")
flags.DEFINE_integer("spider_candidates", D.spider_candidates, "SpiderNet: edges per cell and "
                     "round scored as split candidates, drawn at random (0: every edge).")
flags.DEFINE_integer("spider_ntk_batch", D.spider_ntk_batch, "SpiderNet: held-out images of "
                     "the NTK condition number (one backward pass each per candidate).")
flags.DEFINE_integer("spider_regions_batch", D.spider_regions_batch, "SpiderNet: random images "
                     "whose linear regions are counted.")
flags.DEFINE_string("threads", "auto", "TensorFlow threads as INTER,INTRA, or auto: one op per "
                    "core on machines of up to 4 cores, TensorFlow's default above.")
flags.DEFINE_float("memory_budget_mb", D.memory_budget_mb, "Training-memory budget (MB) that "
                   "growth fills; 0: no growth.")
flags.DEFINE_string("val_size", str(D.val_size), "Training examples held out for validation: a "
                    "count (5000) or a fraction of the training split (0.1).")
flags.DEFINE_integer("train_subset", D.train_subset, "Search on this many examples (0: all).")
flags.DEFINE_integer("final_subset", D.final_subset, "Final training examples (0: all).")
flags.DEFINE_bool("final_with_val", D.final_with_val, "The final network also trains on the "
                  "--val_size examples (the search still validates on them), and its epochs "
                  "are not validated. The test split stays unseen until the end.")
flags.DEFINE_list("image_size", [], "Resize images to H,W (folder datasets).")
flags.DEFINE_string("augment", D.augment, "Augmentation: none, crop, crop_flip, "
                    "crop_flip_cutout ('' = dataset default).")
flags.DEFINE_integer("seed", D.seed, "Random seed.")
flags.DEFINE_bool("deterministic", D.deterministic, "Enable TensorFlow op determinism.")
flags.DEFINE_bool("jit_compile", D.jit_compile, "Compile steps with XLA (slower on CPU here).")
flags.DEFINE_enum("graph_optimizer", D.graph_optimizer, ["auto", "on", "off"],
                  "TensorFlow's graph optimizer (Grappler) on traced steps. auto: off on a "
                  "machine without a GPU, where it made retracing after every structural change "
                  "2-3x slower and the step no faster; on with a GPU.")
flags.DEFINE_enum("mixed_precision", D.mixed_precision, ["none", "mixed_float16",
                  "mixed_bfloat16"], "Keras mixed precision: float32 variables (gates and batch "
                  "norms in float32 throughout), float16 activations with dynamic loss scaling, "
                  "or bfloat16 activations. For GPUs; never timed on one here, and slower on "
                  "this CPU (README).")
flags.DEFINE_enum("distribute", D.distribute, list(config_lib.DISTRIBUTE), "tf.distribute: "
                  "none (one device); mirrored (every device of this machine: all GPUs, or the "
                  "CPU split into --devices logical devices); multi_worker (one process per "
                  "worker, the cluster from TF_CONFIG; the chief writes the run directory). "
                  "Each step's gradients are summed over the replicas and batch norms use the "
                  "global batch, so a run computes what one device would.")
flags.DEFINE_integer("devices", D.devices, "With --distribute=mirrored: logical CPU devices "
                     "to split a GPU-less machine into (0: 2), or that many GPUs (0: all).")
flags.DEFINE_integer("steps_per_epoch", D.steps_per_epoch, "Cap on steps per epoch (0: all).")
flags.DEFINE_integer("final_probe_steps", D.final_probe_steps, "N > 0: once the search ends, "
                     "only time the final network over one epoch of at most N steps, then "
                     "finish (for a search whose network is retrained elsewhere, as "
                     "bench/compare.py does). 0: train the final network fully.")
flags.DEFINE_bool("measure_memory", D.measure_memory, "Measure allocator peak memory.")
FLAGS = flags.FLAGS

RUN_FLAGS = ("output_dir", "overwrite", "export", "verbose", "threads")


class UsageError(ValueError):
    pass


def config_from_flags(overrides=None):
    """Turns the flags into a RunConfig (validation errors name the flag)."""
    values = {}
    for field in config_lib.RunConfig.__dataclass_fields__:
        values[field] = getattr(FLAGS, field)
    try:
        values["patterns"] = json.loads(FLAGS.patterns)
    except json.JSONDecodeError:
        raise UsageError(f"--patterns={FLAGS.patterns!r} is not JSON; expected e.g. "
                         f"[[\"n\",\"na\"],[\"r\"]]") from None
    try:
        values["image_size"] = tuple(int(v) for v in FLAGS.image_size)
    except ValueError:
        raise UsageError(f"--image_size={','.join(FLAGS.image_size)!r}; expected H,W") from None
    values["val_size"] = parse_val_size(FLAGS.val_size)
    values.update(overrides or {})
    return config_lib.RunConfig(**values)


def parse_val_size(text):
    """--val_size's text as an int count or a float fraction (RunConfig checks the range)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--val_size={text!r} is not a number; expected "
                         f"{config_lib.VAL_SIZE_EXPECTED}") from None


def prepare_run_dir(cfg, output_dir, overwrite, claim=True):
    """Creates, resumes or refuses `output_dir`; returns 'new', 'resume' or 'finished'.

    With claim=False it only decides (and refuses): nothing is removed or written.
    """
    path = os.path.join(output_dir, "config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if not isinstance(old, dict) and not overwrite:
            raise UsageError(f"{path} is unreadable or corrupt; expected the config.json of a "
                             f"bonsai-tf run: pass --overwrite to start over or another "
                             f"--output_dir")
        written = old
        if isinstance(old, dict):
            # Made by an older version: a field added since reads as its default, so the
            # run resumes after an upgrade instead of being refused for it.
            old = {**config_lib.RunConfig.defaults(), **old}
        same = isinstance(old, dict) and _identity(old) == cfg.identity()
        if not same and not overwrite:
            diff = sorted(k for k in set(cfg.identity()) | set(_identity(old or {}))
                          if (old or {}).get(k) != cfg.identity().get(k))
            raise UsageError(f"run directory {output_dir} was made by a different configuration "
                             f"(differs in: {', '.join(diff[:6])}); expected the same flags to "
                             f"resume it, or pass --overwrite or another --output_dir")
        if same and not overwrite:
            if claim and written != cfg.to_dict():
                # Only NON_IDENTITY fields differ (say --nomeasure_memory on resuming), or
                # fields the file predates: config.json, which the report shows and
                # export reads, must say what this invocation runs with.
                from bonsai_tf import run_dir as rd
                rd.write_json(path, cfg.to_dict())
            return "finished" if os.path.exists(os.path.join(output_dir, "metrics.json")) else "resume"
        if not claim:
            return "new"
        from bonsai_tf import run_dir as rd
        rd.remove_run_files(output_dir)
    elif os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise UsageError(f"--output_dir={output_dir} exists and is not a bonsai-tf run directory; "
                         f"expected a new or empty directory (or pass --overwrite)")
    if claim:
        from bonsai_tf import run_dir as rd
        rd.write_json(path, cfg.to_dict())
    return "new"


def _identity(d):
    d = dict(d)
    for k in config_lib.RunConfig.NON_IDENTITY:
        d.pop(k, None)
    return d


def _setup_logging(output_dir=None):
    """Logs to stderr and (given `output_dir`) to its log.txt; replaces an earlier setup."""
    return cli.setup_logging("bonsai_tf", output_dir and os.path.join(output_dir, "log.txt"))


def _cannot_create(output_dir, reason):
    from bonsai_tf import run_dir as rd
    return rd.RunDirError(f"cannot create --output_dir={output_dir}: {reason}; expected a "
                          f"directory or a path where one can be made")


def check_output_dir(output_dir):
    """Refuses an --output_dir that cannot be used, without creating anything.

    The directory is made only once the data has loaded: bad input (a mistyped
    --dataset, say) must not leave an empty run directory behind.
    """
    from bonsai_tf import run_dir as rd
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise _cannot_create(output_dir, os.strerror(errno.EEXIST))
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise rd.RunDirError(f"--output_dir={output_dir} is not writable; expected a "
                                 f"writable directory")
        return
    parent = os.path.dirname(os.path.abspath(output_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise _cannot_create(output_dir, os.strerror(errno.ENOTDIR))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _cannot_create(output_dir, os.strerror(errno.EACCES))


def _check_genotype_fits(cfg, info):
    """A --genotype for other images or classes is refused before the run directory is made."""
    if cfg.strategy not in ("random", "fixed") and not (cfg.strategy == "bayes" and cfg.genotype):
        return
    from bonsai_tf import genotype as genotype_lib
    g = genotype_lib.Genotype.load(cfg.genotype)
    if tuple(g.input_shape) != tuple(info.image_shape) or g.num_classes != info.num_classes:
        raise genotype_lib.GenotypeError(
            f"genotype {cfg.genotype} is for input {tuple(g.input_shape)} with {g.num_classes} "
            f"classes; expected the dataset's {tuple(info.image_shape)} with "
            f"{info.num_classes} classes (--dataset={cfg.dataset})")


def parse_threads(text):
    """--threads: 'auto' -> None, 'INTER,INTRA' -> (inter, intra)."""
    if text.strip() == "auto":
        return None
    try:
        inter, intra = (int(v) for v in text.split(","))
        if inter < 0 or intra < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--threads={text!r}; expected auto or INTER,INTRA (two integers "
                         f">= 0, 0 = TensorFlow's default)") from None
    return inter, intra


def run(cfg, output_dir, overwrite=False, export=True, verbose=1, threads=None, started=None):
    """Runs (or resumes) `cfg` in `output_dir` and writes report and exports.

    verbose: 0, 1 or 2 as --verbose (1 is 2 when stdout is not a terminal).
    threads: (inter, intra) TensorFlow threads, or None for machine.thread_plan().
    started: time.time() when the command began (a time budget counts from it).
    """
    started = time.time() if started is None else started
    from bonsai_tf import run_dir as rd
    check_output_dir(output_dir)
    if os.path.isdir(output_dir):
        prepare_run_dir(cfg, output_dir, overwrite, claim=False)  # refuses before anything loads
    log = _setup_logging()
    import tensorflow as tf
    from bonsai_tf import data as data_lib
    from bonsai_tf import engine
    from bonsai_tf import machine
    from bonsai_tf import report
    machine.configure_threads(*(threads or (None, None)))
    # Before anything runs: a CPU split into logical devices, or a cluster's collectives,
    # must be set up before TensorFlow's runtime starts.
    dist = distribute_lib.make(cfg.distribute, cfg.devices)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    splits = data_lib.load_dataset(cfg.dataset, cfg.data_dir or None, val_size=cfg.val_size,
                                   train_subset=None, seed=cfg.seed,
                                   image_size=cfg.image_size or None)
    for flag, subset in (("train_subset", cfg.train_subset), ("final_subset", cfg.final_subset)):
        n = min(len(splits.train[1]), subset or len(splits.train[1]))
        if n < cfg.batch_size:  # batches are full ones: an epoch would have no step at all
            raise UsageError(f"--batch_size={cfg.batch_size} is larger than the {n} training "
                             f"examples (after --val_size={cfg.val_size}"
                             f"{f', --{flag}={subset}' if subset else ''}); expected at most {n}")
    _check_genotype_fits(cfg, splits.info)
    if cfg.strategy in config_lib.SEARCHING:
        config_lib.pattern_cap(cfg, splits.info.image_shape)  # images too small: refused now
    if not distribute_lib.is_chief(dist):
        return _run_worker(cfg, splits, output_dir, dist, started)
    # Made and claimed only now: bad input leaves no directory behind, and bad data
    # leaves an existing one as it was, so the corrected command (say with
    # --image_size) is not refused as a different configuration.
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise _cannot_create(output_dir, e.strerror) from None
    status = prepare_run_dir(cfg, output_dir, overwrite)
    log = _setup_logging(output_dir)
    info = splits.info
    log.info("dataset %s: %d training, %d validation, %d test images of %s%s", info.name,
             len(splits.train[1]), len(splits.val[1]), len(splits.test[1]),
             "x".join(map(str, info.image_shape)),
             f"; {info.skipped_files} unreadable file(s) skipped" if info.skipped_files else "")
    log.info("data read from %s", info.source)
    if status == "finished":
        log.info("%s is finished; rewriting its report%s", output_dir,
                 " and exports" if export else "")
        metrics = rd.read_json(os.path.join(output_dir, "metrics.json"))
    else:
        log.info("%s run in %s (%s)", cfg.strategy, output_dir, status)
        metrics = engine.Run(cfg, splits, output_dir, started=started,
                             verbose=cli.progress_verbosity(verbose, sys.stdout),
                             distribution=dist, exports=export).run()
    if export:
        from bonsai_tf import export as export_lib
        with cli.dropping_stderr_lines(cli.EXPORT_NOISE):
            export_lib.export_run(output_dir, splits=splits)
    report.write_report(output_dir)
    log.info("test accuracy %.4f, %d parameters, %d cells; report: %s", metrics["test_accuracy"],
             metrics["params"], metrics["cells"], os.path.join(output_dir, "report.md"))
    return metrics


# What a worker other than the chief reads of the chief's run directory to resume with it.
WORKER_RESUME_FILES = ("config.json", "dataset.json", "genotype.json", "metrics.jsonl",
                       "plan.json", "checkpoint")


def _run_worker(cfg, splits, output_dir, dist, started):
    """A multi-worker cluster's worker other than the chief: the same run, in a scratch
    directory of its own (the chief alone writes `output_dir`), resumed from the
    chief's last checkpoint where there is one; no report, no exports. Returns its
    metrics."""
    import shutil
    import tempfile
    from bonsai_tf import engine
    log = _setup_logging()
    scratch = tempfile.mkdtemp(prefix="bonsai-worker-")
    try:
        if os.path.exists(os.path.join(output_dir, "metrics.json")):
            log.info("%s is finished: nothing for this worker to do", output_dir)
            return json.load(open(os.path.join(output_dir, "metrics.json")))
        for name in WORKER_RESUME_FILES:
            src = os.path.join(output_dir, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(scratch, name))
            elif os.path.isfile(src):
                shutil.copy2(src, os.path.join(scratch, name))
        log.info("worker of a %d-worker cluster: training in %s (the chief writes %s)",
                 distribute_lib.num_workers(dist), scratch, output_dir)
        return engine.Run(cfg, splits, scratch, started=started, verbose=0,
                          distribution=dist).run()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _main(argv, overrides, implied, strategies):
    argv = cli.flagfiles_first(argv, implied)
    help_kind = cli.help_requested(argv)
    if help_kind:
        cli.print_help(FLAGS, help_kind, module=__name__)
        return 0
    try:
        rest = FLAGS(argv)[1:]
    except flags.Error as e:
        raise UsageError(flag_error(e)) from None
    if rest:
        raise UsageError(f"unexpected arguments {rest}; expected only --flags")
    if FLAGS.verbose not in (0, 1, 2):
        raise UsageError(f"--verbose={FLAGS.verbose}; expected 0, 1 or 2")
    if strategies and FLAGS.strategy not in strategies:
        raise UsageError(f"--strategy={FLAGS.strategy}; expected {' or '.join(strategies)} here "
                         f"(train/search.py runs --strategy=bonsai)")
    cfg = config_from_flags(overrides)
    if cfg.strategy in ("random", "fixed"):
        from bonsai_tf import genotype as genotype_lib
        genotype_lib.Genotype.load(cfg.genotype)  # a bad --genotype fails before TensorFlow loads
    output_dir = FLAGS.output_dir or os.path.join(
        "runs", f"{cfg.dataset.replace(':', '_').replace('/', '_')}-{cfg.strategy}")
    run(cfg, output_dir, FLAGS.overwrite, FLAGS.export, FLAGS.verbose,
        threads=parse_threads(FLAGS.threads), started=STARTED)
    return 0


def main(argv, overrides=None, implied=(), strategies=None):
    """Entry point shared by the scripts; returns the process exit status.

    Flags given on the command line override those of --flagfile files wherever
    they stand; `implied` flags (a script's own) override flagfiles and yield to
    explicit flags. `strategies`: the --strategy values this script accepts.
    --help, -h, --helpshort and --helpfull print the flags and return 0.

    Flags, the configuration, a --genotype file and the run directory are checked
    before TensorFlow is imported, so bad input is reported at once.
    """
    try:
        return _main(argv, overrides, implied, strategies)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one of ours
        if not isinstance(e, input_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def input_errors():
    """Errors that mean bad input or an unusable run directory: one line, exit status 2.

    The classes of modules that import TensorFlow are taken only once those modules
    are loaded (their errors cannot have been raised before).
    """
    from bonsai_tf import genotype as genotype_lib
    from bonsai_tf import run_dir as rd
    types = [UsageError, config_lib.ConfigError, genotype_lib.GenotypeError, rd.RunDirError]
    for module, name in (("bonsai_tf.data", "DataError"), ("bonsai_tf.engine", "BudgetError"),
                         ("bonsai_tf.engine", "NonFiniteLoss"),
                         ("bonsai_tf.distribute", "DistributeError"),
                         ("bonsai_tf.export", "ExportError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


_EXPECTED_TYPE = {"int": "an integer", "float": "a number", "bool": "true or false"}


def flag_error(e):
    """absl's message (flag and value received) plus the type that was expected."""
    msg = str(e).splitlines()[0]
    if msg.startswith("flag --") and "=" in msg and "expected" not in msg.lower():
        name = msg[len("flag --"):msg.index("=")]
        if name in FLAGS:
            expected = _EXPECTED_TYPE.get(FLAGS[name].flag_type())
            if expected:
                msg += f"; expected {expected}"
    return msg
