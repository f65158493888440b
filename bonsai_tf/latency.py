"""Latency lookup table: operations and fixed parts timed on this machine with LiteRT.

ProxylessNAS makes latency a search objective through a lookup table: every candidate
operation is timed on the target device at every input shape and stride the network
gives it, and a network's latency is predicted as the sum of its operations' entries.
Here the target is the machine at hand running the deployed artifacts: the float32 and
full-integer int8 TFLite models that `bonsai_tf.export` writes, run at batch 1 with the
LiteRT interpreter (`export.TFLiteClassifier`), timed as bench/bench_inference.py times
a whole network (set the input, invoke, read the output back).

What is timed. Every entry is the median of `repeats` invocations, after `warmup`
untimed ones, of a small model converted with `export.tflite_float` /
`export.tflite_int8` (the project's own converter settings; int8 calibrated on random
images):

  op         one candidate operation (`op_latency`): a one-edge network is built and
             `network.deployable` turns it into plain Keras layers, exactly as a found
             network is exported; the operation's layers are cut out of that model
             (after its leading ReLU, if it has one: see `relu`). Any recipe of
             `space.py` is therefore timed as it deploys.
  stem       normalisation, the stem's 3x3 convolution and batch norm
  relu       the ReLU of a tensor: a network computes it once, however many operations
             and adapters start with it (the converter merges identical ReLUs), and not
             at all where nothing reads the tensor without it (the ReLU is fused into
             the operation producing the tensor). Counted once per operation instead,
             int8 predictions were 1.5-2x too high here.
  adapt      a cell input's ReLU-conv-BN adapter (x_adapt / y_adapt) after its ReLU,
             with its stride
  subsample  a y input taken to a lower resolution without changing channels
  sum        the sum of k terms (a node's, or of a cell's y inputs)
  bn         a node's batch norm
  head       global average pooling and the dense classifier
  empty      nothing but the input scaling below: the baseline of all of the above
  input      nothing at all (raw pixels in): the baseline of the stem, and (an entry of
             the table) the network's own per-invocation cost

The fixed parts are measured as their own small models, keyed by shape, and not as one
"base" latency per network: which adapters, sums and batch norms a network has depends on
what its search pruned (an input that is gone takes its adapter with it, a node's sum
has as many terms as operations survive), so a base measured for one network would not
hold for the next. Keyed by shape, one table serves every network of a search.

Inside a network every operation reads a batch norm's output, values of about unit
scale; the small models take raw pixels (the export helpers' uint8 input). So every
model but the stem first scales its input to [-2, 2] (`ACTIVATION_SCALE`): int8 models
then get the quantization scales a network has. Without it, an int8 batch norm measured
3-4x slower in isolation than in a network here: XNNPACK's int8 kernels do not take
every ratio of scales, and other kernels are much slower.

Every small model ends in a 1x1 crop of its output (the export helpers want one
[batch, classes] output; a crop costs O(channels), where pooling the output would cost
as much as a small operation), beside a crop of its scaled input (`_framed`: a second
consumer, as a network's tensors have, keeps a leading ReLU from being fused into the
scaling), so each entry contains the same per-invocation cost as the `empty` model of
its input shape: copying the input in and casting (float) or quantizing (int8) it, the
scaling, the crops, the softmax, reading the output back, the interpreter's dispatch.
That baseline (`empty`, or `input` for the stem; `baseline_of`) is invoked in turn with
every entry's model, call for call, so that both run under the same load, and stored
with the entry; `LatencyTable.ms` removes it: an entry's latency is its median minus its
baseline's, floored at 0. (Timed apart, under the varying load of a shared 2-core
machine, the differences of such microsecond figures were mostly noise here.) `predict`
adds the network's own per-invocation cost once, as `input` at the image shape.

Sums of k terms are measured for the k a network needs (and k = 2 in a table built for
a search space, `all_ops`); for other k (a network its search pruned) they are
interpolated linearly between the measured k: the converter turns a sum of k terms
into k - 1 additions.

Why a prediction differs from the measured network (see `PREDICTION_TOLERANCE`): the
whole network is one converted graph, so the converter fuses what isolated models
cannot (a node's batch norm into the convolution before it, a ReLU into the operation
that produces its input where nothing else reads that), XNNPACK splits it into other
partitions than the isolated models (int8 ReLUs and average pools are not delegated
here), tensors stay in cache between layers, and the per-invocation cost is paid once,
where each entry subtracts its own baseline's with that baseline's noise. Medians of
isolated microsecond-scale models are also noisier than one network's median.

The table is cached per machine (`cache_path`): a JSON file whose key holds the CPU
model, the thread count, the TensorFlow and LiteRT versions, the space and its recipes.
`load_or_build` reads it, measures only the entries it lacks and writes it back
atomically after every entry, so an interrupted build resumes. Nothing here imports
TensorFlow until something is measured.
"""

import dataclasses
import datetime
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import time

import numpy as np

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import machine
from bonsai_tf import memory as memory_lib
from bonsai_tf import run_dir as rd
from bonsai_tf import space as space_lib

