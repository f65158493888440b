"""SGD with momentum and L2 weight decay over groups of variables with their own rates.

BonsaiNet gives the variables of every grown pattern their own cosine schedule,
so each group has its own learning-rate variable. Slots are keyed by variable
path: when the network is rebuilt, `build` keeps the momentum of every surviving
variable, adds slots for new ones and drops those of removed variables, so the
optimizer always knows exactly the current variable set.
"""

import math

import numpy as np
import tensorflow as tf


def cosine_lr(epoch, start, end, lr_max, lr_min=0.0):
    """Cosine annealing from lr_max at `start` to lr_min at `end` (epochs, 0-based)."""
    if end <= start:
        return lr_min
    t = min(max((epoch - start) / (end - start), 0.0), 1.0)
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * t))


def _resource(v):
    """The tf.Variable under a Keras variable (or the tf.Variable itself)."""
    value = getattr(v, "value", v)
    return value if isinstance(value, tf.Variable) else v


class _Once:
    """The constants and learning-rate reads of one traced update, made once and shared
    by every variable's update op. Made per variable, they were two or three graph ops
    for each of a supernet's hundreds of variables: about a seventh of the training
    step's graph, traced again at every structural change (measured, issue 14)."""

    def __init__(self):
        self._made = {}

    def constant(self, value, dtype):
        key = ("constant", float(value), dtype)
        if key not in self._made:
            self._made[key] = tf.constant(value, dtype)
        return self._made[key]

    def read(self, variable, dtype):
        key = ("read", id(variable), dtype)
        if key not in self._made:
            self._made[key] = tf.cast(variable, dtype) if variable.dtype != dtype \
                else tf.convert_to_tensor(variable)
        return self._made[key]


class DynamicLossScale:
    """Dynamic loss scaling for float16 activations (mixed_float16), as Keras'
    LossScaleOptimizer does it: the loss is multiplied by `scale` before the gradient
    so that small gradients survive float16, the gradients are divided by it after. A
    step whose gradients are not all finite is skipped and the scale halved; after
    `growth_interval` finite steps in a row it doubles. Its two variables are
    optimizer state (checkpointed with the slots)."""

    def __init__(self, initial=2.0 ** 15, growth_interval=2000):
        if not initial >= 1 or growth_interval < 1:
            raise ValueError(f"loss scale {initial!r} and growth interval {growth_interval!r}; "
                             f"expected a scale >= 1 and an interval >= 1")
        self.growth_interval = int(growth_interval)
        self.scale = tf.Variable(float(initial), trainable=False, name="loss_scale")
        self.good_steps = tf.Variable(0.0, trainable=False, name="loss_scale_good_steps")

    def scaled(self, loss):
        return loss * self.scale

    def unscale(self, grads):
        inv = 1.0 / self.scale
        return [None if g is None else g * tf.cast(inv, g.dtype) for g in grads]

    @staticmethod
    def all_finite(grads):
        checks = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
        return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)

    def update(self, finite):
        """After a step: halve on an overflow, double after growth_interval good steps."""
        good = tf.where(finite, self.good_steps + 1.0, 0.0)
        grow = good >= float(self.growth_interval)
        scale = tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale),
                         tf.maximum(self.scale * 0.5, 1.0))
        self.scale.assign(scale)
        self.good_steps.assign(tf.where(grow, 0.0, good))

    def state(self):
        return {"scale": np.asarray(self.scale.numpy()),
                "good_steps": np.asarray(self.good_steps.numpy())}

    def load_state(self, arrays):
        if "scale" in arrays:
            self.scale.assign(arrays["scale"])
        if "good_steps" in arrays:
            self.good_steps.assign(arrays["good_steps"])


def _slot_keys(moved):
    """A function of a variable's path giving the old path whose slot it takes over: its
    own, the one it moved from, or None (a new variable at a path another variable moved
    away from). `moved` is read once per build, not once per variable."""
    moved = dict(moved or {})
    vacated = set(moved.values())
    return lambda path: moved[path] if path in moved else (None if path in vacated else path)


