"""Keras layers of the search space: the saw-gate pruner, operations, edges, cells.

Every layer follows the Keras contract (arguments checked in __init__, weights in
build, call(inputs, training=None), get_config) and is registered serialisable.
Cells and edges are built from genotype data; passing `reuse=` an older cell
builds a new cell that takes over the older one's surviving sub-layers (and so
their trained weights) and simply does not track what was removed: after the
model is rebuilt, removed operations and their variables are gone from it.
"""

import keras
from keras import ops as K

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import space as space_lib

PACKAGE = "bonsai_tf"
# Saw-gate constant (BONSAINET.md section 1). Only the straight-through form is
# used in the graph, so M matters for documentation and the reference test only.
SAW_M = 1e5


def saw_gate_value(w):
    """Forward value exactly step(w) in {0, 1}; gradient exactly 1 (straight-through).

    Built from ordinary ops (no custom gradient) so that graphs export cleanly.
    """
    step = K.cast(K.greater(w, 0.0), w.dtype)
    return step + (w - K.stop_gradient(w))


@keras.saving.register_keras_serializable(PACKAGE)
class SawGate(keras.layers.Layer):
    """Differential pruner: multiplies its input by g(w) in {0, 1}.

    State that must survive a restart lives in non-trainable variables so that
    checkpoints carry it: `open_records` counts the per-epoch records at which the
    gate was open since the last deadhead, `records` counts all of them.
    """

    def __init__(self, init_weight=0.1, clamp=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(init_weight, (int, float)):
            raise ValueError(f"init_weight must be a number, got {init_weight!r}")
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be positive or None, got {clamp!r}")
        self.init_weight = float(init_weight)
        self.clamp = None if clamp is None else float(clamp)

    def build(self, input_shape=None):
        constraint = None
        if self.clamp is not None:
            c = self.clamp
            constraint = lambda w: K.clip(w, -c, c)  # noqa: E731 - SpiderNet's clamp
        self.w = self.add_weight(name="w", shape=(), trainable=True, constraint=constraint,
                                 initializer=keras.initializers.Constant(self.init_weight))
        self.open_records = self.add_weight(name="open_records", shape=(), trainable=False,
                                            initializer="zeros")
        self.records = self.add_weight(name="records", shape=(), trainable=False,
                                       initializer="zeros")

    def gate(self):
        return saw_gate_value(self.w)

    def call(self, inputs, training=None):
        return inputs * K.cast(self.gate(), inputs.dtype)

    def record(self):
        """Notes whether the gate is open now (once per epoch)."""
        self.open_records.assign_add(K.cast(K.greater(self.w, 0.0), "float32"))
        self.records.assign_add(1.0)

    def reset_records(self):
        self.open_records.assign(0.0)
        self.records.assign(0.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_weight": self.init_weight, "clamp": self.clamp}


@keras.saving.register_keras_serializable(PACKAGE)
class Subsample(keras.layers.Layer):
    """Strided spatial subsampling (identity on a strided edge, input adaptation)."""

    def __init__(self, stride=2, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.stride = stride

    def call(self, inputs):
        s = self.stride
        # A 1x1 pooling window with stride s picks the same pixels as x[:, ::s, ::s]
        # but its gradient is 4x cheaper on CPU than the strided slice's (measured).
        return inputs if s == 1 else K.average_pool(inputs, 1, strides=s, padding="same")

    def compute_output_shape(self, shape):
        s = self.stride
        f = lambda v: None if v is None else (v + s - 1) // s  # noqa: E731
        return (shape[0], f(shape[1]), f(shape[2]), shape[3])

    def get_config(self):
        return {**super().get_config(), "stride": self.stride}


@keras.saving.register_keras_serializable(PACKAGE)
class Zeros(keras.layers.Layer):
    def __init__(self, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.stride = stride
        self.sub = Subsample(stride)

    def call(self, inputs):
        return K.zeros_like(self.sub(inputs))

    def get_config(self):
        return {**super().get_config(), "stride": self.stride}


@keras.saving.register_keras_serializable(PACKAGE)
class Standardize(keras.layers.Layer):
    """Per-channel (x - mean) / std with fixed constants: normalisation inside the model."""

    def __init__(self, mean=(0.0,), std=(1.0,), **kwargs):
        super().__init__(**kwargs)
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean and std must have equal lengths and std > 0, got {mean!r}, {std!r}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def call(self, inputs):
        x = K.cast(inputs, "float32")
        return (x - K.convert_to_tensor(self.mean)) * K.convert_to_tensor([1.0 / s for s in self.std])

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std)}


@keras.saving.register_keras_serializable(PACKAGE)
class BatchNorm(keras.layers.Layer):
    """Batch norm over the last axis with TensorFlow's fused kernel while training.

    Every candidate operation holds up to two batch norms and every node one, so
    they dominate a supernet step on CPU: keras.layers.BatchNormalization took
    4.4 ms per forward+backward at 64x14x14x32 here, the fused kernel 1.9 ms.
    Inference uses plain multiply-add, which every exporter folds.
    """

    def __init__(self, momentum=0.9, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon!r}")
        self.momentum, self.epsilon = float(momentum), float(epsilon)

    def build(self, input_shape):
        c = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros")
        self.moving_mean = self.add_weight(name="moving_mean", shape=(c,), initializer="zeros",
                                           trainable=False)
        self.moving_variance = self.add_weight(name="moving_variance", shape=(c,),
                                               initializer="ones", trainable=False)

    def call(self, inputs, training=None):
        import tensorflow as tf  # the fused kernel is TensorFlow's; this package runs on it
        if training:
            y, mean, var = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma.value, self.beta.value, epsilon=self.epsilon, is_training=True)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))
            return y
        scale = self.gamma * K.rsqrt(self.moving_variance + self.epsilon)
        return inputs * scale + (self.beta - self.moving_mean * scale)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