FORMAT = "bonsai-tf/latency"
VERSION = 1
CACHE_ENV = "BONSAI_TF_LATENCY_DIR"   # overrides the default cache directory
DEFAULT_REPEATS = 100
DEFAULT_WARMUP = 10
# Timing rounds per entry, ROUND_PAUSE s apart; the lowest median is kept. On a shared
# 2-core machine another process on the other core slowed a whole 200-call burst by
# 1.7-1.8x here (41 -> 75 us, a tiny float network), for seconds at a time, which no
# median of one burst removes; the quietest of a few rounds is the machine's own figure.
DEFAULT_ROUNDS = 3
ROUND_PAUSE = 0.1
DEFAULT_THREADS = 1     # one interpreter thread: what a single-core device sees, least noisy
CALIBRATION_IMAGES = 8  # int8 calibration sets ranges only; latency does not depend on them
MODES = ("float", "int8")
PART_KINDS = ("empty", "input", "stem", "relu", "adapt", "subsample", "sum", "bn", "head")
# Raw pixels 0..255 -> [-2, 2]: about the scale of the batch-norm outputs operations read.
ACTIVATION_SCALE, ACTIVATION_OFFSET = 1.0 / 64.0, -2.0
# Normalisation constants of the stem and of measured networks: not 0 and 1, which the
# converter could fold away where trained statistics would not let it.
PIXEL_MEAN, PIXEL_STD = 127.5, 64.0
# predict / network_latency of a network stays within [1 / this, this] (the tested bound,
# tests/test_latency.py). Measured on the 2-core AMD EPYC under other jobs' load, one
# interpreter thread: the quick configuration's full network (28x28x1, small, scale 32,
# 2 nodes, stem stride 2, 3 cells, 90 operations) 1.10 float / 1.03 int8; six random
# subnetworks of it (17-31 operations, from the same table) 0.97-1.36 float, 0.78-1.21
# int8; the test's 32x32 network 0.99-1.35 float. A factor 2 leaves room for the load.
PREDICTION_TOLERANCE = 2.0


class LatencyError(ValueError):
    """Bad arguments to a latency measurement, or a table that cannot be used."""


# --------------------------------------------------------------------------- checks

def _mode(quantized):
    if not isinstance(quantized, (bool, np.bool_)):
        raise LatencyError(f"quantized={quantized!r}: expected True (int8) or False (float32)")
    return MODES[int(bool(quantized))]


def _modes(quantized):
    if isinstance(quantized, (bool, np.bool_)):
        return (bool(quantized),)
    try:
        values = tuple(quantized)
    except TypeError:
        values = ()
    if not values or not all(isinstance(q, (bool, np.bool_)) for q in values):
        raise LatencyError(f"quantized={quantized!r}: expected True, False or a list of them "
                           "such as (False, True)")
    return tuple(dict.fromkeys(bool(q) for q in values))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LatencyError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def _check_shape(shape, name="input_shape"):
    try:
        values = tuple(shape)
    except TypeError:
        values = None
    if values is None or len(values) != 3 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
            for v in values):
        raise LatencyError(f"{name}={shape!r}: expected (height, width, channels), three "
                           "positive integers")
    return tuple(int(v) for v in values)


def _check_stride(stride):
    if isinstance(stride, bool) or stride not in (1, 2):
        raise LatencyError(f"stride={stride!r}: expected 1 or 2")
    return int(stride)


def _check_threads(threads):
    threads = _check_int("threads", threads, 1)
    cpus = machine.usable_cpus()
    if threads > cpus:
        raise LatencyError(f"threads={threads} but this process may run on {cpus} core(s): "
                           f"expected at most {cpus}, or timings measure contention")
    return threads


def _space_of(op, space):
    if space is not None:
        ops = space_lib.space_ops(space) if space in space_lib.SPACES else None
        if ops is None:
            raise LatencyError(f"unknown search space {space!r}; expected one of "
                               f"{sorted(space_lib.SPACES)}")
        if op not in ops:
            raise LatencyError(f"operation {op!r} is not in space {space!r}; expected one of "
                               f"{list(ops)}")
        return space
    for name, ops in space_lib.SPACES.items():
        if op in ops:
            return name
    known = sorted({o for ops in space_lib.SPACES.values() for o in ops})
    raise LatencyError(f"operation {op!r} is in no search space; expected one of {known}")


# --------------------------------------------------------------------------- entries

def _fmt(shape):
    return "x".join(str(v) for v in shape)


def entry_name(entry):
    """The table key of an entry tuple, e.g. 'op:sep_conv_3x3:14x14x32:s2'.

    Entries: ("op", name, shape, stride), ("empty", shape), ("input", shape), ("stem",
    image shape, channels, stride), ("adapt", shape, channels, stride), ("subsample",
    shape, stride), ("sum", shape, terms), ("bn", shape), ("head", shape, classes);
    shapes (H, W, C) of the input.
    """
    kind = entry[0]
    if kind == "op":
        return f"op:{entry[1]}:{_fmt(entry[2])}:s{entry[3]}"
    if kind in ("empty", "input", "relu", "bn"):
        return f"{kind}:{_fmt(entry[1])}"
    if kind in ("stem", "adapt"):
        return f"{kind}:{_fmt(entry[1])}:c{entry[2]}:s{entry[3]}"
    if kind == "subsample":
        return f"subsample:{_fmt(entry[1])}:s{entry[2]}"
    if kind == "sum":
        return f"sum:{_fmt(entry[1])}:k{entry[2]}"
    if kind == "head":
        return f"head:{_fmt(entry[1])}:n{entry[2]}"
    raise LatencyError(f"unknown entry kind {kind!r}; expected 'op' or one of {PART_KINDS}")


