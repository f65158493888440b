"""Memory (and FLOP) costs of operations and networks: analytical, and measured.

The analytical model counts the activations a training step keeps for the
backward pass: every step of an operation's recipe (bonsai_tf.space) stores its
output, an edge stores the drop-path and gated outputs, and every trainable
parameter costs its value, its gradient and one optimizer slot. It is exact in
shapes, so it ranks operations correctly on any device; `measure_step_peak`
measures the peak of a real training step (TensorFlow's allocator statistics where
the device reports them, else the process's peak resident set), and a test checks
the two agree.
"""

import dataclasses
import os

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import space as space_lib

BYTES = 4  # float32
PARAM_COPIES = 3  # value, gradient, momentum


def _ceil_div(v, s):
    return (v + s - 1) // s


@dataclasses.dataclass(frozen=True)
class OpCost:
    activations: int   # elements kept per example
    params: int
    flops: int         # multiply-adds per example

    def bytes(self, batch):
        return BYTES * (self.activations * batch + PARAM_COPIES * self.params)


# Steps whose backward pass needs their input tensor; ReLU's and ReLU6's need their output.
NEEDS_INPUT = frozenset({"dw", "pw", "expand", "project", "conv", "bn", "maxpool"})
NEEDS_OUTPUT = frozenset({"relu", "relu6"})


def op_cost(op, h, w, c, stride):
    """Cost of one gated candidate operation on an (h, w, c) input with `stride`.

    Counts the tensors the backward pass keeps: inputs of convolutions, batch norms
    and max pools, outputs of ReLUs, and the operation's gated output, which lives
    until its node sums it (and which the pruner's gradient needs where the gate is
    a multiply): so identity and pooling cost their output, as the reference
    measures them (operation plus pruner output). The operation's own input belongs
    to the node that produced it and is counted there. An edge computes one ReLU
    for all its operations that start with one; `estimate` counts it once.
    """
    params = flops = 0
    s = stride
    sizes = []          # element count of every step's output
    extra = 0
    kept = set()
    steps = space_lib.recipe(op)
    # Each step at its own width (space.step_channels): e x c between expand and project.
    widths = space_lib.step_channels(op, c)
    if s > 1 and not any(step[0] in space_lib.SPATIAL_STEPS for step in steps):
        h, w, s = _ceil_div(h, s), _ceil_div(w, s), 1  # subsampled up front (layers.Operation)
    for i, (step, (cin, cout)) in enumerate(zip(steps, widths)):
        kind = step[0]
        if kind in space_lib.SPATIAL_STEPS:
            st, s = s, 1
        else:
            st = 1
        if kind == "dw" and step[2] > 1 and st > 1:
            extra += h * w * cout  # computed at stride 1, then subsampled (layers.Operation)
        oh, ow = _ceil_div(h, st), _ceil_div(w, st)
        out = oh * ow * cout
        if kind == "dw":
            params += step[1] * step[1] * cin
            flops += out * step[1] * step[1]
        elif kind == "conv":
            params += step[1] * step[1] * cin * cout
            flops += out * step[1] * step[1] * cin
        elif kind in ("pw", "expand", "project"):
            params += cin * cout
            flops += out * cin
        elif kind == "bn":
            params += 2 * cout
        elif kind in ("maxpool", "avgpool"):
            flops += out * step[1] * step[1]
        if kind in NEEDS_INPUT and i > 0:
            kept.add(i - 1)
        if kind in NEEDS_OUTPUT or i == len(steps) - 1:
            kept.add(i)
        sizes.append(out)
        h, w = oh, ow
    acts = extra + sum(sizes[i] for i in kept)
    return OpCost(acts, params, flops)


def stem_shape(genotype):
    h, w, _ = genotype.input_shape
    s = genotype.stem_stride
    return _ceil_div(h, s), _ceil_div(w, s), genotype.scale


def cell_shapes(genotype):
    """[(input h, input w, channels)] of every cell."""
    h, w, _ = stem_shape(genotype)
    shapes = []
    for cell in genotype.cells:
        shapes.append((h, w, cell.channels))
        if cell.reduction:
            h, w = _ceil_div(h, 2), _ceil_div(w, 2)
    return shapes


