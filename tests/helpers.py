"""Data generators shared by the end-to-end tests."""

import os

import numpy as np


def load_script(name, path):
    """The script at `path` imported as module `name` (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_folder(path, classes=3, per_class=40, size=12, seed=0, rgb=False):
    """class k = a bright quadrant k on noise; rgb: R = G = that, B = 0 (a constant channel)."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    half = size // 2
    for label in range(classes):
        d = os.path.join(path, f"c{label}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            x = rng.randint(0, 60, (size, size)).astype(np.uint8)
            r, c = divmod(label, 2)
            x[r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
            if rgb:
                x = np.stack([x, x, np.zeros_like(x)], -1)
            Image.fromarray(x).save(os.path.join(d, f"{i:03d}.png"))
    return str(path)