def input_shape_of(entry):
    return entry[2] if entry[0] == "op" else entry[1]


def baseline_of(entry):
    """The model whose median is an entry's per-invocation cost (see the module doc)."""
    return ("input" if entry[0] == "stem" else "empty", input_shape_of(entry))


def _check_part(part):
    if not isinstance(part, tuple) or not part or part[0] not in PART_KINDS:
        raise LatencyError(f"part={part!r}: expected a tuple whose first item is one of "
                           f"{PART_KINDS}")
    arity = {"empty": 2, "input": 2, "relu": 2, "bn": 2, "stem": 4, "adapt": 4, "subsample": 3,
             "sum": 3, "head": 3}
    if len(part) != arity[part[0]]:
        raise LatencyError(f"part={part!r}: a {part[0]!r} part has {arity[part[0]] - 1} "
                           f"argument(s), got {len(part) - 1}")
    shape = _check_shape(part[1], f"{part[0]} shape")
    args = tuple(_check_int(f"{part[0]} argument", v, 1) for v in part[2:])
    if part[0] == "stem":
        _check_stride(args[-1])
    if part[0] == "sum" and args[0] < 2:
        raise LatencyError(f"part={part!r}: a sum has at least 2 terms")
    if part[0] == "head" and args[0] < 2:
        raise LatencyError(f"part={part!r}: a head has at least 2 classes")
    return (part[0], shape) + args


# --------------------------------------------------------------------------- models

def _keras():
    import keras
    return keras


def _randomize_batch_norms(model, seed=0):
    """Trained-like batch-norm statistics: the converter could fold identity ones away."""
    keras = _keras()
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c),
                               rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)])


def _framed(inputs, outputs, scaled=None):
    """A model of inputs -> outputs[:, 0, 0, :] (and scaled[:, 0, 0, :]): one [batch, n] output.

    The crop costs O(channels). With `scaled` (the scaled input) its pixel is output too,
    so that the scaled input has a second consumer, as a node's output in a network has
    (the operations of every edge from it, the next cells): a leading ReLU then stays an
    operation of its own, as in a network, instead of being fused into the scaling.
    """
    keras = _keras()

    def crop(t):
        if len(t.shape) == 2:
            return t
        h, w = t.shape[1:3]
        return keras.layers.Flatten()(keras.layers.Cropping2D(((0, h - 1), (0, w - 1)))(t))

    out = crop(outputs)
    if scaled is not None:
        out = keras.layers.Concatenate()([out, crop(scaled)])
    return keras.Model(inputs, out)


def _activations(shape):
    """(raw pixel input, the same scaled to about unit scale): what operations read."""
    keras = _keras()
    inputs = keras.Input(shape)
    return inputs, keras.layers.Rescaling(ACTIVATION_SCALE, ACTIVATION_OFFSET)(inputs)


def starts_with_relu(op, stride):
    """Whether `op` at `stride` starts with the ReLU of its input (as layers.Operation)."""
    recipe = space_lib.recipe(op)
    spatial = any(step[0] in space_lib.SPATIAL_STEPS for step in recipe)
    return recipe[0] == ("relu",) and not (stride > 1 and not spatial)


def op_model(op, input_shape, stride=1, space=None):
    """A Keras model of one candidate operation, its layers as `deployable` exports them.

    A one-cell network carrying only `op` on its x edge (a reduction cell for stride 2,
    as many channels as its stem so there is no adapter) goes through
    `network.deployable`; the layers between the stem's output and the node's batch norm
    are the operation's. Its output is cropped to one pixel (`_framed`).

    An operation that starts with a ReLU (`starts_with_relu`) is cut after it: a network
    computes the ReLU of a tensor once however many operations and adapters read it (the
    converter merges identical ReLUs), so the table has it once per tensor, as a
    ("relu", shape) entry.
    """
    from bonsai_tf import network as network_lib

    h, w, c = _check_shape(input_shape)
    stride = _check_stride(stride)
    space = _space_of(op, space)
    cell = genotype_lib.Cell(kind="reduction" if stride == 2 else "normal", channels=c, nodes=1,
                             aux=False, inputs=(),
                             edges=(genotype_lib.Edge("x", 0, ((op, 1.0),)),))
    g = genotype_lib.Genotype(space=space, input_shape=(h, w, 1), num_classes=2, scale=c,
                              nodes=1, patterns=(("n",),), cells=(cell,), stem_stride=1)
    net = network_lib.Network(g, with_pruners=False, aux_heads=False, seed=0)
    full = network_lib.deployable(net)
    _randomize_batch_norms(full)
    keras = _keras()
    start, end = full.get_layer("stem_bn").output, full.get_layer("cell0_n0_bn").input
    if starts_with_relu(op, stride):
        start = full.get_layer(f"cell0_e_x_0_{op}_relu0").output
    inputs, scaled = _activations((h, w, c))
    x = scaled
    if end is not start:   # else an operation of no layers (identity at stride 1)
        x = keras.Model(start, end, name=f"{op}_s{stride}")(x)
    return _framed(inputs, x, scaled)


