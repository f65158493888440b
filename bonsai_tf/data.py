"""Datasets for bonsai-tf: loading into memory, splitting, and tf.data pipelines.

Every dataset ends up as uint8 numpy arrays [N, H, W, C] with int64 labels, so the
search, the final training and int8 calibration all see exactly the same pixels
whatever the source (Fashion-MNIST IDX files, the CIFAR python archives, a prepared
TFDS directory, or a folder of image files).  Nothing here downloads anything: the
machines this runs on are often offline, so a missing dataset is an error that says
how to get it, not a silent fetch.

Normalisation is deliberately left to the model (it carries ``info.mean``/``info.std``)
so that an exported model takes raw 0..255 pixels.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import tensorflow as tf

_log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset could not be found, read or split as asked."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str                      # as the user gave it
    image_shape: tuple             # (height, width, channels), ints
    num_classes: int
    class_names: tuple             # str per class
    mean: tuple                    # per-channel mean of the TRAIN split, 0..255 units
    std: tuple                     # per-channel std, same units
    augment: str                   # augmentation policy chosen for this dataset
    skipped_files: int = 0         # folder datasets: unreadable files skipped
    source: str = ""               # human readable: where the data was read from


@dataclasses.dataclass(frozen=True)
class Splits:
    train: tuple   # (images uint8 [N,H,W,C], labels int64 [N])
    val: tuple     # held out from the training data, for the search
    test: tuple    # the dataset's test split, only for reporting
    info: DatasetInfo


AUGMENT_POLICIES = ("none", "crop", "crop_flip", "crop_flip_cutout")

# Digits and house numbers change meaning (or at least look unnatural) when mirrored.
_DEFAULT_AUGMENT = {
    "fashion_mnist": "crop_flip",
    "cifar10": "crop_flip_cutout",
    "cifar100": "crop_flip_cutout",
    "mnist": "crop",
    "svhn_cropped": "crop",
}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FOLDER_TEST_FRACTION = 0.2
# The folder test split is carved with its own fixed seed so that runs with
# different search seeds still report on the same test images.
_FOLDER_TEST_SEED = 0

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

_UNKNOWN_NAME_HINT = ("expected fashion_mnist, a TFDS image-classification name such as "
                      "cifar10, or folder:PATH")


# --------------------------------------------------------------------------- loading

def load_dataset(name: str, data_dir: str | None = None, *, val_size: int | float = 5000,
                 train_subset: int | None = None, seed: int = 0,
                 image_size: tuple | None = None) -> Splits:
    """Loads a dataset into memory and splits off a seeded validation set.

    name: ``fashion_mnist``, ``cifar10``/``cifar100`` (python archive in data_dir, else
      TFDS), any TFDS image-classification name, or ``folder:PATH``.
    val_size: training examples held out (seeded) for validation: a count (may be 0)
      or a float in (0, 1), that fraction of the training split, rounded.
    train_subset: keep only this many of the remaining training examples (seeded).
    image_size: (height, width) to resize every image to.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"unknown dataset {name!r}: {_UNKNOWN_NAME_HINT}")
    val_size = _check_val_size(val_size)
    if train_subset is not None:
        _check_int("train_subset", train_subset, minimum=1)
    _check_int("seed", seed, minimum=0)
    if image_size is not None:
        image_size = _check_image_size(image_size)
    if data_dir is not None:
        data_dir = os.path.expanduser(os.fspath(data_dir))
        if not os.path.isdir(data_dir):
            raise DataError(f"data_dir {data_dir!r} is not a directory: expected an "
                            "existing folder holding the dataset")

    skipped = 0
    if name.startswith("folder:"):
        raw = _load_folder(name, name[len("folder:"):], image_size)
        skipped = raw.skipped
        augment = "crop_flip"
    else:
        if name == "fashion_mnist":
            raw = _load_fashion_mnist(data_dir)
        elif name in ("cifar10", "cifar100"):
            raw = _load_cifar_python(name, data_dir) or _load_tfds(name, data_dir, image_size)
        else:
            raw = _load_tfds(name, data_dir, image_size)
        augment = _DEFAULT_AUGMENT.get(name, "crop_flip")
        if image_size is not None:
            raw = dataclasses.replace(raw, train_x=_resize_array(raw.train_x, image_size),
                                      test_x=_resize_array(raw.test_x, image_size))

    _check_arrays(name, raw)
    train_x, train_y, val_x, val_y = _split_train(
        name, raw.train_x, raw.train_y, val_size, train_subset, seed)
    mean, std = _channel_stats(train_x)
    info = DatasetInfo(
        name=name,
        image_shape=tuple(int(d) for d in train_x.shape[1:]),
        num_classes=len(raw.class_names),
        class_names=tuple(str(c) for c in raw.class_names),
        mean=mean, std=std, augment=augment,
        skipped_files=skipped, source=raw.source)
    return Splits(train=(train_x, train_y), val=(val_x, val_y),
                  test=(raw.test_x, raw.test_y), info=info)


