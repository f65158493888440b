"""Keras layers of the search space: the saw-gate pruner, operations, edges, cells.

Every layer follows the Keras contract (arguments checked in __init__, weights in
build, call(inputs, training=None), get_config) and is registered serialisable.
Cells and edges are built from genotype data; passing `reuse=` an older cell
builds a new cell that takes over the older one's surviving sub-layers (and so
their trained weights) and simply does not track what was removed: after the
model is rebuilt, removed operations and their variables are gone from it.

Why operations hold their variables and run TensorFlow ops directly, instead of
stacking Keras sub-layers: a supernet has thousands of primitive steps, and both
the step time and the time to trace a step after every structural change grow
with the number of graph ops. Running each step from its recipe here lets an
edge share one ReLU among its operations, fold each pruner into the operation's
last batch norm (scale and offset times g(w): no separate multiply, and the
gate's gradient comes out of the batch-norm gradient), let the batch-norm kernel
update its own moving statistics, and sum a node's inputs with one add_n.
`network.deployable` turns a folded network into plain Keras layers for export.
"""

import keras
from keras import ops as K

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import space as space_lib

PACKAGE = "bonsai_tf"
# Saw-gate constant (BONSAINET.md section 1). Only the straight-through form is
# used in the graph, so M matters for documentation and the reference test only.
SAW_M = 1e5
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def saw_gate_value(w):
    """Forward value exactly step(w) in {0, 1}; gradient exactly 1 (straight-through).

    Built from ordinary ops (no custom gradient) so that graphs export cleanly.
    Works on a scalar or on a vector of gate weights alike.
    """
    step = K.cast(K.greater(w, 0.0), w.dtype)
    return step + (w - K.stop_gradient(w))


MIXINGS = ("saw", "softmax", "switch", "binary", "reinforce")
# ProxylessNAS's binary paths (only sampled operations run): "binary" draws a pair per
# step for BinaryConnect's gradient, "reinforce" one operation for REINFORCE's.
BINARY_MIXINGS = ("binary", "reinforce")


def gate_values(pruners, mixing="saw", temperature=None, parent=None):
    """The gains of an edge's operations, computed once on their stacked weights.

    "saw": g(w) of each pruner (BonsaiNet); "softmax": softmax(w / temperature) over
    the edge's operations (ASAP); "switch": w itself, a real-valued switch, times the
    edge's parent switch `parent` (BayesNAS). One vector computation instead of a few
    graph ops per operation.
    """
    tf = _tf()
    w = tf.stack([p.w.value for p in pruners])
    if mixing == "softmax":
        return tf.unstack(tf.nn.softmax(w / temperature))
    if mixing == "switch":
        return tf.unstack(w * parent.w.value if parent is not None else w)
    return tf.unstack(saw_gate_value(w))


def gumbel_keys(logits, u):
    """logits - log(-log u): with u uniform in (0, 1), the index of the largest key is a
    draw from softmax(logits) (the Gumbel-max trick), the k largest a draw of k without
    replacement in proportion to the probabilities (Gumbel top-k)."""
    tf = _tf()
    return logits - tf.math.log(-tf.math.log(u))


def gumbel_max(logits, u):
    """The index of the largest Gumbel key along the last axis (int32): a draw from
    softmax(logits). Vectorised, so many draws at once are one call (tests), one edge's
    draw another (Edge)."""
    tf = _tf()
    return tf.argmax(gumbel_keys(logits, u), axis=-1, output_type=tf.int32)


def _tf():
    import tensorflow as tf  # the fused kernels are TensorFlow's; this package runs on it
    return tf