def part_model(part):
    """A Keras model of one fixed part (`entry_name` lists them), in deployable's layers."""
    from bonsai_tf import layers as L

    keras = _keras()
    layers = keras.layers
    part = _check_part(part)
    kind, shape = part[0], part[1]
    inputs, scaled = _activations(shape)

    def bn(x):
        return layers.BatchNormalization(momentum=L.BN_MOMENTUM, epsilon=L.BN_EPSILON)(x)

    def sub(x, stride):
        return x if stride == 1 else layers.AveragePooling2D(1, stride, "same")(x)

    if kind == "input":
        x = inputs
    elif kind == "empty":
        x = scaled
    elif kind == "stem":
        _, channels, stride = part[1:]
        x = layers.Normalization(mean=[PIXEL_MEAN] * shape[-1],
                                 variance=[PIXEL_STD ** 2] * shape[-1])(inputs)
        x = bn(layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)(x))
    elif kind == "adapt":
        _, channels, stride = part[1:]
        x = sub(scaled, stride)   # after the ReLU of its input: a ("relu", shape) entry
        x = bn(layers.Conv2D(channels, 1, padding="valid", use_bias=False)(x))
    elif kind == "subsample":
        x = sub(scaled, part[2])
    elif kind == "sum":
        x = layers.Add()([scaled] * part[2])
    elif kind == "bn":
        x = bn(scaled)
    elif kind == "relu":
        x = layers.ReLU()(scaled)
    else:  # head
        x = layers.Dense(part[2])(layers.GlobalAveragePooling2D()(scaled))
    # Raw pixels feed only the stem in a network; scaled activations feed many consumers.
    model = _framed(inputs, x, None if kind in ("input", "stem") else scaled)
    _randomize_batch_norms(model)
    return model


# --------------------------------------------------------------------------- timing

def convert(model, input_shape, quantized):
    """TFLite flatbuffer of `model` through export's converter helpers (uint8 pixels in)."""
    from bonsai_tf import export as export_lib

    input_shape = _check_shape(input_shape)
    if not quantized:
        return export_lib.tflite_float(model, input_shape)
    images = np.random.default_rng(0).integers(0, 256, (CALIBRATION_IMAGES, *input_shape),
                                               np.uint8)
    return export_lib.tflite_int8(model, input_shape, images)


def _baseline_blob(entry, quantized):
    """The converted baseline model of `entry` (`baseline_of`), converted once a process."""
    key = (entry, bool(quantized))
    if key not in _BASELINES:
        _BASELINES[key] = convert(part_model(entry), entry[1], quantized)
    return _BASELINES[key]


_BASELINES = {}


def time_tflite(blob, input_shape, repeats=DEFAULT_REPEATS, threads=DEFAULT_THREADS,
                warmup=DEFAULT_WARMUP, rounds=DEFAULT_ROUNDS, baseline=None):
    """Median milliseconds of `repeats` batch-1 invocations (input in, output back).

    rounds > 1: that many such medians, ROUND_PAUSE seconds apart, the lowest kept (see
    DEFAULT_ROUNDS). baseline: another flatbuffer of the same input, invoked in turn
    with this one (so that both run under the same load); then (ms, baseline ms) of the
    round whose median of this one is lowest.
    """
    from bonsai_tf import export as export_lib

    input_shape = _check_shape(input_shape)
    repeats = _check_int("repeats", repeats, 1)
    warmup = _check_int("warmup", warmup, 0)
    rounds = _check_int("rounds", rounds, 1)
    threads = _check_threads(threads)
    lites = [export_lib.TFLiteClassifier(b, num_threads=threads, batch_size=1)
             for b in ((blob,) if baseline is None else (blob, baseline))]
    images = np.random.default_rng(1).integers(0, 256, (1, *input_shape), np.uint8)
    best = None
    for r in range(rounds):
        if r:
            time.sleep(ROUND_PAUSE)
        for _ in range(warmup if r == 0 else min(warmup, 2)):
            for lite in lites:
                lite.run_batch(images)
        seconds = np.empty((repeats, len(lites)))
        enabled = gc.isenabled()
        gc.disable()   # a collection inside a timed call would be the collector's time
        try:
            for i in range(repeats):
                for k, lite in enumerate(lites):
                    start = time.perf_counter()
                    lite.run_batch(images)
                    seconds[i, k] = time.perf_counter() - start
        finally:
            if enabled:
                gc.enable()
        medians = tuple(float(v) * 1000.0 for v in np.median(seconds, axis=0))
        if best is None or medians[0] < best[0]:
            best = medians
    return best[0] if baseline is None else best


def model_latency(model, input_shape, quantized=False, repeats=DEFAULT_REPEATS,
                  threads=DEFAULT_THREADS, warmup=DEFAULT_WARMUP, rounds=DEFAULT_ROUNDS,
                  baseline=None):
    """Converts a single-input Keras model to TFLite and times it (median ms, batch 1).

    baseline: an entry ("empty" or "input", shape) timed in turn with it; then returns
    (ms, baseline ms) (see `time_tflite`).
    """
    _mode(quantized)
    input_shape = _check_shape(input_shape)
    repeats, warmup = _check_int("repeats", repeats, 1), _check_int("warmup", warmup, 0)
    rounds = _check_int("rounds", rounds, 1)
    threads = _check_threads(threads)
    base = None if baseline is None else _baseline_blob(baseline, quantized)
    return time_tflite(convert(model, input_shape, quantized), input_shape, repeats, threads,
                       warmup, rounds, base)


