"""Where a step's time goes: TensorFlow profiler traces summed by operation type.

    from profile_ops import profile
    totals = profile(lambda: step().numpy(), steps=3)
    # {"steps": 3, "op_seconds_per_step": {op type: s}, "op_share": {op type: share}}

The profiler's host trace holds one event per executed kernel, named "op name:op type",
on the line (thread) that ran it. Events nest (a function call holds the kernels it ran),
so each kernel counts only its self time: its duration less that of the kernels inside it
on its line. Totals are summed over the threads, so on 2 cores a step's op seconds can
exceed its wall-clock seconds; the shares are of that sum. Used by bench_step.py
--profile_steps (README, "Supernet training step").
"""

import collections
import glob
import os
import tempfile


def _op_type(name):
    """'cell0/sep/Conv2D:Conv2D' -> 'Conv2D'; None for events that are not kernels (an op
    name never holds a ':', the runtime's own events such as 'ExecutorState::Process' do)."""
    if name.count(":") != 1:
        return None
    kind = name.split(":")[1]
    # oneDNN's kernels are types such as '_MklNativeConv2D': a leading underscore is a type.
    return kind if kind.lstrip("_")[:1].isalpha() and "/" not in kind and " " not in kind else None


def self_seconds(xspace):
    """{op type: self seconds} summed over every line of every host plane of `xspace`
    (a tensorflow.tsl XSpace proto)."""
    totals = collections.Counter()
    for plane in xspace.planes:
        if not plane.name.startswith("/host:"):
            continue
        # (a kernel's metadata name is "op name:op type"; its display name the op name alone)
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            events = sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps))
            stack = []     # [start_ps, end_ps, op type, children's ps] of open events
            for e in events:
                while stack and stack[-1][1] <= e.offset_ps:
                    _close(stack, totals)
                stack.append([e.offset_ps, e.offset_ps + e.duration_ps,
                              _op_type(names.get(e.metadata_id, "")), 0])
            while stack:
                _close(stack, totals)
    return dict(totals)


def _close(stack, totals):
    """Pops the innermost open event: its self time to its type. A kernel's whole duration
    is its parent's children's time; an event that is no kernel (the runtime's own
    bookkeeping) passes up only its kernels' time, so the rest of it counts to the kernel
    around it."""
    start, end, kind, children = stack.pop()
    if stack:
        stack[-1][3] += children if kind is None else end - start
    if kind is not None:
        totals[kind] += max(0, end - start - children) * 1e-12


def profile(fn, steps=3, logdir=None):
    """Runs fn() `steps` times under the TensorFlow profiler; op seconds per step and shares."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    own = logdir is None
    logdir = logdir or tempfile.mkdtemp(prefix="profile_ops_")
    tf.profiler.experimental.start(logdir)
    try:
        for _ in range(steps):
            fn()
    finally:
        tf.profiler.experimental.stop()
    totals = collections.Counter()
    for path in glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        totals.update(self_seconds(space))
    if own:
        import shutil
        shutil.rmtree(logdir, ignore_errors=True)
    if not totals:
        raise RuntimeError(f"the profiler recorded no kernel events in {logdir}; expected "
                           f"'op name:op type' events on a /host: plane")
    whole = sum(totals.values())
    per_step = {k: v / steps for k, v in totals.most_common()}
    return {"steps": steps, "op_seconds_per_step": per_step,
            "op_share": {k: v / whole for k, v in totals.most_common()}}
