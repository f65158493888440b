"""Train-free metrics that score an untrained network from one batch of inputs.

SpiderNet (Geada & McGough 2022) scores a candidate mutation without training it,
with the two metrics TE-NAS (Chen et al. 2021) uses:

  `ntk_condition_number`  how well conditioned the empirical neural tangent kernel
                          is at initialisation (lower: gradient descent trains the
                          network faster and more evenly);
  `linear_regions`        how many linear regions of the network's piecewise-linear
                          function the batch falls into (higher: more expressive).

Both run the model with training=False: batch norm then uses its moving statistics,
so one example's output does not depend on the others in the batch (with batch
statistics the Jacobian would not be per-example) and drop-path draws nothing.
Both take any Keras model, including the raw-TensorFlow layers of `bonsai_tf.layers`;
a model whose call returns a list of outputs is scored on the first (the main logits,
as `network.BonsaiModel` returns them).
"""

import contextlib
import math
import threading

import numpy as np

OUTPUTS = ("sum", "logits")
_RECORD_LOCK = threading.Lock()


def _tf():
    import tensorflow as tf
    return tf


def _check_model(model):
    if not callable(model) or not hasattr(model, "trainable_variables"):
        raise ValueError(f"model must be a Keras model (a callable with trainable_variables), "
                         f"got {type(model).__name__}")


def _expected_rank(model):
    """Rank of the model's declared input (batch axis included), or None if it declares none."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return len(inputs[0].shape)


def _check_images(model, images, min_batch):
    tf = _tf()
    try:
        x = tf.convert_to_tensor(images)
    except (TypeError, ValueError) as e:
        raise ValueError(f"images must be an array of shape [N, ...], got {type(images).__name__}: "
                         f"{e}") from None
    if x.shape.rank is None or x.shape.rank < 2:
        raise ValueError(f"images must have rank >= 2 ([N, ...] with a batch axis), got shape "
                         f"{tuple(x.shape)}")
    rank = _expected_rank(model)
    if rank is not None and x.shape.rank != rank:
        raise ValueError(f"images of shape {tuple(x.shape)} (rank {x.shape.rank}) do not fit the "
                         f"model's input: expected rank {rank}")
    if x.shape[0] < min_batch:
        raise ValueError(f"images hold {x.shape[0]} examples, expected at least {min_batch}")
    # float32 whatever came in: raw uint8 pixels (as bonsai models take them) or float64
    # numpy arrays, which a layer's float32 kernel would not multiply.
    return tf.cast(x, "float32") if x.dtype != tf.float32 else x


def _first_output(out):
    """The main output of a model that returns a list (or tuple) of outputs."""
    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError("the model returned an empty list of outputs, expected at least one")
        return out[0]
    if isinstance(out, dict):
        raise ValueError(f"the model returned a dict of outputs {sorted(out)}, expected a tensor "
                         f"or a list whose first item is the main output")
    return out


def _rows(model, x, outputs):
    """The model's main output on x (training=False) as the vector whose rows J differentiates."""
    tf = _tf()
    n = int(x.shape[0])
    y = _first_output(model(x, training=False))
    if not y.shape.rank or y.shape[0] != n:
        raise ValueError(f"the model's output has shape {tuple(y.shape)}, expected one row per "
                         f"example [{n}, ...]")
    y = tf.reshape(tf.cast(y, "float32"), (n, -1))
    return tf.reduce_sum(y, axis=1) if outputs == "sum" else tf.reshape(y, (-1,))