def op_latency(op, input_shape, stride=1, quantized=False, repeats=DEFAULT_REPEATS,
               threads=DEFAULT_THREADS, warmup=DEFAULT_WARMUP, space=None,
               rounds=DEFAULT_ROUNDS, baseline=False):
    """Median milliseconds of one operation's TFLite model at batch 1 on this machine.

    The operation `op` (a name of `space.py`) on an input of `input_shape` (H, W, C) with
    `stride` 1 or 2, exported as `deployable` exports it, converted to float32 or (with
    `quantized`) full-integer int8, run by LiteRT with `threads` threads: the median of
    `repeats` timed invocations after `warmup` untimed ones (the lowest of `rounds` such
    medians; rounds=1 for one). The figure includes the per-invocation cost that the
    `empty` model of the same input shape measures; baseline=True times that model in
    turn with the operation's and returns (ms, its ms): the operation's own latency is
    the difference (see the module doc).
    """
    input_shape = _check_shape(input_shape)
    stride = _check_stride(stride)
    _mode(quantized)
    repeats, warmup = _check_int("repeats", repeats, 1), _check_int("warmup", warmup, 0)
    rounds = _check_int("rounds", rounds, 1)
    threads = _check_threads(threads)
    model = op_model(op, input_shape, stride, space)
    return model_latency(model, input_shape, quantized, repeats, threads, warmup, rounds,
                         ("empty", input_shape) if baseline else None)


def part_latency(part, quantized=False, repeats=DEFAULT_REPEATS, threads=DEFAULT_THREADS,
                 warmup=DEFAULT_WARMUP, rounds=DEFAULT_ROUNDS, baseline=False):
    """Median milliseconds of a fixed part's TFLite model (`part_model`), as `op_latency`.

    baseline=True (not for the baselines "empty" and "input" themselves): (ms, the ms of
    its baseline, `baseline_of`, timed in turn with it).
    """
    part = _check_part(part)
    _mode(quantized)
    threads = _check_threads(threads)
    if baseline and part[0] in ("empty", "input"):
        raise LatencyError(f"part={part!r} is a baseline itself: expected baseline=False")
    return model_latency(part_model(part), part[1], quantized, repeats, threads, warmup, rounds,
                         baseline_of(part) if baseline else None)


def network_model(genotype, seed=0):
    """The deployable Keras model of `genotype` (pruner-free, trained-like batch norms)."""
    from bonsai_tf import network as network_lib

    g = _check_genotype(genotype).canonical().validate()
    channels = g.input_shape[-1]
    net = network_lib.Network(g, mean=(PIXEL_MEAN,) * channels, std=(PIXEL_STD,) * channels,
                              with_pruners=False, aux_heads=False, seed=seed)
    model = network_lib.deployable(net)
    _randomize_batch_norms(model, seed)
    return model


def network_latency(genotype, quantized=False, repeats=DEFAULT_REPEATS, threads=DEFAULT_THREADS,
                    warmup=DEFAULT_WARMUP, rounds=DEFAULT_ROUNDS):
    """The measured latency of the whole network `genotype` describes, as the table's entries."""
    return model_latency(network_model(genotype), genotype.input_shape, quantized, repeats,
                         threads, warmup, rounds)


# --------------------------------------------------------------------------- the network's parts

def _check_genotype(genotype):
    if not isinstance(genotype, genotype_lib.Genotype):
        raise LatencyError(f"genotype is a {type(genotype).__name__}: expected a "
                           "genotype.Genotype")
    try:
        return genotype.validate()
    except genotype_lib.GenotypeError as e:
        raise LatencyError(f"invalid genotype: {e}") from None


def _with_all_ops(g):
    """Every operation of the space on every edge `g` has."""
    ops = tuple((o, 0.1) for o in space_lib.space_ops(g.space))
    return dataclasses.replace(g, cells=tuple(
        dataclasses.replace(c, edges=tuple(dataclasses.replace(e, ops=ops) for e in c.edges))
        for c in g.cells))


