"""Training on several devices or processes, through TensorFlow's own engine (tf.distribute).

`--distribute` chooses:

  none          one device (TensorFlow's default strategy): the training steps are the
                single-device ones, unchanged.
  mirrored      tf.distribute.MirroredStrategy: every device of this machine holds a
                replica. On a machine without GPUs the CPU is split into `devices`
                logical devices (2 by default), which is how it is tested here.
  multi_worker  tf.distribute.MultiWorkerMirroredStrategy: one process per worker, the
                cluster read from TF_CONFIG (see `worker_config`).

Under both, each replica takes its share of every global batch; its loss is weighted
by that share (its examples over the global batch's), the gradients are summed over the
replicas (`sum_replicas`, one collective a step) and every replica applies the same
update to its copy of the variables, so weights, gates and alphas stay the same on every
replica. Batch norm normalises each replica's part of the batch by its own statistics,
as data-parallel training usually does: global-batch statistics cost a collective per
batch norm, and a supernet has hundreds of them; on 2 logical CPU devices here each
collective added 0.13-0.49 s to every trace in a micro-benchmark run while another job
shared the machine (the step is traced again after each structural change). So a mirrored run is one device's run whose batch norms see
smaller batches, not the same numbers; `tests/test_distribute.py` checks exactly that
(one step against one device stepping on the halves). The moving statistics, which
each replica updates from its part, are averaged over the replicas at the end of every
epoch (`average_replicas`): validation, checkpoints and the structural decisions
between epochs (deadhead, growth, pruning) see the same values everywhere, and
`replica_spread` checks that they do.

Nothing here runs a step; the engine asks for a strategy, its scope and the helpers.
"""

import json
import os

KINDS = ("none", "mirrored", "multi_worker")

# Logical CPU devices `mirrored` splits a GPU-less machine into unless told otherwise.
DEFAULT_CPU_DEVICES = 2

# A collective that waits longer than this for another worker fails instead of hanging:
# a killed worker then ends the others' runs (their run directory keeps the last
# epoch's checkpoint), rather than leaving them blocked forever. $BONSAI_TF_COLLECTIVE_TIMEOUT
# overrides it (the tests kill a worker and wait less).
COLLECTIVE_TIMEOUT_SECONDS = 300
TIMEOUT_ENV = "BONSAI_TF_COLLECTIVE_TIMEOUT"


def collective_timeout(environ=None):
    environ = os.environ if environ is None else environ
    raw = environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else COLLECTIVE_TIMEOUT_SECONDS
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributeError(f"${TIMEOUT_ENV}={raw!r}; expected a number of seconds > 0")
    return value


class DistributeError(ValueError):
    """A distribution setting this machine or cluster cannot provide."""


def split_cpu(devices):
    """Splits the first CPU into `devices` logical devices; returns their names.

    TensorFlow fixes its devices when its runtime starts: a split asked for afterwards
    is refused unless the runtime already has that many logical CPUs.
    """
    import tensorflow as tf
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise DistributeError(f"devices = {devices!r}; expected an integer >= 1")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError:
        pass   # the runtime has started: keep what it has, if it is what was asked
    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(names) != devices:
        raise DistributeError(f"the CPU is already split into {len(names)} logical device(s), "
                              f"{devices} were asked for: TensorFlow fixes its devices when "
                              f"its runtime starts, so ask before anything runs")
    return names