def batch_norm(name):
    return BatchNorm(momentum=0.9, epsilon=1e-5, name=name)


def _step_layer(step, channels, stride, name):
    kind = step[0]
    if kind == "relu":
        return keras.layers.ReLU(name=name)
    if kind == "bn":
        return batch_norm(name)
    if kind == "pw":
        return keras.layers.Conv2D(channels, 1, use_bias=False, name=name)
    if kind == "conv":
        return keras.layers.Conv2D(channels, step[1], strides=stride, padding="same",
                                   use_bias=False, name=name)
    if kind == "dw":
        # TF has no depthwise convolution with both stride and dilation > 1, so
        # such a step runs at stride 1 and is subsampled after (see Operation).
        s = 1 if step[2] > 1 else stride
        return keras.layers.DepthwiseConv2D(step[1], strides=s, dilation_rate=step[2],
                                            padding="same", use_bias=False, name=name)
    if kind == "maxpool":
        return keras.layers.MaxPooling2D(step[1], strides=stride, padding="same", name=name)
    if kind == "avgpool":
        return keras.layers.AveragePooling2D(step[1], strides=stride, padding="same", name=name)
    if kind == "identity":
        return Subsample(stride, name=name)
    if kind == "zero":
        return Zeros(stride, name=name)
    raise ValueError(f"unknown step {step!r}")