def _walk(g):
    """[(label, item)] of what the deployable network of `g` computes.

    Items are entries (see `entry_name`), except that a sum of k terms is ("sum",
    shape, k) for any k >= 2 (looked up or interpolated). Mirrors network.deployable:
    a cell's x is adapted when its channels differ, each y input adapted (ReLU-conv-BN,
    strided as the resolutions require) when its channels differ or else subsampled
    when its resolution does, y inputs summed, every operation of every edge, each
    node's terms summed and batch-normed; and one ReLU per tensor that some operation or
    adapter reads through a ReLU and something else reads as it is. (The converter
    merges identical ReLUs into one, and fuses that into the operation producing the
    tensor where nothing reads the tensor itself.)
    """
    image = tuple(g.input_shape)
    h, w, _ = memory_lib.stem_shape(g)
    items = [("invocation", ("input", image)),
             ("stem", ("stem", image, g.scale, g.stem_stride))]
    outs, names = [(h, w, g.scale)], ["stem"]   # every output's shape and tensor name
    readers = {}   # tensor name -> (shape, {"relu", "plain"}): how it is read

    def read(name, shape, relu):
        readers.setdefault(name, (shape, set()))[1].add("relu" if relu else "plain")
    for c, cell in enumerate(g.cells):
        x_shape, ch = outs[-1], cell.channels
        stride = 2 if cell.reduction else 1
        in_shape = (x_shape[0], x_shape[1], ch)
        out_shape = (genotype_lib.halve(x_shape[0]) if stride == 2 else x_shape[0],
                     genotype_lib.halve(x_shape[1]) if stride == 2 else x_shape[1], ch)
        tensors = {}   # source -> tensor name
        if any(e.src == "x" for e in cell.edges):
            tensors["x"] = names[-1]
            if x_shape[2] != ch:
                items.append((f"cell{c} x adapt", ("adapt", x_shape, ch, 1)))
                read(names[-1], x_shape, True)
                tensors["x"] = f"cell{c} x"
        inputs = [j for j, _ in cell.inputs] if any(e.src == "y" for e in cell.edges) else []
        if inputs:
            for j in inputs:
                tensors["y"] = names[j]
                ratio = genotype_lib.subsample_stride(outs[j][:2], x_shape[:2])
                if outs[j][2] != ch:
                    items.append((f"cell{c} y{j} adapt", ("adapt", outs[j], ch, ratio)))
                    read(names[j], outs[j], True)
                    tensors["y"] = f"cell{c} y{j}"
                elif ratio > 1:
                    items.append((f"cell{c} y{j} subsample", ("subsample", outs[j], ratio)))
                    read(names[j], outs[j], False)
                    tensors["y"] = f"cell{c} y{j}"
                elif len(inputs) > 1:
                    read(names[j], outs[j], False)   # a term of the sum
            if len(inputs) > 1:
                items.append((f"cell{c} y sum", ("sum", in_shape, len(inputs))))
                tensors["y"] = f"cell{c} y"
        last = None
        for dst in range(cell.nodes):
            terms = 0
            for e in cell.edges:
                if e.dst == dst and e.src in tensors:
                    src_shape, s = (in_shape, stride) if e.src in ("x", "y") else (out_shape, 1)
                    for op in e.op_names():
                        items.append((f"cell{c} {e.src}->{dst} {op}", ("op", op, src_shape, s)))
                        read(tensors[e.src], src_shape, starts_with_relu(op, s))
                        terms += 1
            if terms:
                tensors[dst] = last = f"cell{c} node{dst}"
                if terms > 1:
                    items.append((f"cell{c} node{dst} sum", ("sum", out_shape, terms)))
                items.append((f"cell{c} node{dst} bn", ("bn", out_shape)))
        outs.append(out_shape)
        names.append(last)
    read(names[-1], outs[-1], False)   # the head
    items += [(f"relu of {name}", ("relu", shape)) for name, (shape, how) in readers.items()
              if how == {"relu", "plain"}]
    items.append(("head", ("head", outs[-1], g.num_classes)))
    return items


def required(genotype, all_ops=True):
    """The entries a table needs to predict `genotype`, in measuring order.

    all_ops=True: every operation of the genotype's space at every (input shape, stride)
    an edge of the genotype has (what a search over its operations needs), and sums of 2
    terms up to every edge's operations summed; False: the genotype's own operations and
    sums only. Plus the fixed parts (each entry's baseline is timed with it).
    """
    g = _check_genotype(genotype).canonical().validate()
    items = [item for _, item in _walk(_with_all_ops(g) if all_ops else g)]
    if all_ops:
        items += [("sum", item[1], 2) for item in items if item[0] == "sum"]
    return list(dict.fromkeys(items))


def op_entries(genotype, all_ops=True):
    """The (op, input shape, stride) of `required`: what the genotype's edges use."""
    return [(e[1], e[2], e[3]) for e in required(genotype, all_ops) if e[0] == "op"]


# --------------------------------------------------------------------------- the table

def _version(*packages):
    for name in packages:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def cache_key(space, threads=DEFAULT_THREADS):
    """What a table's figures depend on: machine, thread count, runtime versions, space."""
    ops = space_lib.space_ops(space) if space in space_lib.SPACES else None
    if ops is None:
        raise LatencyError(f"unknown search space {space!r}; expected one of "
                           f"{sorted(space_lib.SPACES)}")
    threads = _check_int("threads", threads, 1)
    recipes = json.dumps([[op, space_lib.recipe(op)] for op in ops])
    return {"format": FORMAT, "version": VERSION, "cpu": machine.cpu_model(),
            "machine": platform.machine(), "threads": threads,
            "tensorflow": _version("tensorflow", "tensorflow-cpu", "tf-nightly"),
            "litert": _version("ai-edge-litert", "ai-edge-litert-nightly"),
            "space": space, "recipes": hashlib.sha256(recipes.encode()).hexdigest()[:12]}


