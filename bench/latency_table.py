"""(Re)builds this machine's latency lookup table for a network or a search space.

  python bench/latency_table.py                  # the quick configuration (fmnist_quick.flags)
  python bench/latency_table.py --input_shape=32,32,3 --space=bonsai7 --scale=16 --nodes=4 \\
      --patterns='[["n","na"],["r"]]' --stem_stride=1 --max_patterns=2
  python bench/latency_table.py --genotype=runs/fmnist_quick/genotype.json --check

Times with the LiteRT interpreter, at batch 1, every operation of the space at every
(input shape, stride) the network's edges have, and its fixed parts (stem, adapters,
sums, batch norms, head), as float32 and int8 TFLite models (bonsai_tf/latency.py says
how and why). The network is the configuration's full search network (every operation
on every edge, --max_patterns patterns; 0: as many as the resolution allows), or
--genotype's; with --genotype and --noall_ops only that network's own operations.

The table is cached per machine (CPU model, --threads, TensorFlow and LiteRT versions,
space) under ~/.cache/bonsai_tf/latency/ ($BONSAI_TF_LATENCY_DIR or --cache_dir
elsewhere, --table for one file): cached entries are reused, missing ones measured,
--rebuild measures them all again. Prints the entries and the network's predicted
latency; --check also measures the whole network and prints predicted / measured.
--out writes all of it as JSON. Bad input prints one line ``error: ...``, exit status 2.
"""

import datetime
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from bonsai_tf import cli  # noqa: E402
from bonsai_tf import genotype as genotype_lib  # noqa: E402
from bonsai_tf import latency  # noqa: E402
from bonsai_tf import machine  # noqa: E402
from bonsai_tf import space as space_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("genotype", "", "Genotype JSON of the network to cover (instead of the "
                    "configuration flags below).")
flags.DEFINE_list("input_shape", ["28", "28", "1"], "Image shape H,W,C.")
flags.DEFINE_integer("num_classes", 10, "Classes (the head's size).")
flags.DEFINE_string("space", "small", "Operation set.")
flags.DEFINE_integer("scale", 32, "Stem channels C.")
flags.DEFINE_integer("nodes", 2, "Intermediate nodes per cell.")
flags.DEFINE_string("patterns", '[["n"],["r"]]', "Cell patterns as JSON.")
flags.DEFINE_integer("stem_stride", 2, "Stem stride: 2 halves the resolution.")
flags.DEFINE_integer("max_patterns", 3, "Patterns in the network (0: as many as the "
                     "resolution allows down to --reduction_target).")
flags.DEFINE_integer("reduction_target", 2, "Smallest spatial size (with --max_patterns=0).")
flags.DEFINE_bool("all_ops", True, "Every operation of the space on every edge the network has "
                  "(a search's table); false: the network's own operations only.")
flags.DEFINE_list("quantized", ["float", "int8"], "Which TFLite models: float, int8 or both.")
flags.DEFINE_integer("threads", latency.DEFAULT_THREADS, "LiteRT interpreter threads.")
flags.DEFINE_integer("repeats", latency.DEFAULT_REPEATS, "Timed invocations per entry "
                     "(the median is kept).")
flags.DEFINE_integer("warmup", latency.DEFAULT_WARMUP, "Untimed invocations first.")
flags.DEFINE_integer("rounds", latency.DEFAULT_ROUNDS, "Medians of --repeats invocations per "
                     "entry, a moment apart; the lowest is kept (a shared machine's quietest).")
flags.DEFINE_string("cache_dir", "", "Cache directory (default $BONSAI_TF_LATENCY_DIR or "
                    "~/.cache/bonsai_tf/latency).")
flags.DEFINE_string("table", "", "The table file itself (default: this machine's file in "
                    "the cache directory).")
flags.DEFINE_bool("rebuild", False, "Measure every entry again, cached or not.")
flags.DEFINE_bool("check", False, "Also measure the whole network and print predicted / "
                  "measured.")
flags.DEFINE_string("out", "", "Also write the entries and predictions here (JSON).")