def from_arrays(x, y, x_test=None, y_test=None, *, val_size=0.1, seed=0, class_names=None,
                name="arrays") -> Splits:
    """Splits from images in memory, for the Python API (bonsai_tf.search).

    x: [N, H, W] or [N, H, W, C] pixels 0..255 (uint8, or numbers in that range);
    y: N integer labels 0..classes-1. Without x_test/y_test, a stratified 20% of x
    (fixed seed) is held out as the test split, as for a folder dataset.
    """
    x = _array_images(x, "x")
    y = _array_labels(y, len(x), "y")
    classes = int(max(y.max(), (np.max(y_test) if y_test is not None and len(y_test) else 0)) + 1)
    if class_names is None:
        class_names = tuple(str(i) for i in range(classes))
    if (x_test is None) != (y_test is None):
        raise DataError("got one of x_test and y_test: expected both or neither")
    if x_test is None:
        is_test = _stratified_holdout(y, _FOLDER_TEST_FRACTION, _FOLDER_TEST_SEED)
        if not is_test.any():
            raise DataError(f"too few examples ({len(y)}) to hold out a test split: expected "
                            "at least 2 per class, or x_test and y_test")
        x, y, x_test, y_test = x[~is_test], y[~is_test], x[is_test], y[is_test]
    else:
        x_test = _array_images(x_test, "x_test")
        y_test = _array_labels(y_test, len(x_test), "y_test")
    raw = _Raw(x, y, x_test, y_test, tuple(str(c) for c in class_names),
               source=f"{len(y) + len(y_test)} images in memory")
    _check_arrays(name, raw)
    train_x, train_y, val_x, val_y = _split_train(name, raw.train_x, raw.train_y, val_size,
                                                  None, seed)
    mean, std = _channel_stats(train_x)
    info = DatasetInfo(name=name, image_shape=tuple(int(d) for d in train_x.shape[1:]),
                       num_classes=len(raw.class_names), class_names=raw.class_names,
                       mean=mean, std=std, augment="crop_flip", source=raw.source)
    return Splits(train=(train_x, train_y), val=(val_x, val_y), test=(raw.test_x, raw.test_y),
                  info=info)


def _array_images(x, what):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or not x.size:
        raise DataError(f"{what} has shape {x.shape}: expected images [N, H, W] or [N, H, W, C]")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number) or x.min() < 0 or x.max() > 255:
            raise DataError(f"{what} is {x.dtype} in [{x.min()}, {x.max()}]: expected pixels "
                            "0..255 (uint8, or numbers in that range)")
        x = np.round(x).astype(np.uint8)
    return x


def _array_labels(y, n, what):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer) or \
            (len(y) and y.min() < 0):
        raise DataError(f"{what} has shape {y.shape} and dtype {y.dtype}: expected {n} integer "
                        "labels >= 0, one per image")
    return y.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _Raw:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple
    source: str
    skipped: int = 0