def edge_op_cost(genotype, c, src, op):
    h, w, ch = cell_shapes(genotype)[c]
    stride = 2 if genotype.cells[c].reduction and src in ("x", "y") else 1
    if stride == 1 and genotype.cells[c].reduction:
        h, w = _ceil_div(h, 2), _ceil_div(w, 2)
    return op_cost(op, h, w, ch, stride)


def cell_op_bytes(genotype, batch):
    """{cell index: {(src, dst, op): bytes}} for every operation of every cell."""
    out = {}
    for c, cell in enumerate(genotype.cells):
        out[c] = {(e.src, e.dst, op): edge_op_cost(genotype, c, e.src, op).bytes(batch)
                  for e in cell.edges for op, _ in e.ops}
    return out


def _fixed_cost(genotype):
    """Activations and parameters outside the candidate operations."""
    ih, iw, cin = genotype.input_shape
    h, w, _ = stem_shape(genotype)
    acts = 2 * ih * iw * cin + 2 * h * w * genotype.scale  # input, normalised; stem conv, BN
    params = 9 * cin * genotype.scale + 2 * genotype.scale
    out_shapes = [(h, w, genotype.scale)]
    for c, (ch_h, ch_w, ch) in enumerate(cell_shapes(genotype)):
        cell = genotype.cells[c]
        prev = out_shapes[-1]
        if prev[2] != ch and any(e.src == "x" for e in cell.edges):
            acts += 3 * ch_h * ch_w * ch  # relu, conv, bn
            params += prev[2] * ch + 2 * ch
        if any(e.src == "y" for e in cell.edges):
            for j, _ in cell.inputs:
                jh, jw, jc = out_shapes[j]
                if jc != ch:
                    acts += jh * jw * jc + 2 * ch_h * ch_w * ch
                    params += jc * ch + 2 * ch
                acts += 2 * ch_h * ch_w * ch  # gate output and running sum
        oh, ow = (_ceil_div(ch_h, 2), _ceil_div(ch_w, 2)) if cell.reduction else (ch_h, ch_w)
        nodes = {e.dst for e in cell.edges}
        acts += 2 * len(nodes) * oh * ow * ch  # node sum and node BN
        params += 2 * ch * len(nodes)
        out_shapes.append((oh, ow, ch))
    heads = [len(genotype.cells) - 1] + genotype_lib.head_cells(genotype)
    for c in heads:
        oh, ow, ch = out_shapes[c + 1]
        acts += ch + genotype.num_classes
        params += ch * genotype.num_classes + genotype.num_classes
    return acts, params


def shared_relu_elements(genotype, c, edge):
    """Elements per example that op_cost counts more than once on `edge`.

    Each operation's cost counts its leading ReLU, as it would cost alone; the edge
    computes that ReLU once for all of them (layers.Edge).
    """
    k = sum(space_lib.recipe(op)[0] == ("relu",) for op, _ in edge.ops)
    if k < 2:
        return 0
    h, w, ch = cell_shapes(genotype)[c]
    if edge.src not in ("x", "y") and genotype.cells[c].reduction:
        h, w = _ceil_div(h, 2), _ceil_div(w, 2)
    return (k - 1) * h * w * ch


def estimate(genotype, batch):
    """Analytical training memory of `genotype` at `batch`: dict of bytes and counts."""
    acts, params = _fixed_cost(genotype)
    op_acts = op_params = flops = 0
    for c, cell in enumerate(genotype.cells):
        for e in cell.edges:
            op_acts -= shared_relu_elements(genotype, c, e)
            for op, _ in e.ops:
                cost = edge_op_cost(genotype, c, e.src, op)
                op_acts += cost.activations
                op_params += cost.params
                flops += cost.flops
    total_params = params + op_params
    total = BYTES * ((acts + op_acts) * batch + PARAM_COPIES * total_params)
    return {"bytes": total, "mb": total / 2**20, "params": total_params, "flops": flops,
            "operation_bytes": BYTES * (op_acts * batch + PARAM_COPIES * op_params)}


# ---- budget sizing (BONSAINET.md section 5) --------------------------------------
def _scaled_estimate(genotype, batch, keep):
    """Memory with every cell's operation memory scaled by `keep` (random choice, expected)."""
    full = estimate(genotype, batch)
    return full["bytes"] - (1.0 - keep) * full["operation_bytes"]