def worker_config(environ=None):
    """(cluster, task) of TF_CONFIG, checked: what `multi_worker` needs of it."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG")
    if not raw:
        raise DistributeError("distribute=multi_worker needs TF_CONFIG, the cluster and this "
                              "process's task as JSON, e.g. {\"cluster\": {\"worker\": "
                              "[\"host1:port\", \"host2:port\"]}, \"task\": {\"type\": "
                              "\"worker\", \"index\": 0}}; it is not set")
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise DistributeError(f"TF_CONFIG={raw[:80]!r} is not JSON ({e}); expected the "
                              "cluster and task as JSON") from None
    cluster = cfg.get("cluster") if isinstance(cfg, dict) else None
    task = cfg.get("task") if isinstance(cfg, dict) else None
    if not isinstance(cluster, dict) or not any(
            isinstance(v, list) and v for v in cluster.values()):
        raise DistributeError(f"TF_CONFIG's cluster is {cluster!r}; expected a dict of job "
                              "name -> [host:port, ...], e.g. {\"worker\": [...]}")
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(
            task.get("index"), int) or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise DistributeError(f"TF_CONFIG's task is {task!r}; expected {{\"type\": one of "
                              f"{sorted(cluster)}, \"index\": a position in that job's list}}")
    return cluster, task


def local_tf_configs(n):
    """TF_CONFIG values (JSON) for the n workers of a cluster on this machine's free
    127.0.0.1 ports, in task order: how the tests and bench_step start local workers."""
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(n)]


def make(kind, devices=0):
    """The tf.distribute.Strategy of `kind` (KINDS). `devices`: logical CPU devices for
    `mirrored` on a machine without GPUs (0: DEFAULT_CPU_DEVICES); with GPUs, 0 means
    every GPU."""
    import tensorflow as tf
    if kind not in KINDS:
        raise DistributeError(f"distribute = {kind!r}; expected one of {KINDS}")
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        if tf.config.list_physical_devices("GPU") and not devices:
            return tf.distribute.MirroredStrategy()
        names = split_cpu(devices or DEFAULT_CPU_DEVICES)
        # NCCL is for GPUs: on CPU devices the sum goes through one device.
        return tf.distribute.MirroredStrategy(names,
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    worker_config()
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=collective_timeout())
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def is_distributed(strategy):
    """Whether `strategy` splits steps over replicas (not TensorFlow's default one)."""
    import tensorflow as tf
    return strategy is not None and not isinstance(
        strategy, type(tf.distribute.get_strategy())) or (
        strategy is not None and strategy.num_replicas_in_sync > 1)


def is_chief(strategy):
    """Whether this process writes the run directory: always, except for a multi-worker
    cluster's workers other than the chief."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def num_workers(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, sum(len(v) for k, v in spec.items() if k in ("chief", "worker")))


def share_of(batch_size_tensor):
    """Inside a replica: this replica's examples over the global batch's (a float32 scalar)."""
    import tensorflow as tf
    ctx = tf.distribute.get_replica_context()
    n = tf.cast(batch_size_tensor, tf.float32)
    return n / ctx.all_reduce("sum", n)


def sum_replicas(values):
    """Inside a replica: every replica's list of tensors (None kept) summed, the same
    on each replica."""
    import tensorflow as tf
    ctx = tf.distribute.get_replica_context()
    present = [i for i, v in enumerate(values) if v is not None]
    if not present:
        return list(values)
    summed = ctx.all_reduce("sum", [values[i] for i in present])
    out = list(values)
    for i, v in zip(present, summed):
        out[i] = v
    return out


def _tf_variable(v):
    """The tf.Variable of a Keras variable (its `value`), or `v` itself."""
    import tensorflow as tf
    return v if isinstance(v, tf.Variable) else v.value


def _set_everywhere(strategy, variables, combine):
    """Sets every replica's copy of each float variable of `variables` to
    combine(replica context, [local values]) (one collective inside `combine`); returns
    the largest change made (0.0 on one device)."""
    import tensorflow as tf
    floats = [v for v in variables if getattr(v, "dtype", None) in ("float32", tf.float32)]
    if not floats or not is_distributed(strategy):
        return 0.0
    inner = [_tf_variable(v) for v in floats]

    @tf.function(autograph=False)
    def set_all():
        def replica():
            local = [tf.identity(v.read_value()) for v in inner]
            new = combine(tf.distribute.get_replica_context(), local)
            moved = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(n - x))
                                            for n, x in zip(new, local)]))
            for v, n in zip(inner, new):
                v.assign(n)
            return moved
        return strategy.run(replica)
    return float(max(float(r) for r in strategy.experimental_local_results(set_all())))


def average_replicas(strategy, variables):
    """Sets every replica's copy of each of `variables` (float ones) to their mean over
    the replicas and workers, in one collective: the batch norms' moving statistics,
    which each replica updates from its own part of the batch (the engine calls this at
    the end of every epoch, so validation, checkpoints and the decisions between epochs
    see one value). Returns the largest change made."""
    return _set_everywhere(strategy, variables, lambda ctx, local: ctx.all_reduce("mean", local))


def broadcast_first(strategy, variables):
    """Sets every replica's copy of each of `variables` to the first replica's (the
    chief's), in one collective: after a (re)build, whatever each process drew for
    new variables, every replica starts from the same values. Returns the largest
    change made (0.0 where they were the same already)."""
    import tensorflow as tf

    def firsts(ctx, local):
        # Everyone else sends zeros: the sum is the first replica's values.
        first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float32)
        return ctx.all_reduce("sum", [first * x for x in local])
    return _set_everywhere(strategy, variables, firsts)


def largest(strategy, value):
    """The largest of every replica's and worker's `value` (a float32 tensor), on each
    (tf.distribute has no MAX reduction: a gather, then the max)."""
    import tensorflow as tf
    return tf.reduce_max(strategy.gather(strategy.run(lambda: tf.identity(value)[None]),
                                         axis=0), axis=0)


def replica_spread(variables):
    """The largest difference between two replicas' copies of any of `variables` (0.0
    when every replica holds the same values; plain variables count 0)."""
    import numpy as np
    worst = 0.0
    for v in variables:
        copies = getattr(_tf_variable(v), "values", None)
        if not copies or len(copies) < 2:
            continue
        first = np.asarray(copies[0].numpy(), np.float64)
        for c in copies[1:]:
            worst = max(worst, float(np.max(np.abs(np.asarray(c.numpy(), np.float64) - first)))
                        if first.size else 0.0)
    return worst
