"""Search strategies: one interface (base.Strategy), one module per method.

The engine finds a strategy by its name with `get`; a new method is a module
here and one `register` call, and knows nothing of the loop that runs it.
"""

from bonsai_tf.strategies import base
from bonsai_tf.strategies.base import Change, RunInfo, Strategy  # noqa: F401

_REGISTRY = {}


def register(cls):
    """Registers a Strategy subclass under its `name`; a name can be registered once."""
    if not (isinstance(cls, type) and issubclass(cls, base.Strategy)):
        raise ValueError(f"expected a Strategy subclass, got {cls!r}")
    if cls.name in _REGISTRY:
        raise ValueError(f"strategy {cls.name!r} is already registered; expected a new name")
    _REGISTRY[cls.name] = cls
    return cls


def get(name):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of {names()}") from None


def names():
    return sorted(_REGISTRY)


def _register_builtins():
    from bonsai_tf.strategies import asap, bayes, bonsai, fixed, proxyless, spider
    for cls in (bonsai.BonsaiNet, asap.ASAP, bayes.BayesNAS, proxyless.ProxylessNAS,
                spider.SpiderNet, fixed.Fixed, fixed.Random):
        register(cls)


_register_builtins()