def size_budget(start, budget_bytes, batch, max_patterns, ops_in_space):
    """Plans growth under a memory budget.

    Returns (initial pattern count, {n: e_c(n)}): e_c(n) is the largest keep ratio in
    [1/ops, 1] such that n patterns kept at that ratio plus one new, unpruned pattern
    fit the budget; absent where even the smallest ratio does not fit.
    """
    g = start
    while genotype_lib.num_patterns(g) > 1:
        g = dataclasses.replace(g, cells=g.cells[:-len(genotype_lib.pattern_codes(
            g.patterns, genotype_lib.num_patterns(g) - 1))])
    genos = [g]
    while genotype_lib.num_patterns(genos[-1]) < max_patterns + 1:
        genos.append(genotype_lib.grow(genos[-1]))
    first = 0
    for n in range(1, max_patterns + 1):
        if estimate(genos[n - 1], batch)["bytes"] <= budget_bytes:
            first = n
    ratios = {}
    for n in range(1, max_patterns):
        old, grown = genos[n - 1], genos[n]
        new_bytes = estimate(grown, batch)["bytes"] - estimate(old, batch)["bytes"]

        def fits(keep):
            return _scaled_estimate(old, batch, keep) + new_bytes <= budget_bytes
        lo, hi = 1.0 / ops_in_space, 1.0
        if not fits(lo):
            continue
        if fits(hi):
            ratios[n] = 1.0
            continue
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        ratios[n] = lo
    return first, ratios


SOURCE_ENV = "BONSAI_TF_MEMORY_SOURCE"
SOURCES = ("auto", "allocator", "rss", "none")


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """The measured peak of one step: `bytes` (None if unmeasured) and where it came from."""
    bytes: object      # int or None
    source: str        # "allocator", "rss" or "none"

    @property
    def mb(self):
        return None if self.bytes is None else self.bytes / 2**20


def measure_step_peak(step_fn, device=None, source=None):
    """Runs `step_fn()` exactly once and measures its peak memory above the level before.

    Sources, tried in this order unless `source` (or $BONSAI_TF_MEMORY_SOURCE) names one:
      allocator: TensorFlow's allocator statistics of `device` (default: the first GPU,
        else the CPU). Only some builds and CPUs report them: TensorFlow 2.21 does on
        the CPU when its oneDNN kernels are on, not on an AVX2-only CPU with them off.
      rss: the process's peak resident set (Linux): freed heap memory is returned to
        the OS (malloc_trim), the peak is reset through /proc/self/clear_refs, and
        VmHWM is read after the step.
      none: the step runs unmeasured.
    Returns a StepMemory. The step always runs, whatever the machine offers.
    """
    source = source or os.environ.get(SOURCE_ENV) or "auto"
    if source not in SOURCES:
        raise ValueError(f"memory source {source!r}; expected one of {SOURCES}")
    if source in ("auto", "allocator"):
        measured = _allocator_peak(step_fn, device)
        if measured is not None:
            return measured
        if source == "allocator":
            step_fn()
            return StepMemory(None, "none")
    if source in ("auto", "rss") and rss_supported():
        return _rss_peak(step_fn)
    step_fn()
    return StepMemory(None, "none")


def allocator_stats_device(device=None):
    """The device whose allocator statistics can be reset and read, or None."""
    import tensorflow as tf
    if device is None:
        device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    try:
        tf.config.experimental.reset_memory_stats(device)
        tf.config.experimental.get_memory_info(device)
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None
    return device


def _allocator_peak(step_fn, device):
    import tensorflow as tf
    device = allocator_stats_device(device)
    if device is None:
        return None
    base = tf.config.experimental.get_memory_info(device)["current"]
    step_fn()
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    return StepMemory(max(0, peak - base), "allocator")


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(field):
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{_STATUS} has no {field}")


def rss_supported():
    """Whether the peak resident set can be reset and read (Linux, own clear_refs)."""
    try:
        _status_kb("VmHWM")
        return os.access(_CLEAR_REFS, os.W_OK)
    except OSError:
        return False


def _trim_heap():
    """Returns freed heap pages to the OS, so that RSS counts live memory only (glibc)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes cached free memory
        pass


def _rss_peak(step_fn):
    _trim_heap()
    try:
        base = _status_kb("VmRSS")
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        step_fn()
        return StepMemory(None, "none")
    step_fn()
    return StepMemory(max(0, _status_kb("VmHWM") - base) * 1024, "rss")