def _check_int(what, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{what}={value!r} is invalid: expected an integer >= {minimum}")


def _check_val_size(val_size):
    """An int count >= 0 or a float fraction in (0, 1); a whole float is the count."""
    if isinstance(val_size, (float, np.floating)) and not isinstance(val_size, bool):
        v = float(val_size)
        if np.isfinite(v) and 0 < v < 1:
            return v
        if np.isfinite(v) and v.is_integer() and v >= 0:
            return int(v)
    elif isinstance(val_size, (int, np.integer)) and not isinstance(val_size, bool) \
            and val_size >= 0:
        return int(val_size)
    raise DataError(f"val_size={val_size!r} is invalid: expected a count >= 0 of training "
                    "examples or a fraction in (0, 1) of the training split")


def _check_image_size(image_size):
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise DataError(f"image_size={image_size!r} is invalid: expected (height, width)") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DataError(f"image_size={image_size!r} is invalid: expected two positive "
                            "integers (height, width)")
    return int(h), int(w)


def _check_arrays(name, raw):
    n_classes = len(raw.class_names)
    if n_classes < 2:
        raise DataError(f"dataset {name!r} has {n_classes} class(es): a dataset needs at "
                        "least 2 classes")
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"dataset {name!r} {split} images are {x.dtype} {x.shape}: "
                            "expected uint8 [N, H, W, C]")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"dataset {name!r} {split} has {len(x)} images but labels of "
                            f"shape {y.shape}: expected one label per image")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise DataError(f"dataset {name!r} {split} labels span [{y.min()}, {y.max()}]: "
                            f"expected [0, {n_classes}) for {n_classes} classes")
    if raw.train_x.shape[1:] != raw.test_x.shape[1:]:
        raise DataError(f"dataset {name!r} train images are {raw.train_x.shape[1:]} but test "
                        f"images are {raw.test_x.shape[1:]}: expected the same shape")
    if len(raw.test_x) == 0:
        raise DataError(f"dataset {name!r} has an empty test split: expected test examples "
                        "for reporting")


def _split_train(name, x, y, val_size, train_subset, seed):
    n = len(x)
    asked = f"val_size={val_size}"
    if isinstance(val_size, float):
        # At least one example: a fraction > 0 asks for a validation set.
        count = max(1, int(round(val_size * n)))
        asked += f" ({count} of {n} examples)"
        val_size = count
    if val_size >= n:
        raise DataError(f"{asked} is too large for {name!r}: expected fewer than its {n} "
                        "training examples")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, rest = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        if train_subset > len(rest):
            raise DataError(f"train_subset={train_subset} is too large for {name!r}: expected "
                            f"at most the {len(rest)} training examples left after {asked}")
        rest = rest[:train_subset]
    # Sorted indices keep the copies cache-friendly; order is irrelevant because
    # make_dataset shuffles.
    val_idx, rest = np.sort(val_idx), np.sort(rest)
    return x[rest], y[rest], x[val_idx], y[val_idx]


def _channel_stats(images):
    c = images.shape[-1]
    total = np.zeros(c, np.float64)
    total_sq = np.zeros(c, np.float64)
    # Chunked so that CIFAR-sized arrays never get a full float64 copy.
    for i in range(0, len(images), 4096):
        chunk = images[i:i + 4096].reshape(-1, c).astype(np.float64)
        total += chunk.sum(0)
        total_sq += np.square(chunk).sum(0)
    count = images.size // c
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _resize_array(images, size):
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    out = np.empty((len(images), size[0], size[1], images.shape[3]), np.uint8)
    for i in range(0, len(images), 1024):
        out[i:i + 1024] = _resize_tensor(images[i:i + 1024], size).numpy()
    return out