def _digest(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir():
    """$BONSAI_TF_LATENCY_DIR, else $XDG_CACHE_HOME/bonsai_tf/latency (~/.cache/...)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bonsai_tf", "latency")


def cache_path(space, threads=DEFAULT_THREADS, directory=None):
    """The table file of this machine, `threads` and `space` in `directory` (`cache_dir()`)."""
    key = cache_key(space, threads)
    return os.path.join(directory or cache_dir(), f"{space}-{key['threads']}t-{_digest(key)}.json")


class LatencyTable:
    """Measured medians (ms) by mode ("float", "int8") and entry name, and their key."""

    def __init__(self, key, entries=None, path=None):
        self.key = dict(key)
        self.entries = {m: dict((entries or {}).get(m, {})) for m in MODES}
        self.path = path
        self.measured = 0   # entries load_or_build measured (not read from the file)

    @property
    def space(self):
        return self.key["space"]

    def raw(self, entry, quantized):
        """The entry's measured median (ms), per-invocation cost included."""
        found = self.entries[_mode(quantized)].get(entry_name(entry))
        if found is None:
            raise LatencyError(f"the latency table has no {_mode(quantized)} entry "
                               f"{entry_name(entry)!r}: expected a table built for this "
                               "network (load_or_build with its genotype)")
        return float(found["ms"])

    def has(self, entry, quantized):
        return entry_name(entry) in self.entries[_mode(quantized)]

    def baseline(self, entry, quantized):
        """The median of the entry's baseline: timed in turn with it, else its own entry."""
        found = self.entries[_mode(quantized)].get(entry_name(entry), {})
        if "baseline_ms" in found:
            return float(found["baseline_ms"])
        return self.raw(baseline_of(entry), quantized)

    def ms(self, entry, quantized):
        """The entry's own latency: its median minus its baseline's (`baseline_of`), >= 0.

        Baselines ("empty", "input") are returned as measured (per-invocation costs);
        ("sum", shape, k) is interpolated where k was not measured.
        """
        if entry[0] in ("empty", "input"):
            return self.raw(entry, quantized)
        if entry[0] == "sum" and not self.has(entry, quantized):
            return self._sum_ms(entry[1], entry[2], quantized)
        return max(self.raw(entry, quantized) - self.baseline(entry, quantized), 0.0)

    def _sum_ms(self, shape, k, quantized):
        prefix = f"sum:{_fmt(shape)}:k"
        ks = sorted(int(n[len(prefix):]) for n in self.entries[_mode(quantized)]
                    if n.startswith(prefix))
        if not ks:
            raise LatencyError(f"the latency table has no {_mode(quantized)} sums at "
                               f"{_fmt(shape)} (for {k} terms): expected a table built for "
                               "this network (load_or_build with its genotype)")
        cost = {n: self.ms(("sum", shape, n), quantized) for n in ks}
        if len(ks) == 1:   # one point: proportional to the number of additions
            return cost[ks[0]] * (k - 1) / (ks[0] - 1)
        lower = [n for n in ks if n < k]
        upper = [n for n in ks if n > k]
        a, b = ((lower[-1], upper[0]) if lower and upper else
                (ks[-2], ks[-1]) if lower else (ks[0], ks[1]))
        return max(cost[a] + (cost[b] - cost[a]) * (k - a) / (b - a), 0.0)

    def set(self, entry, quantized, ms, repeats, rounds=1, baseline_ms=None):
        """Records a measurement; baseline_ms: its baseline's, timed in turn with it."""
        record = {"ms": float(ms), "repeats": int(repeats), "rounds": int(rounds),
                  "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds")}
        if baseline_ms is not None:
            record["baseline_ms"] = float(baseline_ms)
        self.entries[_mode(quantized)][entry_name(entry)] = record

    def to_dict(self):
        return {"format": FORMAT, "version": VERSION, "key": self.key, "entries": self.entries}

    def save(self, path=None):
        """Writes the table atomically, keeping entries another process wrote meanwhile."""
        path = path or self.path
        if path is None:
            raise LatencyError("the latency table has no path: expected save(path)")
        if os.path.exists(path):
            try:
                other = LatencyTable.load(path, self.key)
            except LatencyError:
                other = None   # foreign or corrupt: replaced
            if other is not None:
                for m in MODES:
                    self.entries[m] = {**other.entries[m], **self.entries[m]}
        try:
            rd.write_json(path, self.to_dict())
        except rd.RunDirError as e:
            raise LatencyError(str(e)) from None
        self.path = path

    @classmethod
    def load(cls, path, key=None):
        """Reads a table file; with `key`, refuses one measured under another key."""
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise LatencyError(f"cannot read latency table {path!r}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LatencyError(f"latency table {path!r} is not JSON ({e}): expected a "
                               f"{FORMAT} file written by load_or_build; delete it or "
                               "rebuild") from None
        ok = (isinstance(d, dict) and d.get("format") == FORMAT and isinstance(d.get("key"), dict)
              and isinstance(d.get("entries"), dict)
              and all(isinstance(d["entries"].get(m, {}), dict) for m in MODES)
              and all(isinstance(v, dict) and isinstance(v.get("ms"), (int, float))
                      for m in MODES for v in d["entries"].get(m, {}).values()))
        if not ok:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise LatencyError(f"latency table {path!r} is not a {FORMAT} table (format "
                               f"{got!r}, or malformed entries): expected a file written "
                               "by load_or_build; delete it or rebuild")
        if d.get("version") != VERSION:
            raise LatencyError(f"latency table {path!r} has version {d.get('version')!r}: "
                               f"expected {VERSION}; rebuild it")
        if key is not None and d["key"] != key:
            diff = {k: (d["key"].get(k), key.get(k)) for k in set(d["key"]) | set(key)
                    if d["key"].get(k) != key.get(k)}
            raise LatencyError(f"latency table {path!r} was measured under another key "
                               f"(field: (file, expected)) {diff}: expected one of this "
                               "machine, thread count, runtime and space; rebuild it")
        return cls(d["key"], d["entries"], path)

    def rows(self, quantized):
        """[(entry name, measured ms, ms without the per-invocation cost)] of one mode."""
        out = []
        for name in sorted(self.entries[_mode(quantized)]):
            raw = self.entries[_mode(quantized)][name]["ms"]
            entry = _parse_name(name)
            out.append((name, raw, self.ms(entry, quantized) if entry else None))
        return out