def jacobian(model, images, outputs="sum", use_pfor=False):
    """J, the Jacobian of the model's output w.r.t. all its trainable variables.

    Returns (J, method): J a float32 numpy array [rows, parameters], method "pfor" or
    "loop". With outputs="sum" a row is one example's logits summed to a scalar (N rows);
    with "logits" a row is one logit of one example (N * K rows, example-major).
    Variables the output does not depend on (an auxiliary head's) get zero columns.

    pfor (`GradientTape.jacobian(experimental_use_pfor=True)`) differentiates one
    forward pass of the batch and vectorises the N backward passes into one traced
    function; where it cannot convert an op (it raises), or with use_pfor=False, a
    loop runs each example on its own, one forward and one backward pass (K with
    "logits") per example, in a tf.function traced once per call (so the model must
    be traceable, as every Keras model is). The loop assumes what training=False gives every Keras
    and bonsai layer: an example's output does not depend on the rest of the batch.
    Both trace the model anew on every call (a new candidate needs it anyway); pfor's
    conversion costs more, and on bonsai networks it stays slower than the loop at
    batch 16 (bench/bench_trainfree.py measures both: 15.5 s against 3.8 s on a 2-core
    AMD EPYC, 35 operations, one cell), so the loop is the default.
    """
    tf = _tf()
    _check_model(model)
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError(f"model {getattr(model, 'name', type(model).__name__)!r} has no trainable "
                         f"variables, expected at least one (the NTK is over its parameters)")
    x = _check_images(model, images, min_batch=1)
    n = int(x.shape[0])
    zero = tf.UnconnectedGradients.ZERO

    if use_pfor:
        with tf.GradientTape() as tape:
            y = _rows(model, x, outputs)
        rows = int(y.shape[0])
        try:
            parts = tape.jacobian(y, variables, unconnected_gradients=zero,
                                  experimental_use_pfor=True)
        except (ValueError, TypeError, NotImplementedError, tf.errors.OpError):
            parts = None
        if parts is not None:
            j = np.concatenate([tf.reshape(p, (rows, -1)).numpy() for p in parts], axis=1)
            return j, "pfor"
    # One example's rows, traced once per call: run eagerly, the forward and backward
    # passes of a bonsai network cost 20 times more in Python dispatch than in kernels.
    @tf.function
    def example_rows(xi):
        with tf.GradientTape(persistent=True) as tape:
            y = _rows(model, xi, outputs)
        k = int(y.shape[0])  # static: 1 with "sum", K with "logits"
        grads = [tape.gradient(y, variables, output_gradients=tf.one_hot(r, k),
                               unconnected_gradients=zero) for r in range(k)]
        return tf.stack([tf.concat([tf.reshape(g, (-1,)) for g in row], 0) for row in grads])

    out = [example_rows(x[i:i + 1]).numpy() for i in range(n)]
    return np.concatenate(out), "loop"


def empirical_ntk(model, images, outputs="sum", use_pfor=False):
    """Theta = J J^T (float64 numpy, [rows, rows]); see `jacobian` for rows and outputs."""
    j, _ = jacobian(model, images, outputs, use_pfor)
    j = j.astype(np.float64)
    return j @ j.T


def condition_number(theta):
    """lambda_max / lambda_min of a symmetric PSD matrix; math.inf if it is singular.

    Singular means lambda_min <= 0, or lambda_min within float64 round-off of zero
    (<= size * eps * lambda_max, numpy.linalg.matrix_rank's tolerance: an exactly
    singular kernel, such as two identical inputs make, comes out of eigvalsh as
    +-1e-16 * lambda_max, and its ratio would be noise), or anything non-finite. A
    singular kernel has no finite condition number: inf ranks it as the worst, which
    is what a search that minimises the condition number wants.
    """
    theta = np.asarray(theta, np.float64)
    if theta.ndim != 2 or theta.shape[0] != theta.shape[1] or theta.shape[0] == 0:
        raise ValueError(f"theta must be a non-empty square matrix, got shape {theta.shape}")
    if not np.all(np.isfinite(theta)):
        return math.inf
    eig = np.linalg.eigvalsh(theta)
    tol = theta.shape[0] * np.finfo(np.float64).eps * abs(eig[-1])
    if not np.all(np.isfinite(eig)) or eig[0] <= tol:
        return math.inf
    value = float(eig[-1] / eig[0])
    return value if math.isfinite(value) else math.inf


def ntk_condition_number(model, images, outputs="sum", use_pfor=False):
    """Condition number lambda_max / lambda_min of the empirical NTK over `images`.

    Theta = J J^T, J the Jacobian of the model's output w.r.t. all trainable
    variables, the model run with training=False (see the module docstring).

    outputs="sum" (the default) sums each example's logits to one scalar, so J has
    one row per example and Theta is N x N: what TE-NAS's code computes (and NASWOT-
    style scores do), one backward pass per example, and a kernel whose size does not
    grow with the number of classes. outputs="logits" keeps every logit: J has N * K
    rows and Theta is the full (N K) x (N K) kernel, K times dearer.

    Returns a float >= 1, or math.inf when the smallest eigenvalue is <= 0 (or within
    round-off of 0, see `condition_number`) or the result is not finite: a singular
    kernel, e.g. more rows than parameters, or repeated inputs. Needs at least 2
    examples (one gives 1 trivially).
    """
    _check_model(model)
    _check_images(model, images, min_batch=2)
    return condition_number(empirical_ntk(model, images, outputs, use_pfor))


