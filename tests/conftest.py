import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Two logical CPU devices for the whole session, made before TensorFlow's runtime starts
# (it fixes its devices then): the tests of --distribute=mirrored need them, and every
# other test runs on the first, as it would on one device.
from bonsai_tf import distribute as _distribute  # noqa: E402

_distribute.split_cpu(2)


@pytest.fixture
def tiny_splits():
    """Generated 12x12 grey images, 3 classes, with a learnable signal (class = bright corner)."""
    from bonsai_tf import data as data_lib
    rng = np.random.RandomState(0)

    def make(n):
        y = np.arange(n) % 3
        x = rng.randint(0, 60, (n, 12, 12, 1)).astype(np.uint8)
        for i, label in enumerate(y):
            r, c = divmod(int(label), 2)
            x[i, r * 6:(r + 1) * 6, c * 6:(c + 1) * 6, 0] += 150
        return x, y.astype(np.int64)
    info = data_lib.DatasetInfo(name="tiny", image_shape=(12, 12, 1), num_classes=3,
                                class_names=("a", "b", "c"), mean=(80.0,), std=(70.0,),
                                augment="none")
    return data_lib.Splits(train=make(192), val=make(48), test=make(48), info=info)


@pytest.fixture(autouse=True, scope="module")
def _isolated_script_flags():
    """Undo what loading an entry script in-process did to absl's global FLAGS.

    Entry scripts (train/runner.py, bench/compare.py, export/export.py) define their flags on
    import. Two of them define `--seed`, so a test module that loads one would make the next
    module's load fail with DuplicateFlagError, depending only on test order. After each test
    module, drop the flags defined since it started and forget the script modules, so the next
    load defines them afresh.
    """
    from absl import flags
    before_flags = set(flags.FLAGS)
    before_modules = set(sys.modules)
    yield
    for name in set(flags.FLAGS) - before_flags:
        delattr(flags.FLAGS, name)
    # A script's main() parses argv only while FLAGS is unparsed (under app.run it is parsed).
    flags.FLAGS.unparse_flags()
    script_dirs = tuple(os.path.join(ROOT, d) + os.sep for d in ("train", "bench", "export"))
    for name in set(sys.modules) - before_modules:
        path = getattr(sys.modules[name], "__file__", None) or ""
        if path.startswith(script_dirs) or name == "compare_script":
            del sys.modules[name]