@keras.saving.register_keras_serializable(PACKAGE)
class SawGate(keras.layers.Layer):
    """Differential pruner: multiplies its input by g(w) in {0, 1}.

    State that must survive a restart lives in non-trainable variables so that
    checkpoints carry it: `open_records` counts the per-epoch records at which the
    gate was open since the last deadhead, `records` counts all of them.
    """

    def __init__(self, init_weight=0.1, clamp=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(init_weight, bool) or not isinstance(init_weight, (int, float)):
            raise ValueError(f"init_weight must be a number, got {init_weight!r}")
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be positive or None, got {clamp!r}")
        self.init_weight = float(init_weight)
        self.clamp = None if clamp is None else float(clamp)

    def build(self, input_shape=None):
        # Pruners own no input-dependent shapes: edges and cells build theirs in
        # their own build, inside their name scope, and read `w` without calling.
        constraint = None
        if self.clamp is not None:
            c = self.clamp
            constraint = lambda w: K.clip(w, -c, c)  # noqa: E731 - SpiderNet's clamp
        # Gates stay float32 under a mixed precision policy (autocast off): a step of
        # g(w) at 0 and softmax logits want the full precision.
        self.w = self.add_weight(name="w", shape=(), trainable=True, constraint=constraint,
                                 initializer=keras.initializers.Constant(self.init_weight),
                                 autocast=False)
        self.open_records = self.add_weight(name="open_records", shape=(), trainable=False,
                                            initializer="zeros", autocast=False)
        self.records = self.add_weight(name="records", shape=(), trainable=False,
                                       initializer="zeros", autocast=False)

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


def subsample(x, stride):
    """Strided spatial subsampling with 'same' padding: ceil(h / stride) rows."""
    if stride == 1:
        return x
    # A 1x1 pooling window with stride s picks the same pixels as x[:, ::s, ::s]
    # but its gradient is 4x cheaper on CPU than the strided slice's (measured).
    return K.average_pool(x, 1, strides=stride, padding="same")


@keras.saving.register_keras_serializable(PACKAGE)
class Subsample(keras.layers.Layer):
    """Strided spatial subsampling (identity on a strided edge, input adaptation)."""

    def __init__(self, stride=2, **kwargs):
        super().__init__(**kwargs)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.stride = stride

    def call(self, inputs):
        return subsample(inputs, self.stride)

    def compute_output_shape(self, shape):
        s = self.stride
        f = lambda v: None if v is None else (v + s - 1) // s  # noqa: E731
        return (shape[0], f(shape[1]), f(shape[2]), shape[3])

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
        # Raw pixels in, the policy's compute dtype out (float32 unless mixed precision).
        x = K.cast(inputs, self.compute_dtype)
        return ((x - K.convert_to_tensor(self.mean, dtype=x.dtype))
                * K.convert_to_tensor([1.0 / s for s in self.std], dtype=x.dtype))

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std)}


class _BNVars:
    """The four variables of one batch norm, made by `layer.add_weight` under `prefix`."""

    def __init__(self, layer, channels, prefix):
        # Never autocast: under a mixed precision policy the fused kernel takes half (or
        # bfloat16) activations with float32 scale, offset and statistics.
        def add(name, init, trainable):
            return layer.add_weight(name=f"{prefix}{name}", shape=(channels,), initializer=init,
                                    trainable=trainable, autocast=False)
        self.gamma = add("gamma", "ones", True)
        self.beta = add("beta", "zeros", True)
        self.moving_mean = add("moving_mean", "zeros", False)
        self.moving_variance = add("moving_variance", "ones", False)

    def apply(self, x, training, gain=None, affine=True):
        """Batch norm of x; `gain` (a folded pruner g(w)) multiplies scale and offset.

        Training uses TensorFlow's fused kernel, which also returns the updated moving
        statistics (exponential_avg_factor), so an update costs two assignments.
        Inference is a multiply-add that every exporter folds.
        """
        tf = _tf()
        gamma, beta = self.gamma.value, self.beta.value
        if not affine:   # the variables stay (a final network trains them), unused
            gamma, beta = tf.ones_like(gamma), tf.zeros_like(beta)
        if gain is not None:
            gamma, beta = gamma * gain, beta * gain
        if training:
            y, mean, var = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=self.moving_mean.value, variance=self.moving_variance.value,
                epsilon=BN_EPSILON, is_training=True, exponential_avg_factor=1.0 - BN_MOMENTUM)
            self.moving_mean.assign(mean)
            self.moving_variance.assign(var)
            return y
        scale = gamma * tf.math.rsqrt(self.moving_variance.value + BN_EPSILON)
        offset = beta - self.moving_mean.value * scale
        return x * tf.cast(scale, x.dtype) + tf.cast(offset, x.dtype)