def _parse_name(name):
    parts = name.split(":")
    try:
        shape = lambda s: tuple(int(v) for v in s.split("x"))  # noqa: E731
        num = lambda s: int(s[1:])  # noqa: E731
        kind = parts[0]
        if kind == "op":
            return ("op", parts[1], shape(parts[2]), num(parts[3]))
        if kind in ("empty", "input", "relu", "bn"):
            return (kind, shape(parts[1]))
        if kind in ("stem", "adapt"):
            return (kind, shape(parts[1]), num(parts[2]), num(parts[3]))
        if kind in ("subsample", "sum", "head"):
            return (kind, shape(parts[1]), num(parts[2]))
    except (IndexError, ValueError):
        pass
    return None


def _measure(entry, quantized, repeats, threads, warmup, rounds):
    """(ms, baseline ms or None). Looked up at call time: tests count measurements by
    replacing op_latency and part_latency."""
    if entry[0] == "op":
        return op_latency(entry[1], entry[2], entry[3], quantized, repeats, threads,
                          warmup=warmup, rounds=rounds, baseline=True)
    if entry[0] in ("empty", "input"):
        return part_latency(entry, quantized, repeats, threads, warmup=warmup,
                            rounds=rounds), None
    return part_latency(entry, quantized, repeats, threads, warmup=warmup, rounds=rounds,
                        baseline=True)


def load_or_build(genotype, quantized=(False, True), threads=DEFAULT_THREADS,
                  repeats=DEFAULT_REPEATS, warmup=DEFAULT_WARMUP, directory=None, path=None,
                  rebuild=False, all_ops=True, log=None, rounds=DEFAULT_ROUNDS):
    """The table for `genotype` on this machine: cached entries reused, missing ones measured.

    Args:
      genotype: the network (or search space) to cover; see `required` and `all_ops`.
      quantized: False (float32), True (int8) or both, (False, True).
      threads: LiteRT interpreter threads (part of the cache key).
      repeats, warmup, rounds: timed and untimed invocations per entry, and how many
        medians of `repeats` (the lowest is kept; see DEFAULT_ROUNDS).
      directory: cache directory (default `cache_dir()`); path: the table file itself
        (default `cache_path(space, threads, directory)`).
      rebuild: measure every required entry again (others in the file are kept).
      log: called with one line per measured entry, e.g. print.
    The file is written after every measured entry. `table.measured` counts them.
    """
    g = _check_genotype(genotype)
    modes = _modes(quantized)
    repeats, warmup = _check_int("repeats", repeats, 1), _check_int("warmup", warmup, 0)
    rounds = _check_int("rounds", rounds, 1)
    key = cache_key(g.space, threads)
    path = os.fspath(path) if path else cache_path(g.space, threads, directory)
    table = None
    if os.path.exists(path):
        try:
            table = LatencyTable.load(path, key)
        except LatencyError:
            if not rebuild:
                raise
    table = table or LatencyTable(key, path=path)
    table.measured = 0
    needed = required(g, all_ops)
    for q in modes:
        for entry in needed:
            if rebuild or not table.has(entry, q):
                started = time.perf_counter()
                ms, base = _measure(entry, q, repeats, threads, warmup, rounds)
                table.set(entry, q, ms, repeats, rounds, base)
                table.measured += 1
                table.save(path)
                if log is not None:
                    paired = "" if base is None else f" (baseline {base:.4f} ms)"
                    log(f"{_mode(q):5s} {entry_name(entry)}: {ms:.4f} ms{paired} "
                        f"[{time.perf_counter() - started:.1f} s]")
    return table


# --------------------------------------------------------------------------- prediction

def _check_use(genotype, table, quantized):
    g = _check_genotype(genotype).canonical().validate()
    if not isinstance(table, LatencyTable):
        raise LatencyError(f"table is a {type(table).__name__}: expected a LatencyTable "
                           "(load_or_build or LatencyTable.load)")
    if table.space != g.space:
        raise LatencyError(f"the latency table is of space {table.space!r}, the genotype of "
                           f"{g.space!r}: expected a table of the genotype's space")
    _mode(quantized)
    return g


def breakdown(genotype, table, quantized=False):
    """[(label, ms)] of every part of `genotype`'s network, from `table` (see `predict`)."""
    g = _check_use(genotype, table, quantized)
    return [(label, table.ms(item, quantized)) for label, item in _walk(g)]


def predict(genotype, table, quantized=False):
    """Predicted batch-1 latency (ms) of `genotype`'s deployed TFLite network.

    The sum of its operations' entries and its fixed parts' (stem, ReLUs of tensors,
    adapters, y subsampling and sums, node sums and batch norms, head), each without the
    per-invocation cost, plus that cost once (`input` at the image shape). Found within
    a factor PREDICTION_TOLERANCE of the measured network (`network_latency`) here; see
    the module docstring for why the two differ.
    """
    return float(sum(ms for _, ms in breakdown(genotype, table, quantized)))


def edge_latencies(genotype, table, quantized=False):
    """{(cell, src, dst, op): ms} of every live operation of `genotype`: a latency loss's terms.

    Without the ReLUs operations start with: `predict` counts those once per tensor.
    """
    g = _check_use(genotype, table, quantized)
    out = {}
    for label, item in _walk(g):
        if item[0] == "op":
            cell, edge, op = label.split(" ")
            src, dst = edge.split("->")
            key = (int(cell[4:]), src if src in ("x", "y") else int(src), int(dst), op)
            out[key] = table.ms(item, quantized)
    return out