def _resize_tensor(images, size):
    resized = tf.image.resize(images, size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


# ------------------------------------------------------------------ Fashion-MNIST

def _find_idx_files(directory):
    found = {}
    for key, base in _FASHION_FILES.items():
        for candidate in (base + ".gz", base):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found[key] = path
                break
    return found


def _load_fashion_mnist(data_dir):
    if data_dir is not None:
        files = _find_idx_files(data_dir)
        if files:
            return _read_fashion_idx(files, data_dir)
        if os.path.isdir(os.path.join(data_dir, "fashion_mnist")):
            return _load_tfds("fashion_mnist", data_dir, None)
        # No fallback to the system copy: a data_dir that was named but holds nothing
        # is a mistake (a wrong path), and training on other data would hide it.
        raise DataError(f"no Fashion-MNIST files in data_dir {data_dir}: expected the IDX "
                        f"files {_fashion_names()} (gzipped or not), or a TFDS-prepared "
                        f"fashion_mnist/ folder; without data_dir {FASHION_MNIST_DIR} is read")
    files = _find_idx_files(FASHION_MNIST_DIR) if os.path.isdir(FASHION_MNIST_DIR) else {}
    if files:
        return _read_fashion_idx(files, FASHION_MNIST_DIR)
    raise DataError(f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR}: expected "
                    f"{_fashion_names()}; run `apt-get install dataset-fashion-mnist` or pass "
                    "--data_dir")


def _fashion_names():
    return ", ".join(base + ".gz" for base in _FASHION_FILES.values())


def _read_fashion_idx(files, directory):
    missing = sorted(set(_FASHION_FILES) - set(files))
    if missing:
        names = ", ".join(_FASHION_FILES[k] + ".gz" for k in missing)
        raise DataError(f"Fashion-MNIST in {directory} is incomplete: missing {names}")
    train_x = read_idx(files["train_images"], ndim=3)[..., None]
    train_y = read_idx(files["train_labels"], ndim=1).astype(np.int64)
    test_x = read_idx(files["test_images"], ndim=3)[..., None]
    test_y = read_idx(files["test_labels"], ndim=1).astype(np.int64)
    for x, y, xf, yf in ((train_x, train_y, "train_images", "train_labels"),
                         (test_x, test_y, "test_images", "test_labels")):
        if len(x) != len(y):
            raise DataError(f"{files[xf]} holds {len(x)} images but {files[yf]} holds "
                            f"{len(y)} labels: expected the same count")
    used = ", ".join(os.path.basename(files[k]) for k in _FASHION_FILES)
    return _Raw(train_x, train_y, test_x, test_y, FASHION_MNIST_CLASSES,
                source=f"Fashion-MNIST IDX files in {os.path.abspath(directory)}: {used}")