@contextlib.contextmanager
def record_relu_inputs():
    """Within the block, every `tf.nn.relu(x)` call appends x to the yielded list.

    Patches the `tf.nn.relu` attribute, which is where every default ReLU of a model
    ends up when run eagerly: `tf.nn.relu` called directly (bonsai_tf.layers'
    operations, edges and ReLUConvBN), and, in Keras 3 on TensorFlow,
    `keras.ops.relu`, `keras.activations.relu` (activation="relu"), and
    `keras.layers.ReLU()`, which all call the backend's relu, which calls
    `tf.nn.relu`. Patching those Keras entry points as well would count each ReLU
    twice. Restored on exit, also on an exception.

    Limits: the patch is process-wide (a ReLU run by another thread meanwhile is
    recorded too; concurrent recordings are serialised by a lock); a ReLU inside a
    tf.function already traced is not seen (so the model must run eagerly, and a
    traced call raises in `linear_regions`); not recorded are tf.nn.relu6,
    tf.nn.leaky_relu, Keras ReLUs with max_value=6, a threshold or a negative slope,
    tf.compat.v1.nn.relu, tf.maximum(x, 0), or a relu bound to a name before the
    patch (`from tensorflow.nn import relu`).
    """
    tf = _tf()
    recorded = []
    with _RECORD_LOCK:
        original = tf.nn.relu

        def relu(features, name=None):
            recorded.append(features)
            return original(features, name=name)

        tf.nn.relu = relu
        try:
            yield recorded
        finally:
            tf.nn.relu = original


def _patterns(tensors, n):
    """Each example's activation pattern (x > 0 over every unit), bit-packed: uint8 [n, bytes]."""
    tf = _tf()
    packed = []
    for t in tensors:
        if not tf.is_tensor(t):
            t = tf.convert_to_tensor(t)
        if not hasattr(t, "numpy"):
            raise ValueError(f"a ReLU input was a symbolic tensor {t!r}, expected eager values: "
                             f"the model must run eagerly (not inside a traced tf.function)")
        if t.shape.rank is None or t.shape.rank < 1 or t.shape[0] != n:
            raise ValueError(f"a pre-activation has shape {tuple(t.shape)}, expected a leading "
                             f"batch axis of {n} (a ReLU applied to something other than the "
                             f"examples' activations cannot define their pattern)")
        packed.append(np.packbits(t.numpy().reshape(n, -1) > 0, axis=1))
    return np.concatenate(packed, axis=1) if packed else np.zeros((n, 0), np.uint8)


def linear_regions(model, images, layer_outputs=None):
    """Number of distinct ReLU activation patterns over the batch (TE-NAS's region count).

    Each example's pattern is the binary vector (x > 0) over every unit of every ReLU
    pre-activation it passes through; examples with one pattern lie in one linear
    region of the network's piecewise-linear function, so the number of distinct
    patterns is the number of linear regions the batch falls into (at most N).

    layer_outputs says where the pre-activations come from:
      None: run `model(images, training=False)` eagerly inside `record_relu_inputs`
        and take every tf.nn.relu input (works on bonsai_tf's raw-op layers and on
        Keras' default ReLUs; see that context manager for its limits);
      a callable: `layer_outputs(images)` returns the pre-activation tensor or a list
        of them (any model, any activation whose sign splits it linearly);
      a list of Keras tensors of a functional `model`: the model's graph up to them.
    A model with no ReLU (or an empty list of pre-activations) has exactly one region.
    """
    _check_model(model)
    x = _check_images(model, images, min_batch=1)
    n = int(x.shape[0])
    if layer_outputs is None:
        with record_relu_inputs() as recorded:
            model(x, training=False)
        tensors = list(recorded)
    elif callable(layer_outputs):
        out = layer_outputs(x)
        tensors = list(out) if isinstance(out, (list, tuple)) else [out]
    elif isinstance(layer_outputs, (list, tuple)):
        import keras
        if not layer_outputs:
            return 1
        if not all(isinstance(t, keras.KerasTensor) for t in layer_outputs):
            raise ValueError(f"layer_outputs must be None, a callable or a list of Keras tensors, "
                             f"got a list of {sorted({type(t).__name__ for t in layer_outputs})}")
        try:
            probe = keras.Model(model.inputs, list(layer_outputs))
        except (AttributeError, ValueError, TypeError) as e:
            raise ValueError(f"layer_outputs must be Keras tensors of the functional model's "
                             f"graph, expected them reachable from model.inputs: {e}") from None
        out = probe(x, training=False)
        tensors = list(out) if isinstance(out, (list, tuple)) else [out]
    else:
        raise ValueError(f"layer_outputs must be None, a callable or a list of Keras tensors, "
                         f"got {type(layer_outputs).__name__}")
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return 1
    patterns = _patterns(tensors, n)
    return len({row.tobytes() for row in patterns})