class MomentumSGD:
    def __init__(self, momentum=0.9, weight_decay=3e-4, loss_scale=None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.momentum, self.weight_decay = momentum, weight_decay
        self.loss_scale = loss_scale     # DynamicLossScale under mixed_float16, else None
        self.slots = {}      # variable path -> tf.Variable
        self.lrs = {}        # group name -> tf.Variable
        self.plan = []       # [(variable, slot, lr variable, decay)]

    def build(self, groups, moved=None):
        """groups: [(group name, [variables], apply weight decay)]; moved: {new variable
        path: old path} of variables whose values moved to a new path (renumbered nodes):
        their momentum moves with them."""
        slots, plan = {}, []
        slot_key = _slot_keys(moved)
        for name, variables, decay in groups:
            if name not in self.lrs:
                self.lrs[name] = tf.Variable(0.0, trainable=False, name=f"lr_{name}")
            for v in variables:
                slot = self.slots.get(slot_key(v.path))
                if slot is None or tuple(slot.shape) != tuple(v.shape):
                    slot = tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False)
                slots[v.path] = slot
                plan.append((v, slot, self.lrs[name], decay))
        self.slots, self.plan = slots, plan
        return [p[0] for p in plan]

    def set_lr(self, name, value):
        self.lrs[name].assign(value)

    def apply(self, grads):
        """Applies gradients given in the order of the variables `build` returned.

        slot <- momentum * slot + g + weight_decay * v;  v <- v - lr * slot, with one
        fused kernel per variable: a supernet has thousands of variables, and
        separate multiply/assign ops for each cost more step and trace time than the
        arithmetic (measured).
        """
        once = _Once()
        for g, (v, slot, lr, decay) in zip(grads, self.plan):
            if g is None:
                continue
            var = _resource(v)
            if decay and self.weight_decay:
                g = g + once.constant(self.weight_decay, var.dtype) * var
            tf.raw_ops.ResourceApplyMomentum(var=var.handle, accum=slot.handle,
                                             lr=once.read(lr, var.dtype), grad=g,
                                             momentum=once.constant(self.momentum, var.dtype))

    # ---- checkpointing -----------------------------------------------------------
    def state(self):
        out = {f"slot/{k}": v.numpy() for k, v in self.slots.items()}
        out.update({f"lr/{k}": np.asarray(v.numpy()) for k, v in self.lrs.items()})
        if self.loss_scale is not None:
            out.update({f"loss_scale/{k}": v for k, v in self.loss_scale.state().items()})
        return out

    def load_state(self, arrays):
        for key, value in arrays.items():
            if key.startswith("slot/") and key[5:] in self.slots:
                self.slots[key[5:]].assign(value)
            elif key.startswith("lr/") and key[3:] in self.lrs:
                self.lrs[key[3:]].assign(value)
        if self.loss_scale is not None:
            self.loss_scale.load_state({k[11:]: v for k, v in arrays.items()
                                        if k.startswith("loss_scale/")})


class Adam:
    """Adam for architecture variables (bilevel strategies), slots keyed by variable path.

    Like MomentumSGD, `build` keeps the moments of surviving variables when the
    network is rebuilt without some of them. L2 weight decay is added to the
    gradient, as DARTS and ASAP do for their architecture weights.
    """

    def __init__(self, lr=3e-4, beta1=0.5, beta2=0.999, epsilon=1e-8, weight_decay=1e-3):
        self.lr, self.beta1, self.beta2, self.epsilon = lr, beta1, beta2, epsilon
        self.weight_decay = weight_decay
        self.slots = {}     # path -> (m, v)
        self.plan = []
        self.iterations = tf.Variable(0.0, trainable=False, name="adam_iterations")

    def build(self, variables, moved=None):
        slots, plan = {}, []
        slot_key = _slot_keys(moved)
        for v in variables:
            pair = self.slots.get(slot_key(v.path))
            if pair is None or tuple(pair[0].shape) != tuple(v.shape):
                pair = (tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False),
                        tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False))
            slots[v.path] = pair
            plan.append((v, pair))
        self.slots, self.plan = slots, plan
        return [p[0] for p in plan]

    def apply(self, grads):
        self.iterations.assign_add(1.0)
        t = self.iterations
        b1p, b2p = tf.pow(self.beta1, t), tf.pow(self.beta2, t)
        once = _Once()
        for g, (v, (m, s)) in zip(grads, self.plan):
            if g is None:
                continue
            var = _resource(v)
            c = lambda value: once.constant(value, var.dtype)   # noqa: E731
            if self.weight_decay:
                g = g + c(self.weight_decay) * var
            tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=s.handle, beta1_power=b1p,
                                         beta2_power=b2p, lr=c(self.lr), beta1=c(self.beta1),
                                         beta2=c(self.beta2), epsilon=c(self.epsilon), grad=g)

    def state(self):
        out = {"iterations": np.asarray(self.iterations.numpy())}
        for k, (m, s) in self.slots.items():
            out[f"m/{k}"], out[f"v/{k}"] = m.numpy(), s.numpy()
        return out

    def load_state(self, arrays):
        for key, value in arrays.items():
            if key == "iterations":
                self.iterations.assign(value)
            elif key[:2] in ("m/", "v/") and key[2:] in self.slots:
                self.slots[key[2:]][0 if key[0] == "m" else 1].assign(value)
