"""bonsai-tf: one-shot neural architecture search by differentiable pruning and growth."""

from bonsai_tf import machine as _machine

__version__ = "0.1.0"

# TensorFlow reads this once, at its import: oneDNN kernels are 2.3x faster for a
# supernet step on AVX2-only CPUs, where TensorFlow leaves them off by default
# (machine.py). A user's own TF_ENABLE_ONEDNN_OPTS, or TensorFlow imported first,
# wins.
_machine.use_onednn_by_default()


def search(*args, **kwargs):
    """Searches an architecture for images in memory: see bonsai_tf.api.search."""
    from bonsai_tf import api  # TensorFlow loads only when a search is asked for
    return api.search(*args, **kwargs)