def _genotype():
    """The network to cover, from --genotype or the configuration flags."""
    if FLAGS.genotype:
        return genotype_lib.Genotype.load(FLAGS.genotype)
    try:
        shape = tuple(int(v) for v in FLAGS.input_shape)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise latency.LatencyError(f"--input_shape={','.join(FLAGS.input_shape)}: expected "
                                   "H,W,C, three positive integers such as 28,28,1")
    try:
        patterns = json.loads(FLAGS.patterns)
    except json.JSONDecodeError:
        raise latency.LatencyError(f"--patterns={FLAGS.patterns}: expected JSON such as "
                                   '[["n"],["r"]]') from None
    patterns = genotype_lib.parse_patterns(patterns)
    if FLAGS.space not in space_lib.SPACES:
        raise latency.LatencyError(f"--space={FLAGS.space}: expected one of "
                                   f"{sorted(space_lib.SPACES)}")
    if FLAGS.stem_stride not in (1, 2):
        raise latency.LatencyError(f"--stem_stride={FLAGS.stem_stride}: expected 1 or 2")
    for name in ("scale", "nodes", "num_classes"):
        if getattr(FLAGS, name) < (2 if name == "num_classes" else 1):
            raise latency.LatencyError(f"--{name}={getattr(FLAGS, name)}: expected an integer "
                                       f">= {2 if name == 'num_classes' else 1}")
    spatial = -(-min(shape[:2]) // FLAGS.stem_stride)
    cap = genotype_lib.max_patterns(patterns, spatial, FLAGS.reduction_target)
    if FLAGS.max_patterns < 0 or cap < 1:
        raise latency.LatencyError(f"--max_patterns={FLAGS.max_patterns} with {spatial}x"
                                   f"{spatial} cells and --reduction_target="
                                   f"{FLAGS.reduction_target}: expected >= 0 (0: as many as "
                                   f"fit) and room for one pattern")
    count = min(FLAGS.max_patterns or cap, cap)
    return genotype_lib.initial(FLAGS.space, shape, FLAGS.num_classes, FLAGS.scale, FLAGS.nodes,
                                patterns, count, stem_stride=FLAGS.stem_stride)


def _modes():
    names = {"float": False, "float32": False, "int8": True}
    modes = [m.strip().lower() for m in FLAGS.quantized]
    if not modes or any(m not in names for m in modes):
        raise latency.LatencyError(f"--quantized={','.join(FLAGS.quantized)}: expected float, "
                                   "int8 or float,int8")
    return tuple(dict.fromkeys(names[m] for m in modes))


def run():
    g = _genotype()
    modes = _modes()
    table = latency.load_or_build(
        g, quantized=modes, threads=FLAGS.threads, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
        rounds=FLAGS.rounds, directory=FLAGS.cache_dir or None, path=FLAGS.table or None,
        rebuild=FLAGS.rebuild, all_ops=FLAGS.all_ops, log=lambda line: print(line, flush=True))
    needed = latency.required(g, FLAGS.all_ops)
    key = table.key
    print(f"{table.path}: {key['cpu']}, {key['threads']} thread(s), TensorFlow "
          f"{key['tensorflow']}, LiteRT {key['litert']}, space {key['space']}; "
          f"{table.measured} entries measured now, {len(needed) * len(modes) - table.measured} "
          "from the cache")
    result = {"table": table.path, "key": key, "genotype": g.to_dict(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "machine": machine.identity(), "entries": {}, "networks": {}}
    header = f"{'entry':44s} {'mode':5s} {'median ms':>10s} {'baseline':>9s} {'own ms':>8s}"
    print(header)
    for q in modes:
        mode = latency.MODES[int(q)]
        result["entries"][mode] = {}
        for entry in needed:
            raw, own = table.raw(entry, q), table.ms(entry, q)
            base = None if entry[0] in ("empty", "input") else table.baseline(entry, q)
            result["entries"][mode][latency.entry_name(entry)] = {
                "median_ms": raw, "baseline_ms": base, "own_ms": own}
            shown = "-" if base is None else f"{base:.4f}"
            print(f"{latency.entry_name(entry):44s} {mode:5s} {raw:10.4f} {shown:>9s} "
                  f"{own:8.4f}")
    for q in modes:
        mode = latency.MODES[int(q)]
        predicted = latency.predict(g, table, q)
        figures = {"predicted_ms": predicted, "operations": g.canonical().num_ops()}
        line = (f"network ({g.canonical().num_ops()} operations) {mode}: predicted "
                f"{predicted:.3f} ms")
        if FLAGS.check:
            measured = latency.network_latency(g, q, FLAGS.repeats, FLAGS.threads, FLAGS.warmup,
                                               FLAGS.rounds)
            figures.update(measured_ms=measured, ratio=predicted / measured)
            line += f", measured {measured:.3f} ms, predicted / measured {predicted / measured:.2f}"
        result["networks"][mode] = figures
        print(line)
    if FLAGS.out:
        from bonsai_tf import run_dir as rd
        rd.write_json(FLAGS.out, result)
        print(f"wrote {FLAGS.out}")
    return 0


def main(argv):
    """Builds the table; returns the exit status (0, or 2 for bad input)."""
    argv, status = cli.parse_argv(FLAGS, argv)
    if status is not None:
        return status
    from absl import logging as absl_logging

    from bonsai_tf import export as export_lib
    from bonsai_tf import run_dir as rd
    # The converter's INFO lines (SavedModel written, fingerprints) for each of ~100 models.
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        with cli.dropping_stderr_lines(cli.EXPORT_NOISE):   # and its native debug lines
            return run()
    except (latency.LatencyError, genotype_lib.GenotypeError, export_lib.ExportError,
            rd.RunDirError) as e:
        return cli.error(e)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(FLAGS))
