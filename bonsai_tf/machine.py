"""What the machine at hand offers, read in one place.

Machines of the same kind differ underneath: CPU vendor and features (AVX-512 or
AVX2 only), whether TensorFlow's allocator reports statistics, GPUs, the cores
this process may use. Every branch of bonsai-tf that depends on such a fact asks
this module (or `memory.measure_step_peak`), so that tests can force each answer
with monkeypatch and prove both sides of the branch on any machine.

Nothing here imports TensorFlow.
"""

import os
import platform

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def use_onednn_by_default():
    """Turns TensorFlow's oneDNN kernels on unless the user chose otherwise.

    TensorFlow enables oneDNN by default only on CPUs with AVX-512 and newer
    instruction sets; on AVX2-only CPUs (AMD EPYC here) it leaves it off. A full
    supernet step there was 2.3x faster with it on (7.42 -> 3.27 s/step, 32x32x3,
    scale 16, 3 cells; README), and its allocator then reports memory statistics.
    Must run before TensorFlow is imported; returns whether it took effect.
    """
    import sys
    if "tensorflow" in sys.modules:
        return False
    os.environ.setdefault(ONEDNN_ENV, "1")
    return True


def onednn_setting():
    """'1', '0' or 'default' (unset): the oneDNN choice this process runs with."""
    return os.environ.get(ONEDNN_ENV, "default")


def usable_cpus():
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


# Up to this many usable cores, independent ops run side by side (inter-op threads,
# one per core) and each op single-threaded: a supernet is hundreds of small parallel
# branches. On 2 cores here that made a quick-configuration supernet step 22% faster
# (0.361 -> 0.283 s) and its final network's 21% (0.145 -> 0.114 s) than TensorFlow's
# default (2 and 2). Larger machines keep TensorFlow's defaults: not measured.
FEW_CORES = 4


def thread_plan(cpus=None):
    """(inter-op, intra-op) thread counts for TensorFlow; 0 means TensorFlow's default."""
    cpus = usable_cpus() if cpus is None else cpus
    return (cpus, 1) if cpus <= FEW_CORES else (0, 0)


def configure_threads(inter=None, intra=None):
    """Applies `thread_plan()` (or the given counts) to TensorFlow, before it starts its
    runtime; returns the counts in effect, or None where it had already started."""
    import tensorflow as tf
    plan = thread_plan()
    inter = plan[0] if inter is None else inter
    intra = plan[1] if intra is None else intra
    try:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    except RuntimeError:  # the runtime is already initialised: its counts stay
        return None
    return inter, intra


GRAPH_OPTIMIZER_CHOICES = ("auto", "on", "off")


def graph_optimizer_on(choice, has_gpu):
    """Whether TensorFlow's graph optimizer (Grappler) runs on traced steps.

    "auto" turns it off on machines without a GPU. A search retraces its step after
    every structural change, and on the CPU Grappler was most of that cost without
    making the step faster: on an idle 2-core AMD EPYC (bench/bench_step.py) the full
    294-operation supernet's first step took 52.5 s with it and 36.7 s without, its
    later steps 2.81 and 2.01 s; on one core the quick configuration's retrace after a
    deadhead took 5.0 and 3.8 s, and its final network's step 0.278 and 0.282 s
    (README, "Supernet training step"). On a GPU its layout optimizer (NHWC -> NCHW convolutions) matters, so
    "auto" keeps it there; that side was never timed here (no GPU).
    """
    if choice not in GRAPH_OPTIMIZER_CHOICES:
        raise ValueError(f"graph optimizer choice {choice!r}: expected one of "
                         f"{', '.join(GRAPH_OPTIMIZER_CHOICES)}")
    return choice == "on" or (choice == "auto" and has_gpu)


def configure_graph_optimizer(choice="auto"):
    """Applies `graph_optimizer_on` to this process (imports TensorFlow); returns it.

    The setting is process-wide and read when a traced function first runs, so it
    applies to every step traced afterwards.
    """
    import tensorflow as tf
    on = graph_optimizer_on(choice, bool(gpus()) if choice == "auto" else False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not on})
    return on


# --mixed_precision: none (float32), or a Keras mixed policy (float32 variables, half or
# bfloat16 activations). Written for GPUs and TPUs; on CPU bfloat16 runs, slower here.
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")


def set_precision_policy(choice="none"):
    """Sets Keras' global dtype policy for `choice` (imports Keras); returns its name.

    Process-wide, and read by every layer when it is made: the engine sets it before
    building a network, so a run never inherits another's policy.
    """
    if choice not in PRECISIONS:
        raise ValueError(f"mixed_precision = {choice!r}; expected one of {', '.join(PRECISIONS)}")
    import keras
    name = "float32" if choice == "none" else choice
    keras.mixed_precision.set_global_policy(name)
    return name


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model():
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags():
    """The CPU's feature flags (Linux), e.g. {'avx2', 'avx512f', ...}; empty elsewhere."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def gpus():
    """Names of the GPUs TensorFlow sees (imports TensorFlow)."""
    import tensorflow as tf
    return [d.name for d in tf.config.list_physical_devices("GPU")]


def identity():
    """A JSON-able description of the machine, written beside every benchmark figure."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "usable_cpus": usable_cpus(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "avx2": "avx2" in flags,
            "avx512": any(f.startswith("avx512") for f in flags),
            "onednn": onednn_setting(), "python": platform.python_version()}
