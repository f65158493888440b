"""Search spaces as data: operation recipes and the operation sets that use them.

Nothing here imports TensorFlow, so genotypes can be validated, hashed and
costed anywhere. An operation is a *recipe*: a tuple of primitive steps. The
Keras layer that runs it (`bonsai_tf.layers.Operation`) and the analytical
memory/FLOP model (`bonsai_tf.memory`) both read the same recipe, so they
cannot drift apart.

Primitive steps (the first spatial step carries the operation's stride):
  ("relu",)            ReLU
  ("relu6",)           ReLU6, min(max(x, 0), 6) (MobileNetV2 / ProxylessNAS)
  ("bn",)              batch norm
  ("pw",)              1x1 convolution, channels -> channels, no bias
  ("expand", e)        1x1 convolution, channels -> e x channels, no bias
  ("project", e)       1x1 convolution, e x channels -> channels, no bias
  ("dw", k, d)         k x k depthwise convolution, dilation d, no bias
  ("conv", k)          k x k full convolution, no bias
  ("maxpool", k)       k x k max pooling, 'same' padding
  ("avgpool", k)       k x k average pooling, 'same' padding
  ("identity",)        identity; subsamples when strided
  ("zero",)            zeros (the DARTS 'none' operation)

Every step but "expand" and "project" keeps the width it is given: between an
("expand", e) and its ("project", e), "dw", "bn", "pw", "conv" and the rest work
at e x channels. `step_channels` gives each step's input and output width; a
recipe must end at the width it started with (an operation maps C to C).
"""

import types

SPATIAL_STEPS = frozenset({"dw", "conv", "maxpool", "avgpool", "identity", "zero"})
STEP_ARITY = {"relu": 0, "relu6": 0, "bn": 0, "pw": 0, "expand": 1, "project": 1, "dw": 2,
              "conv": 1, "maxpool": 1, "avgpool": 1, "identity": 0, "zero": 0}
# Steps that change the width: ("expand", e) multiplies it by e, ("project", e) divides it.
WIDTH_STEPS = frozenset({"expand", "project"})

_RECIPES = {}
_WIDTHS = {}


def register_op(name, recipe):
    """Registers an operation recipe under `name`; a name can be registered once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"operation name must be a non-empty string, got {name!r}")
    if name in _RECIPES:
        raise ValueError(f"operation {name!r} is already registered; expected a new name")
    recipe = tuple(tuple(step) for step in recipe)
    if not recipe:
        raise ValueError(f"operation {name!r}: expected at least one step, got an empty recipe")
    for step in recipe:
        if not step or step[0] not in STEP_ARITY:
            raise ValueError(f"operation {name!r}: unknown step {step!r}; expected one of "
                             f"{sorted(STEP_ARITY)}")
        if len(step) - 1 != STEP_ARITY[step[0]]:
            raise ValueError(f"operation {name!r}: step {step!r} takes {STEP_ARITY[step[0]]} "
                             f"argument(s), got {len(step) - 1}")
        if step[0] in WIDTH_STEPS and (isinstance(step[1], bool) or not isinstance(step[1], int)
                                       or step[1] < 1):
            raise ValueError(f"operation {name!r}: step {step!r} needs a positive int factor, "
                             f"got {step[1]!r}")
    _WIDTHS[name] = _widths(name, recipe)
    _RECIPES[name] = recipe
    return recipe


def _widths(name, steps):
    """[(input, output) width of every step] as multiples of the operation's channels."""
    m, out = 1, []
    for step in steps:
        if step[0] == "expand":
            out.append((m, m * step[1]))
        elif step[0] == "project":
            if m % step[1]:
                raise ValueError(f"operation {name!r}: step {step!r} projects {m}x the "
                                 f"channels by {step[1]}; expected a width divisible by it")
            out.append((m, m // step[1]))
        else:
            out.append((m, m))
        m = out[-1][1]
    if m != 1:
        raise ValueError(f"operation {name!r}: ends at {m}x its channels; expected a recipe "
                         f"that projects back to 1x (an operation maps C channels to C)")
    return tuple(out)


def step_channels(name, channels):
    """((input channels, output channels) of every step) of operation `name` at `channels`.

    What the Keras layer, the memory model and the deployable model size each step by.
    """
    recipe(name)  # a clear error for an unknown name
    return tuple((a * channels, b * channels) for a, b in _WIDTHS[name])


def recipe(name):
    try:
        return _RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown operation {name!r}; expected one of {sorted(_RECIPES)}") from None


def is_identity(name):
    """Identity-like operations are exempt from drop-path, as in DARTS and BonsaiNet."""
    return recipe(name) == (("identity",),)


def _sep(k):
    # DARTS/BonsaiNet separable convolution: the depthwise-pointwise pair twice.
    return (("relu",), ("dw", k, 1), ("pw",), ("bn",),
            ("relu",), ("dw", k, 1), ("pw",), ("bn",))


def _dil(k):
    return (("relu",), ("dw", k, 2), ("pw",), ("bn",))


register_op("identity", (("identity",),))
register_op("zero", (("zero",),))
register_op("max_pool_3x3", (("maxpool", 3),))
register_op("avg_pool_3x3", (("avgpool", 3),))
register_op("sep_conv_3x3", _sep(3))
register_op("sep_conv_5x5", _sep(5))
register_op("dil_conv_3x3", _dil(3))
register_op("dil_conv_5x5", _dil(5))
register_op("conv_3x3", (("relu",), ("conv", 3), ("bn",)))
register_op("conv_1x1", (("relu",), ("pw",), ("bn",)))


def _mbconv(k, e):
    # MobileNetV2 / ProxylessNAS inverted residual without its skip: the cell's edge
    # sums it with the `identity` candidate, which is that skip. The stride goes on the
    # depthwise step (the first spatial one), so the expansion runs at full resolution.
    return (("expand", e), ("bn",), ("relu6",), ("dw", k, 1), ("bn",), ("relu6",),
            ("project", e), ("bn",))


MBCONV_OPS = tuple(f"mbconv_k{k}_e{e}" for k in (3, 5, 7) for e in (3, 6))
for _k in (3, 5, 7):
    for _e in (3, 6):
        register_op(f"mbconv_k{_k}_e{_e}", _mbconv(_k, _e))
del _k, _e

# Operation sets. BonsaiNet's seven candidates; DARTS's eight (with 'none').
# 'small' is a cheap set for CPU searches: what is left out costs the most
# time per step on CPU for the least accuracy in our measurements (README).
# 'mbconv' is ProxylessNAS's mobile space: inverted residuals (kernel 3/5/7,
# expansion 3/6) and skip.
SPACES = types.MappingProxyType({
    "bonsai7": ("identity", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3",
                "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"),
    "darts8": ("zero", "max_pool_3x3", "avg_pool_3x3", "identity", "sep_conv_3x3",
               "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"),
    "small": ("identity", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3", "dil_conv_3x3",
              "conv_3x3"),
    "mbconv": ("identity",) + MBCONV_OPS,
})


def space_ops(space):
    try:
        return SPACES[space]
    except KeyError:
        raise ValueError(f"unknown search space {space!r}; expected one of {sorted(SPACES)}") from None