@keras.saving.register_keras_serializable(PACKAGE)
class Operation(keras.layers.Layer):
    """One candidate operation, run from its recipe in `bonsai_tf.space`."""

    def __init__(self, op, channels, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.recipe = space_lib.recipe(op)
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.op, self.channels, self.stride = op, channels, stride
        self.steps = []
        strided = stride
        for i, step in enumerate(self.recipe):
            s = strided if step[0] in space_lib.SPATIAL_STEPS else 1
            self.steps.append(_step_layer(step, channels, s, f"{step[0]}{i}"))
            if s > 1 and step[0] == "dw" and step[2] > 1:
                self.steps.append(Subsample(s, name=f"sub{i}"))
            if step[0] in space_lib.SPATIAL_STEPS:
                strided = 1

    def build(self, input_shape):
        # Sub-layers build themselves on the first (symbolic) call.
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        for layer in self.steps:
            x = layer(x, training=training) if isinstance(layer, BatchNorm) else layer(x)
        return x

    def get_config(self):
        return {**super().get_config(), "op": self.op, "channels": self.channels, "stride": self.stride}


@keras.saving.register_keras_serializable(PACKAGE)
class DropPath(keras.layers.Layer):
    """Drops a whole branch per example during training (scaled by 1/keep)."""

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if rate > 0 else None

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (K.shape(inputs)[0], 1, 1, 1)
        mask = K.floor(keep + keras.random.uniform(shape, seed=self.seed_generator))
        return inputs * mask / keep

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _conv_bn(channels, name, stride=1):
    # Inner layers are named explicitly: variable paths key checkpoints and must not
    # depend on how many layers the process created before (Keras' auto-names do).
    return keras.Sequential([keras.layers.ReLU(name="relu"),
                             keras.layers.Conv2D(channels, 1, strides=stride, use_bias=False,
                                                 name="conv"),
                             batch_norm("bn")],
                            name=name)


def edge_name(src, dst):
    return f"e_{src}_{dst}"


@keras.saving.register_keras_serializable(PACKAGE)
class Edge(keras.layers.Layer):
    """Sum over the surviving operations of one edge, each behind its own pruner."""

    def __init__(self, ops, channels, stride=1, init_weights=None, with_pruners=True,
                 drop_path=0.0, seed=None, reuse=None, **kwargs):
        super().__init__(**kwargs)
        if not ops:
            raise ValueError("an edge needs at least one operation, got none")
        init_weights = list(init_weights) if init_weights is not None else [0.1] * len(ops)
        if len(init_weights) != len(ops):
            raise ValueError(f"got {len(init_weights)} init_weights for {len(ops)} operations")
        self.op_names = list(ops)
        self.channels, self.stride = channels, stride
        self.init_weights = [float(w) for w in init_weights]
        self.with_pruners, self.drop_path, self.seed = with_pruners, float(drop_path), seed
        old = reuse.by_op() if reuse is not None else {}
        self.operations, self.pruners, self.drops = [], [], []
        for k, (op, w) in enumerate(zip(self.op_names, self.init_weights)):
            prev = old.get(op)
            self.operations.append(prev[0] if prev else Operation(op, channels, stride, name=op))
            pruner = None
            if with_pruners:
                pruner = prev[1] if prev and prev[1] is not None else SawGate(w, name=f"g_{op}")
            self.pruners.append(pruner)
            drop = None
            if drop_path > 0 and not space_lib.is_identity(op):
                drop = DropPath(drop_path, seed=None if seed is None else seed + k, name=f"dp_{op}")
            self.drops.append(drop)

    def by_op(self):
        return {op: (o, p) for op, o, p in zip(self.op_names, self.operations, self.pruners)}

    def build(self, input_shape):
        # Sub-layers build themselves on the first (symbolic) call; reused ones already are.
        self.built = True

    def call(self, inputs, training=None):
        total = None
        for op, pruner, drop in zip(self.operations, self.pruners, self.drops):
            y = op(inputs, training=training)
            if drop is not None:
                y = drop(y, training=training)
            if pruner is not None:
                y = pruner(y)
            total = y if total is None else total + y
        return total

    def get_config(self):
        return {**super().get_config(), "ops": self.op_names, "channels": self.channels,
                "stride": self.stride, "init_weights": self.init_weights,
                "with_pruners": self.with_pruners, "drop_path": self.drop_path, "seed": self.seed}


@keras.saving.register_keras_serializable(PACKAGE)
class BonsaiCell(keras.layers.Layer):
    """A Bonsai cell built from one `genotype.Cell`.

    Called on the list of all earlier outputs [stem, cell 0, ..., previous cell];
    `x` is the last of them, `y` the gated sum of the kept ones, each adapted to
    x's resolution and this cell's channels.
    """

    def __init__(self, cell, with_pruners=True, drop_path=0.0, seed=None, reuse=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(cell, dict):
            cell = _cell_from_config(cell)
        if not isinstance(cell, genotype_lib.Cell):
            raise ValueError(f"cell must be a genotype.Cell or its dict, got {type(cell).__name__}")
        self.cell = cell
        self.with_pruners, self.drop_path, self.seed = with_pruners, float(drop_path), seed
        stride = 2 if cell.reduction else 1
        old_edges = reuse.edges if reuse is not None else {}
        self.edges = {}
        for i, e in enumerate(cell.edges):
            key = edge_name(e.src, e.dst)
            s = stride if e.src in ("x", "y") else 1
            self.edges[key] = Edge(
                [n for n, _ in e.ops], cell.channels, s, [w for _, w in e.ops],
                with_pruners=with_pruners, drop_path=drop_path,
                seed=None if seed is None else seed + 100 * i, reuse=old_edges.get(key), name=key)
        used_nodes = sorted({e.dst for e in cell.edges})
        old_bn = reuse.node_bn if reuse is not None else {}
        self.node_bn = {str(n): old_bn.get(str(n)) or batch_norm(f"node{n}") for n in used_nodes}
        self.has_x = any(e.src == "x" for e in cell.edges)
        self.input_ids = [j for j, _ in cell.inputs] if any(e.src == "y" for e in cell.edges) else []
        self.x_adapt = reuse.x_adapt if reuse is not None else None
        self.y_adapt = dict(reuse.y_adapt) if reuse is not None else {}
        self.y_gates = dict(reuse.y_gates) if reuse is not None and with_pruners else {}
        self._init_gate = dict(cell.inputs)

    def build(self, input_shapes):
        x_shape = input_shapes[-1]
        if self.has_x and self.x_adapt is None and x_shape[-1] != self.cell.channels:
            self.x_adapt = _conv_bn(self.cell.channels, "x_adapt")
        keep = {str(j) for j in self.input_ids}
        self.y_adapt = {k: v for k, v in self.y_adapt.items() if k in keep}
        self.y_gates = {k: v for k, v in self.y_gates.items() if k in keep}
        for j in self.input_ids:
            shape = input_shapes[j]
            ratio = max(1, shape[1] // x_shape[1])
            if str(j) not in self.y_adapt:
                if shape[-1] != self.cell.channels:
                    self.y_adapt[str(j)] = _conv_bn(self.cell.channels, f"y_adapt{j}", stride=ratio)
                elif ratio > 1:
                    self.y_adapt[str(j)] = Subsample(ratio, name=f"y_sub{j}")
            if self.with_pruners and str(j) not in self.y_gates:
                self.y_gates[str(j)] = SawGate(self._init_gate[j], name=f"in_g{j}")
        self.built = True

    def call(self, inputs, training=None):
        values = {}
        if self.has_x:
            x = inputs[-1]
            values["x"] = self.x_adapt(x, training=training) if self.x_adapt is not None else x
        if self.input_ids:
            y = None
            for j in self.input_ids:
                t = inputs[j]
                if str(j) in self.y_adapt:
                    t = self.y_adapt[str(j)](t, training=training)
                if str(j) in self.y_gates:
                    t = self.y_gates[str(j)](t)
                y = t if y is None else y + t
            values["y"] = y
        out = None
        for dst in range(self.cell.nodes):
            incoming = [self.edges[edge_name(e.src, e.dst)](values[e.src], training=training)
                        for e in self.cell.edges if e.dst == dst and e.src in values]
            if not incoming:
                continue
            total = incoming[0]
            for t in incoming[1:]:
                total = total + t
            values[dst] = out = self.node_bn[str(dst)](total, training=training)
        return out

    def gates(self):
        """(kind, key, pruner) for every pruner of this cell: kind is 'op' or 'input'."""
        out = []
        for key, edge in self.edges.items():
            for op, p in zip(edge.op_names, edge.pruners):
                if p is not None:
                    out.append(("op", (key, op), p))
        for j in self.input_ids:
            if str(j) in self.y_gates:
                out.append(("input", j, self.y_gates[str(j)]))
        return out

    def get_config(self):
        return {**super().get_config(), "cell": _cell_to_config(self.cell),
                "with_pruners": self.with_pruners, "drop_path": self.drop_path, "seed": self.seed}


def _cell_to_config(cell):
    return {"kind": cell.kind, "channels": cell.channels, "nodes": cell.nodes, "aux": cell.aux,
            "inputs": [[j, w] for j, w in cell.inputs],
            "edges": [[e.src, e.dst, [[n, w] for n, w in e.ops]] for e in cell.edges]}


def _cell_from_config(d):
    return genotype_lib.Cell(
        kind=d["kind"], channels=d["channels"], nodes=d["nodes"], aux=d["aux"],
        inputs=tuple((int(j), float(w)) for j, w in d["inputs"]),
        edges=tuple(genotype_lib.Edge(s, int(t), tuple((n, float(w)) for n, w in ops))
                    for s, t, ops in d["edges"]))
