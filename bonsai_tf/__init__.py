"""bonsai-tf: one-shot neural architecture search by differentiable pruning and growth."""

__version__ = "0.1.0"