@keras.saving.register_keras_serializable(PACKAGE)
class BatchNorm(keras.layers.Layer):
    """Batch norm over the last axis with TensorFlow's fused kernel while training.

    Every candidate operation holds up to two batch norms and every node one, so
    they dominate a supernet step on CPU: keras.layers.BatchNormalization took
    4.4 ms per forward+backward at 64x14x14x32 here, the fused kernel 1.9 ms.
    """

    def __init__(self, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon!r}")
        self.momentum, self.epsilon = float(momentum), float(epsilon)

    def build(self, input_shape):
        self.bn = _BNVars(self, input_shape[-1], "")
        self.gamma, self.beta = self.bn.gamma, self.bn.beta
        self.moving_mean, self.moving_variance = self.bn.moving_mean, self.bn.moving_variance

    def call(self, inputs, training=None):
        return self.bn.apply(inputs, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


def batch_norm(name):
    return BatchNorm(name=name)


@keras.saving.register_keras_serializable(PACKAGE)
class Operation(keras.layers.Layer):
    """One candidate operation, run from its recipe in `bonsai_tf.space`.

    Its variables are named after the recipe's steps (`dw1_kernel`, `bn3_gamma`,
    ...). `run` is what an edge calls: it can start after a ReLU the edge computed
    once for all its operations, and fold a pruner's g(w) into the final batch norm.
    """

    def __init__(self, op, channels, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.recipe = space_lib.recipe(op)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.op, self.channels, self.stride = op, channels, stride
        # The first spatial step carries the operation's stride.
        spatial = [i for i, step in enumerate(self.recipe) if step[0] in space_lib.SPATIAL_STEPS]
        self.strided_step = spatial[0] if spatial and stride > 1 else None
        # Subsampled first (no spatial step to take the stride), an operation cannot use
        # the ReLU its edge computes at full size.
        self.starts_with_relu = self.recipe[0] == ("relu",) and not (stride > 1 and not spatial)
        self.ends_with_bn = self.recipe[-1] == ("bn",)

    def build(self, input_shape=None):
        self.kernels, self.bns = {}, {}
        # Each step at its own width: e x channels between ("expand", e) and ("project", e).
        widths = space_lib.step_channels(self.op, self.channels)
        for i, (step, (cin, cout)) in enumerate(zip(self.recipe, widths)):
            kind = step[0]
            if kind == "dw":
                self.kernels[i] = self.add_weight(name=f"dw{i}_kernel",
                                                  shape=(step[1], step[1], cin, 1),
                                                  initializer="glorot_uniform")
            elif kind in ("pw", "expand", "project"):
                self.kernels[i] = self.add_weight(name=f"{kind}{i}_kernel", shape=(1, 1, cin, cout),
                                                  initializer="glorot_uniform")
            elif kind == "conv":
                self.kernels[i] = self.add_weight(name=f"conv{i}_kernel",
                                                  shape=(step[1], step[1], cin, cout),
                                                  initializer="glorot_uniform")
            elif kind == "bn":
                self.bns[i] = _BNVars(self, cout, f"bn{i}_")

    def run(self, x, training=None, relu_x=None, gain=None, affine=True):
        """The operation on x; relu_x = relu(x) if the caller has it; gain folds a gate.

        affine=False: the final batch norm has no scale and offset of its own (gain
        alone scales it), as DARTS-style searches build their operations: a switch
        that multiplies a learnt scale could shrink while the scale grows, at no cost.

        Returns (output, whether `gain` was folded in): only an operation ending in
        batch norm can fold it; the caller multiplies the others.
        """
        tf = _tf()
        start = 0
        if relu_x is not None and self.starts_with_relu:
            x, start = relu_x, 1
        if self.stride > 1 and self.strided_step is None:
            # A recipe without a spatial step (conv_1x1) takes its stride up front.
            x = subsample(x, self.stride)
        last = len(self.recipe) - 1
        for i in range(start, len(self.recipe)):
            step = self.recipe[i]
            kind = step[0]
            s = self.stride if i == self.strided_step else 1
            if kind == "relu":
                x = tf.nn.relu(x)
            elif kind == "relu6":
                x = tf.nn.relu6(x)
            elif kind == "bn":
                x = self.bns[i].apply(x, training, gain if i == last else None,
                                      affine=affine or i != last)
            elif kind in ("pw", "expand", "project"):
                # Never strided (not spatial steps), so never the strided 1x1 kernel
                # that ReLUConvBN avoids.
                x = tf.nn.conv2d(x, self.kernels[i].value, 1, "VALID")
            elif kind == "conv":
                x = tf.nn.conv2d(x, self.kernels[i].value, s, "SAME")
            elif kind == "dw":
                d = step[2]
                # TF has no depthwise convolution with both stride and dilation > 1:
                # such a step runs at stride 1 and is subsampled after.
                x = tf.nn.depthwise_conv2d(x, self.kernels[i].value, [1, 1 if d > 1 else s,
                                                                     1 if d > 1 else s, 1],
                                           "SAME", dilations=[d, d])
                if d > 1:
                    x = subsample(x, s)
            elif kind == "maxpool":
                x = tf.nn.max_pool2d(x, step[1], s, "SAME")
            elif kind == "avgpool":
                x = tf.nn.avg_pool2d(x, step[1], s, "SAME")
            elif kind == "identity":
                x = subsample(x, s)
            elif kind == "zero":
                x = tf.zeros_like(subsample(x, s))
            else:
                raise ValueError(f"unknown step {step!r}")
        return x, gain is not None and self.ends_with_bn

    def call(self, inputs, training=None):
        return self.run(inputs, training)[0]

    def compute_output_shape(self, shape):
        s = self.stride
        f = lambda v: None if v is None else (v + s - 1) // s  # noqa: E731
        return (shape[0], f(shape[1]), f(shape[2]), self.channels)

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

    def mask(self, batch):
        """[batch, 1, 1, 1] of 0 or 1/keep."""
        keep = 1.0 - self.rate
        u = keras.random.uniform((batch, 1, 1, 1), seed=self.seed_generator)
        return K.floor(keep + u) * (1.0 / keep)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        return inputs * K.cast(self.mask(K.shape(inputs)[0]), inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(PACKAGE)
class ReLUConvBN(keras.layers.Layer):
    """ReLU, 1x1 convolution (optionally strided), batch norm: adapts a cell input.

    A stride is taken by subsampling before a stride-1 convolution, which computes
    the same thing: TensorFlow 2.21's oneDNN kernel for a strided 1x1 convolution
    corrupts the heap ("munmap_chunk(): invalid pointer") when it runs on one
    intra-op thread, as it does on machines of up to 4 cores here (machine.py);
    found by tests/test_property.py, reproduced with a bare tf.nn.conv2d.
    """

    def __init__(self, channels, stride=1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.channels, self.stride = channels, stride

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(1, 1, input_shape[-1], self.channels),
                                      initializer="glorot_uniform")
        self.bn = _BNVars(self, self.channels, "bn_")

    def call(self, inputs, training=None):
        tf = _tf()
        x = subsample(tf.nn.relu(inputs), self.stride)
        return self.bn.apply(tf.nn.conv2d(x, self.kernel.value, 1, "VALID"), training)

    def compute_output_shape(self, shape):
        s = self.stride
        f = lambda v: None if v is None else (v + s - 1) // s  # noqa: E731
        return (shape[0], f(shape[1]), f(shape[2]), self.channels)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "stride": self.stride}


@keras.saving.register_keras_serializable(PACKAGE)
class Stem(keras.layers.Layer):
    """3x3 convolution (optionally strided) from the image channels to `channels`, batch norm."""

    def __init__(self, channels, stride=1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.channels, self.stride = channels, stride

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(3, 3, input_shape[-1], self.channels),
                                      initializer="glorot_uniform")
        self.bn = _BNVars(self, self.channels, "bn_")

    def call(self, inputs, training=None):
        x = _tf().nn.conv2d(inputs, self.kernel.value, self.stride, "SAME")
        return self.bn.apply(x, training)

    def compute_output_shape(self, shape):
        s = self.stride
        f = lambda v: None if v is None else (v + s - 1) // s  # noqa: E731
        return (shape[0], f(shape[1]), f(shape[2]), self.channels)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "stride": self.stride}


@keras.saving.register_keras_serializable(PACKAGE)
class Head(keras.layers.Layer):
    """Global average pooling and a dense classifier (logits)."""

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.num_classes),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.num_classes,), initializer="zeros")

    def call(self, inputs):
        tf = _tf()
        return tf.matmul(tf.reduce_mean(inputs, axis=(1, 2)), self.kernel.value) + self.bias.value

    def compute_output_shape(self, shape):
        return (shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def edge_name(src, dst):
    return f"e_{src}_{dst}"


@keras.saving.register_keras_serializable(PACKAGE)
class Edge(keras.layers.Layer):
    """Sum over the surviving operations of one edge, each behind its own pruner."""

    def __init__(self, ops, channels, stride=1, init_weights=None, with_pruners=True,
                 drop_path=0.0, seed=None, reuse=None, mixing="saw", temperature=None, **kwargs):
        super().__init__(**kwargs)
        if not ops:
            raise ValueError("an edge needs at least one operation, got none")
        if mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
        if mixing == "softmax" and with_pruners and temperature is None:
            raise ValueError("softmax mixing needs a temperature variable, got None")
        # What the per-operation parameters mean: saw gates, softmax logits (an
        # architecture weight each, mixed by softmax(w / temperature)), or switches
        # (a real multiplier each, times one parent switch for the whole edge).
        self.mixing, self.temperature = mixing, temperature
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
        # BayesNAS's parent switch gates the whole edge; it is kept across rebuilds
        # (a pruned operation leaves the edge, the edge's relevance stays).
        self.parent = None
        self.switched = with_pruners and mixing == "switch"
        if self.switched:
            prev = getattr(reuse, "parent", None)
            self.parent = prev if prev is not None else SawGate(1.0, name="g_edge")
        # ProxylessNAS's binary paths: two operations drawn per step from softmax(alpha),
        # one of them active ("binary"), or one drawn ("reinforce"); the draws come from
        # this generator (its state is a model weight, reseeded per epoch by
        # Network.reseed). The last pair is kept for the alpha rescale after an
        # architecture step, the last drawn operation for REINFORCE's log-probability.
        self.binary = with_pruners and mixing in BINARY_MIXINGS and len(ops) > 1
        self.reinforce = self.binary and mixing == "reinforce"
        self.sampler = keras.random.SeedGenerator(seed, name="sampler") if self.binary else None
        self.last_pair = None
        self.last_path = None

    def by_op(self):
        return {op: (o, p) for op, o, p in zip(self.op_names, self.operations, self.pruners)}

    def take_weights(self, old):
        """Copies, operation by operation, the weights of `old` (an edge built earlier
        under another name, which may hold more operations) into this built edge;
        returns {new variable path: old path}."""
        moved = {}
        theirs = old.by_op()
        for op, o, p in zip(self.op_names, self.operations, self.pruners):
            if op not in theirs:
                continue
            moved.update(copy_weights(theirs[op][0], o))
            if p is not None and theirs[op][1] is not None:
                moved.update(copy_weights(theirs[op][1], p))
        if self.parent is not None and getattr(old, "parent", None) is not None:
            moved.update(copy_weights(old.parent, self.parent))
        return moved

    def build(self, input_shape):
        # Sub-layers built here are built inside this edge's name scope (Keras wraps
        # build), so variable paths, the checkpoint keys, read cell/edge/op/variable.
        for op in self.operations:
            if not op.built:
                op.build(input_shape)
        for p in self.pruners + [self.parent]:
            if p is not None and not p.built:
                p.build()
        if self.binary and not self.reinforce and self.last_pair is None:
            self.last_pair = self.add_weight(name="last_pair", shape=(2,), dtype="int32",
                                             trainable=False, initializer="zeros")
        if self.reinforce and self.last_path is None:
            self.last_path = self.add_weight(name="last_path", shape=(), dtype="int32",
                                             trainable=False, initializer="zeros")

    def alphas(self):
        return _tf().stack([p.w.value for p in self.pruners])

    def sample_pair(self):
        """Two distinct operations drawn from softmax(alpha) (Gumbel top-2, which samples
        without replacement in proportion to the probabilities), and their renormalised
        probabilities."""
        tf = _tf()
        a = self.alphas()
        pair = tf.math.top_k(gumbel_keys(a, self._uniforms()), 2).indices
        return pair, tf.nn.softmax(tf.gather(a, pair))

    def sample_path(self):
        """One operation drawn from softmax(alpha) over all of the edge's operations."""
        return gumbel_max(self.alphas(), self._uniforms())

    def _uniforms(self):
        """One uniform draw per operation from the edge's generator, clear of 0 and 1."""
        return keras.random.uniform((len(self.pruners),), minval=1e-6, maxval=1.0 - 1e-6,
                                    seed=self.sampler)

    def _branch(self, index, x, relu_x, gain, training):
        """Runs only operation `index` (tf.switch_case: the others are not computed)."""
        tf = _tf()

        def make(op, drop):
            def branch():
                y, folded = op.run(x, training, relu_x, gain)
                if gain is not None and not folded:
                    y = y * tf.cast(gain, y.dtype)
                if drop is not None and training:
                    y = y * tf.cast(drop.mask(tf.shape(y)[0]), y.dtype)
                return y
            return branch
        return tf.switch_case(index, [make(op, d) for op, d in zip(self.operations, self.drops)])

    def _binary_terms(self, x, training):
        """ProxylessNAS's two-path binary gates (Cai et al. 2019, METHODS.md).

        Training: a pair S of operations is drawn, one of them active with probability
        p~ = softmax(alpha_S); g_j = [j active] + p~_j - stop_gradient(p~_j). Forward,
        the edge outputs the active operation alone; backward, dL/dg_j of both reaches
        alpha_S through dp~/dalpha: the BinaryConnect estimator over the pair. The
        inactive one's gain is 0, so its weights get no gradient. Inference: the
        operation of largest alpha.

        With "reinforce" mixing one operation a is drawn from p = softmax(alpha) over the
        whole edge and runs ungated: the output carries no gradient to the alphas, which
        learn from the reward through log p(a) instead (strategies/proxyless.py), and a
        is kept in `last_path` for that.
        """
        tf = _tf()
        relu_x = tf.nn.relu(x) if sum(op.starts_with_relu for op in self.operations) > 1 else None
        if not training:
            return [self._branch(tf.argmax(self.alphas(), output_type=tf.int32), x, relu_x,
                                 None, training)]
        if self.reinforce:
            index = self.sample_path()
            self.last_path.assign(index)
            return [self._branch(index, x, relu_x, None, training)]
        pair, p = self.sample_pair()
        active = tf.cast(keras.random.uniform((), seed=self.sampler) >= p[0], tf.int32)
        gains = tf.one_hot(active, 2) + p - tf.stop_gradient(p)
        self.last_pair.assign(pair)
        return [self._branch(pair[k], x, relu_x, gains[k], training) for k in range(2)]

    def terms(self, x, training=None):
        """The gated (and drop-path-masked) output of every operation, to be summed."""
        if self.binary:
            return self._binary_terms(x, training)
        tf = _tf()
        relu_x = tf.nn.relu(x) if sum(op.starts_with_relu for op in self.operations) > 1 else None
        # A binary-path edge left with one operation runs it ungated.
        gains = (gate_values(self.pruners, self.mixing, self.temperature, self.parent)
                 if self.with_pruners and self.mixing not in BINARY_MIXINGS
                 else [None] * len(self.operations))
        out = []
        for op, gain, drop in zip(self.operations, gains, self.drops):
            y, folded = op.run(x, training, relu_x, gain, affine=not self.switched)
            # Gains are float32 (gates never autocast); activations may be half.
            if gain is not None and not folded:
                y = y * tf.cast(gain, y.dtype)
            if drop is not None and training:
                y = y * tf.cast(drop.mask(tf.shape(y)[0]), y.dtype)
            out.append(y)
        return out

    def call(self, inputs, training=None):
        terms = self.terms(inputs, training)
        return terms[0] if len(terms) == 1 else _tf().math.add_n(terms)

    def compute_output_shape(self, shape):
        return self.operations[0].compute_output_shape(shape)

    def get_config(self):
        return {**super().get_config(), "ops": self.op_names, "channels": self.channels,
                "stride": self.stride, "init_weights": self.init_weights,
                "with_pruners": self.with_pruners, "drop_path": self.drop_path, "seed": self.seed,
                "mixing": self.mixing}


@keras.saving.register_keras_serializable(PACKAGE)
class BonsaiCell(keras.layers.Layer):
    """A Bonsai cell built from one `genotype.Cell`.

    Called on the list of all earlier outputs [stem, cell 0, ..., previous cell];
    `x` is the last of them, `y` the gated sum of the kept ones, each adapted to
    x's resolution and this cell's channels.
    """

    def __init__(self, cell, with_pruners=True, drop_path=0.0, seed=None, reuse=None, mixing="saw",
                 temperature=None, node_map=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(cell, dict):
            cell = _cell_from_config(cell)
        if not isinstance(cell, genotype_lib.Cell):
            raise ValueError(f"cell must be a genotype.Cell or its dict, got {type(cell).__name__}")
        self.cell = cell
        self.with_pruners, self.drop_path, self.seed = with_pruners, float(drop_path), seed
        self.mixing = mixing
        stride = 2 if cell.reduction else 1
        old_edges = reuse.edges if reuse is not None else {}
        # node_map {old node: new node} (SpiderNet's edge split renumbers nodes): a layer
        # whose node moved is rebuilt under its new name and given the old one's weights
        # in build. Reusing the old object would keep its variable paths, which name
        # checkpoint entries and optimizer slots, and a fresh build (a resumed run) would
        # not find them, or find another layer's under the same name.
        back = {new: old for old, new in (node_map or {}).items()}

        def old_node(n):
            return n if n in ("x", "y") or node_map is None else back.get(n)

        # new layer name -> old layer whose weights it takes. Set past Keras' tracking:
        # a tracked old layer would stay among this cell's weights once copied.
        object.__setattr__(self, "_copy_from", {})
        self.moved = {}         # new variable path -> old one, filled in build
        self.edges = {}
        for i, e in enumerate(cell.edges):
            key = edge_name(e.src, e.dst)
            s = stride if e.src in ("x", "y") else 1
            src, dst = old_node(e.src), old_node(e.dst)
            prev = None
            if src is not None and dst is not None:
                prev = old_edges.get(edge_name(src, dst))
                if prev is not None and (src, dst) != (e.src, e.dst):
                    self._copy_from[key], prev = prev, None
            self.edges[key] = Edge(
                [n for n, _ in e.ops], cell.channels, s, [w for _, w in e.ops],
                with_pruners=with_pruners, drop_path=drop_path,
                seed=None if seed is None else seed + 100 * i, reuse=prev, name=key,
                mixing=mixing, temperature=temperature)
        used_nodes = sorted({e.dst for e in cell.edges})
        old_bn = reuse.node_bn if reuse is not None else {}
        self.node_bn = {}
        for n in used_nodes:
            o = old_node(n)
            prev = old_bn.get(str(o)) if o is not None else None
            if prev is not None and o != n:
                self._copy_from[f"node{n}"], prev = prev, None
            self.node_bn[str(n)] = prev or batch_norm(f"node{n}")
        self.has_x = any(e.src == "x" for e in cell.edges)
        self.input_ids = [j for j, _ in cell.inputs] if any(e.src == "y" for e in cell.edges) else []
        self.x_adapt = reuse.x_adapt if reuse is not None else None
        self.y_adapt = dict(reuse.y_adapt) if reuse is not None else {}
        # Cell inputs are gated by saw-gate pruners only (BonsaiNet); with softmax mixing
        # (ASAP) every earlier output is summed into y, as the cell was built.
        self.gated_inputs = with_pruners and mixing == "saw"
        self.switched = with_pruners and mixing == "switch"
        self.y_gates = dict(reuse.y_gates) if reuse is not None and self.gated_inputs else {}
        self._init_gate = dict(cell.inputs)

    def build(self, input_shapes):
        x_shape = input_shapes[-1]
        if self.has_x and self.x_adapt is None and x_shape[-1] != self.cell.channels:
            self.x_adapt = ReLUConvBN(self.cell.channels, name="x_adapt")
        keep = {str(j) for j in self.input_ids}
        self.y_adapt = {k: v for k, v in self.y_adapt.items() if k in keep}
        self.y_gates = {k: v for k, v in self.y_gates.items() if k in keep}
        if self.x_adapt is not None and not self.x_adapt.built:
            self.x_adapt.build(x_shape)
        for j in self.input_ids:
            shape = input_shapes[j]
            ratio = genotype_lib.subsample_stride(shape[1:3], x_shape[1:3])
            if str(j) not in self.y_adapt:
                if shape[-1] != self.cell.channels:
                    self.y_adapt[str(j)] = ReLUConvBN(self.cell.channels, stride=ratio,
                                                      name=f"y_adapt{j}")
                    self.y_adapt[str(j)].build(shape)
                elif ratio > 1:
                    self.y_adapt[str(j)] = Subsample(ratio, name=f"y_sub{j}")
            if self.gated_inputs and str(j) not in self.y_gates:
                self.y_gates[str(j)] = SawGate(self._init_gate[j], name=f"in_g{j}")
        # Everything builds here, in this cell's name scope, from the shapes the
        # genotype implies: no variable is made later, inside a traced step.
        h, w = x_shape[1:3]
        c = self.cell.channels
        stride = 2 if self.cell.reduction else 1
        out_shape = (None, -(-h // stride), -(-w // stride), c)
        for e in self.cell.edges:
            edge = self.edges[edge_name(e.src, e.dst)]
            if not edge.built:
                edge.build((None, h, w, c) if e.src in ("x", "y") else out_shape)
        for bn in self.node_bn.values():
            if not bn.built:
                bn.build(out_shape)
        for key, old in self._copy_from.items():
            if key in self.edges:
                self.moved.update(self.edges[key].take_weights(old))
            else:
                self.moved.update(copy_weights(old, self.node_bn[key[4:]]))
        self._copy_from.clear()
        for gate in self.y_gates.values():
            if not gate.built:
                gate.build()

    def call(self, inputs, training=None):
        tf = _tf()
        values = {}
        if self.has_x:
            x = inputs[-1]
            values["x"] = self.x_adapt(x, training=training) if self.x_adapt is not None else x
        if self.input_ids:
            gates = (dict(zip(self.y_gates, gate_values(list(self.y_gates.values()))))
                     if self.y_gates else {})
            ys = []
            for j in self.input_ids:
                t = inputs[j]
                if str(j) in self.y_adapt:
                    t = self.y_adapt[str(j)](t, training=training)
                if str(j) in gates:
                    t = t * tf.cast(gates[str(j)], t.dtype)
                ys.append(t)
            values["y"] = ys[0] if len(ys) == 1 else tf.math.add_n(ys)
        out = None
        for dst in range(self.cell.nodes):
            # Every operation of every edge into this node, summed in one add_n.
            terms = []
            for e in self.cell.edges:
                if e.dst == dst and e.src in values:
                    terms += self.edges[edge_name(e.src, e.dst)].terms(values[e.src], training)
            if not terms:
                continue
            total = terms[0] if len(terms) == 1 else tf.math.add_n(terms)
            if self.switched:
                # With switches a node is the mean of its terms, not their batch norm:
                # a batch norm would make the switches' scale free (it normalises it
                # away) and the group lasso would shrink them all at no cost to the
                # loss. The mean (not the sum: a cell sums a dozen terms per node, and
                # cells compound) keeps the scale of unit-variance terms.
                values[dst] = out = total / float(len(terms))
            else:
                values[dst] = out = self.node_bn[str(dst)](total, training=training)
        return out

    def compute_output_shape(self, input_shapes):
        h, w = input_shapes[-1][1:3]
        if self.cell.reduction:
            h, w = (None if h is None else -(-h // 2)), (None if w is None else -(-w // 2))
        return (input_shapes[-1][0], h, w, self.cell.channels)

    def gates(self):
        """(kind, key, pruner) for every pruner of this cell: kind 'edge', 'op' or 'input'."""
        out = []
        for key, edge in self.edges.items():
            if edge.parent is not None:
                out.append(("edge", key, edge.parent))
            for op, p in zip(edge.op_names, edge.pruners):
                if p is not None:
                    out.append(("op", (key, op), p))
        for j in self.input_ids:
            if str(j) in self.y_gates:
                out.append(("input", j, self.y_gates[str(j)]))
        return out

    def get_config(self):
        return {**super().get_config(), "cell": _cell_to_config(self.cell),
                "with_pruners": self.with_pruners, "drop_path": self.drop_path, "seed": self.seed,
                "mixing": self.mixing}


def copy_weights(src, dst):
    """Assigns every weight of layer `src` to the same weight of `dst`, a layer built
    the same way under another name; returns {dst variable path: src variable path}."""
    a, b = src.weights, dst.weights
    if [(v.name, tuple(v.shape)) for v in a] != [(v.name, tuple(v.shape)) for v in b]:
        raise ValueError(f"cannot copy the weights of {src.name!r} into {dst.name!r}: expected "
                         f"the same variables, got {[v.name for v in a]} and {[v.name for v in b]}")
    moved = {}
    for old, new in zip(a, b):
        new.assign(old.value)
        moved[new.path] = old.path
    return moved


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