def read_idx(path, ndim):
    """Reads an IDX (MNIST-format) uint8 file, gzipped or not, into an ndarray."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        # A gzip stream cut short surfaces here as EOFError.
        raise DataError(f"cannot read IDX file {path}: {e} (truncated or corrupt?)") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not a uint8 IDX file with {ndim} dimension(s): magic "
                        f"{raw[:4].hex() or 'missing'}, expected 000008{ndim:02x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(f"IDX file {path} is truncated or corrupt: its header promises shape "
                        f"{dims} ({expected} bytes) but it holds {len(raw) - header} bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# ---------------------------------------------------------------- CIFAR python

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", labels=b"labels", names=b"label_names"),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     train=["train"], test=["test"], meta="meta",
                     labels=b"fine_labels", names=b"fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
    # The CIFAR batches are pickles; allowing only numpy's array reconstruction keeps a
    # tampered archive from running arbitrary code.
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_python(name, data_dir):
    """Reads the official CIFAR python archive/folder from data_dir, or returns None."""
    if data_dir is None:
        return None
    spec = _CIFAR[name]
    folder = os.path.join(data_dir, spec["folder"])
    archive = os.path.join(data_dir, spec["archive"])
    if os.path.isdir(folder):
        def read(member):
            path = os.path.join(folder, member)
            try:
                with open(path, "rb") as f:
                    return _unpickle(f, path)
            except FileNotFoundError:
                raise DataError(f"CIFAR folder {folder} has no {member}: expected "
                                f"{', '.join(spec['train'] + spec['test'] + [spec['meta']])}") \
                    from None
        source = f"CIFAR python folder {folder}"
        return _read_cifar(name, spec, read, source)
    if os.path.isfile(archive):
        try:
            with tarfile.open(archive, "r:gz") as tar:
                # Index by basename: the members sit under the archive's top folder.
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}

                def read(member):
                    if member not in members:
                        raise DataError(f"CIFAR archive {archive} has no {member}: expected "
                                        f"the official {spec['archive']}")
                    return _unpickle(tar.extractfile(members[member]), f"{archive}:{member}")
                return _read_cifar(name, spec, read, f"CIFAR python archive {archive}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"cannot read CIFAR archive {archive}: {e} (truncated or "
                            "corrupt?)") from None
    return None


def _unpickle(f, where):
    try:
        obj = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"cannot unpickle {where}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}: expected a CIFAR batch dict")
    # Keys are bytes in the official (python 2) pickles, str in re-pickled ones.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _read_cifar(name, spec, read, source):
    def batches(members):
        xs, ys = [], []
        for member in members:
            batch = read(member)
            try:
                x = np.asarray(batch[b"data"], np.uint8)
                y = np.asarray(batch[spec["labels"]], np.int64)
            except KeyError as e:
                raise DataError(f"{source}: {member} lacks key {e}: expected b'data' and "
                                f"{spec['labels']!r}") from None
            if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise DataError(f"{source}: {member} holds data {x.shape} and {len(y)} "
                                "labels: expected (N, 3072) and N labels")
            # Rows are three 32x32 channel planes; move channels last.
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(y)
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    train_x, train_y = batches(spec["train"])
    test_x, test_y = batches(spec["test"])
    meta = read(spec["meta"])
    names = meta.get(spec["names"])
    if names is None:
        raise DataError(f"{source}: {spec['meta']} lacks {spec['names']!r}")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return _Raw(train_x, train_y, test_x, test_y, names, source=source)


# ----------------------------------------------------------------------- TFDS

def _load_tfds(name, data_dir, image_size):
    # Imported here: tensorflow_datasets is slow to import and only this path needs it.
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown dataset {name!r}: {_UNKNOWN_NAME_HINT} (TFDS names are "
                        "lower_snake_case, e.g. mnist, svhn_cropped, cifar100, "
                        "or name/config:version)") from None
    except (ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot open TFDS dataset {name!r}: {first}") from None

    info = builder.info
    keys = info.supervised_keys
    features = info.features
    image_key, label_key = keys if isinstance(keys, tuple) and len(keys) == 2 else (None, None)
    if not (isinstance(image_key, str) and isinstance(label_key, str)
            and isinstance(features[image_key], tfds.features.Image)
            and isinstance(features[label_key], tfds.features.ClassLabel)):
        raise DataError(f"TFDS dataset {name!r} has supervised keys {keys!r}: expected an "
                        "image-classification dataset (image, class label)")
    shape = tuple(features[image_key].shape)
    label_feature = features[label_key]
    if shape[-1] is None:
        raise DataError(f"TFDS dataset {name!r} has images of shape {shape}: expected a "
                        "known number of channels")
    if None in shape[:2] and image_size is None:
        raise DataError(f"TFDS dataset {name!r} has images of varying size {shape}: pass "
                        "image_size=(height, width) to resize them")

    # Split names are unknown until a dataset is prepared (and under tfds mocking); then
    # the standard names are tried and a missing split shows up as unprepared data.
    split_names = set(info.splits.keys())
    test_split = "test"
    if split_names:
        if "train" not in split_names:
            raise DataError(f"TFDS dataset {name!r} has splits {sorted(split_names)}: "
                            "expected a 'train' split")
        if "test" not in split_names:
            if "validation" not in split_names:
                raise DataError(f"TFDS dataset {name!r} has splits {sorted(split_names)}: "
                                "expected a 'test' or 'validation' split for reporting")
            test_split = "validation"

    root = data_dir or tfds.core.constants.DATA_DIR  # honours $TFDS_DATA_DIR like tfds

    def read(split):
        try:
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        except AssertionError:
            # TFDS signals "not prepared" with an AssertionError.
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {root} (searched "
                f"{builder.data_dir}) and data cannot be downloaded here: run `tfds build "
                f"{name} --data_dir={root}` on a machine with internet and copy it over"
                + (f", or put {_CIFAR[name]['archive']} in data_dir" if name in _CIFAR else "")
            ) from None
        if image_size is not None:
            ds = ds.map(lambda x, y: (_resize_tensor(x, image_size), y),
                        num_parallel_calls=tf.data.AUTOTUNE)
        # Batched reads instead of batch_size=-1: the latter needs a known example count,
        # which mocked or partially described datasets do not have.
        xs, ys = [], []
        for x, y in tfds.as_numpy(ds.batch(2048)):
            xs.append(np.asarray(x, np.uint8))
            ys.append(np.asarray(y, np.int64))
        if not xs:
            raise DataError(f"TFDS dataset {name!r} split {split!r} in {builder.data_dir} "
                            "is empty: expected examples")
        return np.concatenate(xs), np.concatenate(ys)

    train_x, train_y = read("train")
    test_x, test_y = read(test_split)
    names = tuple(label_feature.names) if label_feature.names else tuple(
        str(i) for i in range(label_feature.num_classes))
    return _Raw(train_x, train_y, test_x, test_y, names,
                source=f"TFDS {name} in {builder.data_dir} (test split: {test_split})")


# --------------------------------------------------------------------- folders

def _load_folder(name, path, image_size):
    if not path:
        raise DataError(f"dataset {name!r} has an empty path: expected folder:PATH")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise DataError(f"folder dataset path {path} does not exist or is not a directory: "
                        "expected a folder with one sub-folder per class")

    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")
    has_splits = os.path.isdir(train_dir) and os.path.isdir(test_dir)
    class_root = train_dir if has_splits else path
    class_names = _class_dirs(class_root)
    if len(class_names) < 2:
        raise DataError(f"a dataset needs at least 2 classes, got {len(class_names)} in "
                        f"{class_root}")
    if has_splits:
        unknown = sorted(set(_class_dirs(test_dir)) - set(class_names))
        if unknown:
            raise DataError(f"{test_dir} has class folder(s) {unknown} missing from "
                            f"{train_dir}: expected test classes to be training classes")

    decoded, skipped = [], []   # decoded: (split, label, file, array)
    roots = [("train", train_dir), ("test", test_dir)] if has_splits else [(None, path)]
    for split, root in roots:
        for label, cls in enumerate(class_names):
            for file in _image_files(os.path.join(root, cls)):
                array = _decode_image(file, image_size)
                if array is None:
                    skipped.append(file)
                else:
                    decoded.append((split, label, file, array))
    if skipped:
        _log.warning("skipped %d unreadable or non-image file(s) in %s, first: %s",
                     len(skipped), path, skipped[0])
    if not decoded:
        raise DataError(f"no readable images in {path}: expected image files inside its "
                        "class sub-folders")
    counts = np.bincount([d[1] for d in decoded], minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        _log.warning("class folder(s) with no readable images in %s: %s", path, empty)

    if image_size is None:
        first = decoded[0]
        for d in decoded[1:]:
            if d[3].shape[:2] != first[3].shape[:2]:
                (h1, w1), (h2, w2) = first[3].shape[:2], d[3].shape[:2]
                raise DataError(f"images differ in size: {first[2]} is {h1}x{w1} but {d[2]} "
                                f"is {h2}x{w2} (HxW): pass image_size=(height, width) to "
                                "resize them")
    colour = any(d[3].ndim == 3 for d in decoded)
    images = np.stack([_to_channels(d[3], colour) for d in decoded])
    labels = np.array([d[1] for d in decoded], np.int64)

    if has_splits:
        is_test = np.array([d[0] == "test" for d in decoded])
        source = f"image folder {path} (train/ and test/ sub-folders)"
    else:
        is_test = _stratified_holdout(labels, _FOLDER_TEST_FRACTION, _FOLDER_TEST_SEED)
        source = (f"image folder {path} ({_FOLDER_TEST_FRACTION:.0%} held out as test, "
                  "stratified)")
        if not is_test.any():
            raise DataError(f"too few images in {path} ({len(labels)}) to hold out a "
                            f"{_FOLDER_TEST_FRACTION:.0%} test split: expected at least 2 "
                            "per class, or train/ and test/ sub-folders")
    return _Raw(images[~is_test], labels[~is_test], images[is_test], labels[is_test],
                tuple(class_names), source=source, skipped=len(skipped))


def _class_dirs(root):
    return sorted(e.name for e in os.scandir(root)
                  if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir):
    if not os.path.isdir(class_dir):
        return []
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        # Hidden entries (.DS_Store, .ipynb_checkpoints) are tooling noise, not data.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith("."))
    return files


def _decode_image(file, image_size):
    """Returns (H, W) uint8 for grey images, (H, W, 3) for colour, None if unreadable."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            im.load()  # decode fully now so truncated files are caught here
            if im.mode in _GREY_MODES:
                im = im.convert("L")
            else:
                rgb = im.convert("RGB")  # drops alpha; palettes expand to colours
                arr = np.asarray(rgb)
                # Palette images are often grey in disguise.
                grey = im.mode in ("P", "PA") and (
                    np.array_equal(arr[..., 0], arr[..., 1])
                    and np.array_equal(arr[..., 1], arr[..., 2]))
                im = rgb.convert("L") if grey else rgb
            if image_size is not None and im.size != (image_size[1], image_size[0]):
                im = im.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, np.uint8)
    except Exception:  # noqa: BLE001 - any decoder failure just means "not an image"
        return None


