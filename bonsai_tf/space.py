"""Search spaces as data: operation recipes and the operation sets that use them.

Nothing here imports TensorFlow, so genotypes can be validated, hashed and
costed anywhere. An operation is a *recipe*: a tuple of primitive steps. The
Keras layer that runs it (`bonsai_tf.layers.Operation`) and the analytical
memory/FLOP model (`bonsai_tf.memory`) both read the same recipe, so they
cannot drift apart.

Primitive steps (the first spatial step carries the operation's stride):
  ("relu",)            ReLU
  ("bn",)              batch norm
  ("pw",)              1x1 convolution, channels -> channels, no bias
  ("dw", k, d)         k x k depthwise convolution, dilation d, no bias
  ("conv", k)          k x k full convolution, no bias
  ("maxpool", k)       k x k max pooling, 'same' padding
  ("avgpool", k)       k x k average pooling, 'same' padding
  ("identity",)        identity; subsamples when strided
  ("zero",)            zeros (the DARTS 'none' operation)
"""

import types

SPATIAL_STEPS = frozenset({"dw", "conv", "maxpool", "avgpool", "identity", "zero"})
STEP_ARITY = {"relu": 0, "bn": 0, "pw": 0, "dw": 2, "conv": 1, "maxpool": 1,
              "avgpool": 1, "identity": 0, "zero": 0}

_RECIPES = {}


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
    _RECIPES[name] = recipe
    return recipe


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

# Operation sets. BonsaiNet's seven candidates; DARTS's eight (with 'none').
# 'small' is a cheap set for CPU searches: what is left out costs the most
# time per step on CPU for the least accuracy in our measurements (README).
SPACES = types.MappingProxyType({
    "bonsai7": ("identity", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3",
                "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"),
    "darts8": ("zero", "max_pool_3x3", "avg_pool_3x3", "identity", "sep_conv_3x3",
               "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"),
    "small": ("identity", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3", "dil_conv_3x3",
              "conv_3x3"),
})


def space_ops(space):
    try:
        return SPACES[space]
    except KeyError:
        raise ValueError(f"unknown search space {space!r}; expected one of {sorted(SPACES)}") from None
