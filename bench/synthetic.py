"""What the step benchmarks time on: random images and a fully grown supernet.

Shared by bench_step.py and bench_change.py (no flags here: both define their own).
"""

import numpy as np

from bonsai_tf import data as data_lib
from bonsai_tf import genotype as genotype_lib


def images(shape, n, num_classes=10):
    """(uint8 images [n, H, W, C], int labels [n], DatasetInfo) of fixed random pixels."""
    h, w, c = shape
    info = data_lib.DatasetInfo(name="bench", image_shape=tuple(shape), num_classes=num_classes,
                                class_names=tuple(str(i) for i in range(num_classes)),
                                mean=(128.0,) * c, std=(64.0,) * c, augment="none")
    x = np.random.RandomState(0).randint(0, 255, (n, h, w, c)).astype(np.uint8)
    return x, np.arange(n) % num_classes, info


def supernet(space, shape, scale, nodes, pattern_spec, patterns, stem_stride=1,
             num_classes=10):
    """The full, unpruned supernet of `patterns` patterns (every operation on every edge)."""
    g = genotype_lib.initial(space, tuple(shape), num_classes, scale, nodes, pattern_spec, 1,
                             stem_stride=stem_stride)
    while genotype_lib.num_patterns(g) < patterns:
        g = genotype_lib.grow(g)
    return g