def _to_channels(array, colour):
    if array.ndim == 3:
        return array
    return np.repeat(array[..., None], 3, axis=-1) if colour else array[..., None]


def _stratified_holdout(labels, fraction, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < 2:
            continue  # a lone example is worth more to training than to the test set
        n_test = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        mask[rng.permutation(idx)[:n_test]] = True
    return mask


# ------------------------------------------------------------------ pipelines

def crop_padding(height: int, width: int) -> int:
    """Zero padding used by the random-crop policies.

    1/8 of the shorter side, rounded down to an even number: 4 px for 32-px CIFAR and
    2 px for 28-px (Fashion-)MNIST, as in the papers, and proportionally elsewhere.
    """
    return max(1, (min(height, width) // 8) // 2 * 2)


def cutout_size(height: int, width: int) -> int:
    """Cutout square side: half the shorter side (16 px on 32-px CIFAR, as in DARTS)."""
    return max(1, min(height, width) // 2)


def make_dataset(images, labels, *, batch_size: int, training: bool, augment: str = "none",
                 seed: int | None = None, drop_remainder: bool = False) -> tf.data.Dataset:
    """Builds a batched tf.data pipeline of (float32 0..255 images, int64 labels).

    With training=True the examples are shuffled and augmented; a given seed
    reproduces both the order and the augmentations (make one dataset per epoch).  With training=False the
    order is kept and no augmentation is applied.
    """
    if augment not in AUGMENT_POLICIES:
        raise DataError(f"unknown augment policy {augment!r}: expected one of "
                        f"{', '.join(AUGMENT_POLICIES)}")
    _check_int("batch_size", batch_size, minimum=1)
    if seed is not None:
        _check_int("seed", seed, minimum=0)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images are {images.dtype} {images.shape}: expected uint8 "
                        "[N, H, W, C]")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"labels have shape {labels.shape} for {len(images)} images: "
                        "expected one label per image")

    if training and len(images) > 1:
        # One seeded permutation (the engine makes a dataset per epoch, seeded by it):
        # a tf.data shuffle buffer of the whole split took 1-2 s per epoch to fill
        # before its first batch.
        perm = np.random.default_rng(seed).permutation(len(images))
        images, labels = images[perm], labels[perm]
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int64)))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    if training and augment != "none":
        h, w = int(images.shape[1]), int(images.shape[2])
        augment_fn = _batch_augmenter(augment, h, w)
        # One stateless seed per batch from a seeded stream that is redrawn each epoch, so
        # augmentations differ between epochs yet repeat exactly for a given seed.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda batch, s: augment_fn(batch[0], batch[1], s),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Autotuning off: its model thread sleeps in waits that double from 10 ms, and
    # deleting the iterator at the end of an epoch waited out the current one, up to
    # 20.5 or 41 s an epoch in quick searches (measured: epochs ended at exactly
    # 10 ms x 2^11 and 2^12 after they started). The AUTOTUNE values above then keep
    # the starting values tf.data gives them instead of being tuned; quick-search steps
    # ran no slower for it (measured).
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _batch_augmenter(policy, height, width):
    pad = crop_padding(height, width)
    cut = cutout_size(height, width)
    flip = policy in ("crop_flip", "crop_flip_cutout")
    cutout = policy == "crop_flip_cutout"

    def augment(x, y, seed):
        crop_seed, flip_seed, cut_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, num=3))
        x = tf.cast(x, tf.float32)
        n = tf.shape(x)[0]

        # Random crop of the zero-padded batch, one offset per example, done with gathers
        # so the whole batch is cropped in a single vectorised op.
        offsets = tf.random.stateless_uniform([n, 2], crop_seed, 0, 2 * pad + 1, tf.int32)
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        rows = offsets[:, :1] + tf.range(height)[None, :]
        cols = offsets[:, 1:] + tf.range(width)[None, :]
        x = tf.gather(padded, rows, axis=1, batch_dims=1)
        x = tf.gather(x, cols, axis=2, batch_dims=1)

        if flip:
            do_flip = tf.random.stateless_uniform([n], flip_seed) < 0.5
            x = tf.where(do_flip[:, None, None, None], tf.reverse(x, axis=[2]), x)

        if cutout:
            # DARTS-style: centre anywhere in the image, square clipped at the borders,
            # applied to half the examples.  Filled with 0 (black) in pixel units.
            u = tf.random.stateless_uniform([n, 3], cut_seed)
            cy = tf.cast(u[:, 0] * height, tf.int32)
            cx = tf.cast(u[:, 1] * width, tf.int32)
            apply = u[:, 2] < 0.5
            ys = tf.range(height)[None, :]
            xs = tf.range(width)[None, :]
            in_rows = (ys >= (cy - cut // 2)[:, None]) & (ys < (cy - cut // 2 + cut)[:, None])
            in_cols = (xs >= (cx - cut // 2)[:, None]) & (xs < (cx - cut // 2 + cut)[:, None])
            hole = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
            x = tf.where(hole[..., None], tf.zeros_like(x), x)
        return x, y

    return augment


def representative_images(splits: Splits, count: int = 200, seed: int = 0) -> np.ndarray:
    """A seeded uint8 sample of training images, e.g. for int8 calibration."""
    _check_int("count", count, minimum=1)
    images = splits.train[0]
    n = min(count, len(images))
    idx = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    return images[idx]
