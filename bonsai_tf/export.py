"""Deployable artifacts of a finished run: SavedModel, float and int8 TFLite.

`export_run(run_dir)` reads the final Keras model (model.keras, no pruners, no aux
heads) and writes next to it:

  saved_model/        a `tf.Module` with one signature, ``serving_default``:
                        input  ``images``        uint8   [batch, H, W, C] raw pixels 0..255
                        output ``probabilities`` float32 [batch, num_classes] (softmax)
                        output ``logits``        float32 [batch, num_classes]
                      any batch size; normalisation is inside the graph.  It loads with
                      ``tf.saved_model.load`` alone: nothing of bonsai_tf or Keras is
                      needed.  ``model_variables`` lists the weights.
  model.tflite        float32 weights and arithmetic.  Input ``images`` uint8
                      [batch, H, W, C] raw pixels (cast to float inside), output
                      probabilities float32 [batch, num_classes].
  model_int8.tflite   full-integer post-training quantization (TFLITE_BUILTINS_INT8 only),
                      calibrated on training images.  Input uint8 [batch, H, W, C]
                      whose quantization parameters are stored in the model; they are
                      scale 1, zero point 0 (the raw pixels themselves) whenever the
                      calibration images span 0..255, as natural images do, and
                      export.json records them.  Output probabilities dequantized to
                      float32: the int8 softmax is kept, only its final rescale is
                      float, which costs nothing in accuracy and spares every caller
                      the output quantization parameters.
  export.json         written last (its presence marks a complete export): for every
                      artifact its size, its top-1 accuracy on the TEST split and its
                      agreement with the Keras model (max absolute difference of the
                      probabilities, fraction of equal top-1 predictions).  The
                      ``artifacts`` entries are keyed by file name with the fields
                      ``size_bytes``, ``accuracy``, ``max_abs_diff``, ``top1_agreement``
                      that report.py tabulates.

Every file is written under a temporary name and renamed into place.  TFLite
models run with ai-edge-litert (`TFLiteClassifier`), SavedModels with TensorFlow
(`SavedModelClassifier`).

TensorFlow and Keras are imported inside the functions that need them, so that a
script running only a .tflite model (export/predict.py) does not pay for them.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from bonsai_tf import run_dir as rd

MODEL_FILE = "model.keras"        # as bonsai_tf.engine.MODEL_FILE
DATASET_FILE = "dataset.json"     # as bonsai_tf.engine.DATASET_FILE
METRICS_FILE = "metrics.json"     # written last by a run: marks it finished
CONFIG_FILE = "config.json"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
TFLITE_INT8_FILE = "model_int8.tflite"
EXPORT_FILE = "export.json"
SIGNATURE = "serving_default"
EXPORT_FORMAT = "bonsai-tf-export"
EXPORT_VERSION = 1


class ExportError(ValueError):
    """A run, model or data set cannot be exported or run as asked."""


# --------------------------------------------------------------------------- entry points

def export_run(run_dir, splits=None, representative_count=200, seed=0, batch_size=256,
               num_threads=None):
    """Exports the finished run in `run_dir`; returns the export.json dict.

    splits: the run's `data.Splits`; None reloads them with data.load_dataset from
      config.json (dataset, data_dir, val_size, seed, image_size).  The int8 model is
      calibrated on `representative_count` training images and every artifact is
      evaluated on the test split.
    seed: picks the calibration images (data.representative_images).
    batch_size: evaluation batch size.
    num_threads: TFLite interpreter threads; None = all cores.
    """
    run_dir = os.fspath(run_dir)
    check_finished_run(run_dir)
    # The model first: a broken one fails fast, before a data set is loaded for nothing.
    model = load_keras_model(os.path.join(run_dir, MODEL_FILE))
    if splits is None:
        splits = _reload_splits(run_dir)
    return export_model(model, splits, run_dir, representative_count=representative_count,
                        seed=seed, batch_size=batch_size, num_threads=num_threads)


def check_finished_run(run_dir):
    """Raises ExportError unless `run_dir` holds a finished run (model.keras + metrics.json)."""
    if not os.path.isdir(run_dir):
        raise ExportError(f"run_dir {run_dir!r} is not a directory: expected the directory "
                          f"of a finished run (holding {MODEL_FILE} and {METRICS_FILE})")
    missing = [f for f in (MODEL_FILE, METRICS_FILE)
               if not os.path.isfile(os.path.join(run_dir, f))]
    if missing:
        raise ExportError(f"run_dir {run_dir!r} is not a finished run: it lacks "
                          f"{' and '.join(missing)}; expected {MODEL_FILE} and {METRICS_FILE}, "
                          "which a run writes when it ends")


def export_model(model, splits, out_dir, representative_count=200, seed=0, batch_size=256,
                 num_threads=None):
    """Exports a final Keras model (raw pixels in, logits out) into `out_dir`.

    Works for any such model, e.g. `network.Network(...).final().model` that was never
    saved: `splits` (data.Splits) gives the image shape and class names (info), the
    calibration images (train) and the evaluation images (test).  Writes saved_model/,
    model.tflite, model_int8.tflite, export.json (and dataset.json if out_dir has none);
    returns the export.json dict.
    """
    import tensorflow as tf

    started = time.time()
    _check_int("representative_count", representative_count, 1)
    _check_int("batch_size", batch_size, 1)
    info = splits.info
    image_shape = check_model(model, info)
    _check_splits(splits, image_shape, info.num_classes)
    out_dir = os.fspath(out_dir)
    export_path = os.path.join(out_dir, EXPORT_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        # A stale export.json would vouch for artifacts this export is about to replace.
        if os.path.exists(export_path):
            os.unlink(export_path)
    except OSError as e:
        raise rd.RunDirError(f"cannot prepare {out_dir} for export: {e.strerror or e}; "
                             "expected a writable directory") from None
    _remove_leftovers(out_dir)
    if not os.path.exists(os.path.join(out_dir, DATASET_FILE)):
        # So that predict.py finds class names next to the models.
        rd.write_json(os.path.join(out_dir, DATASET_FILE), _asdict(info))

    seconds = {}
    t = time.time()
    module = serving_module(model, image_shape)
    saved_model_path = os.path.join(out_dir, SAVED_MODEL_DIR)
    _save_dir_atomically(lambda tmp: tf.saved_model.save(
        module, tmp, signatures={SIGNATURE: module.serve.get_concrete_function()}),
        saved_model_path)
    seconds["saved_model"] = time.time() - t

    t = time.time()
    rd.atomic_write(os.path.join(out_dir, TFLITE_FILE), tflite_float(model, image_shape), "wb")
    seconds["tflite"] = time.time() - t

    t = time.time()
    from bonsai_tf import data as data_lib
    representative = data_lib.representative_images(splits, representative_count, seed)
    int8_blob, int8_choice = choose_int8(model, image_shape, representative, splits.val,
                                         num_threads=num_threads, batch_size=batch_size)
    rd.atomic_write(os.path.join(out_dir, TFLITE_INT8_FILE), int8_blob, "wb")
    seconds["tflite_int8"] = time.time() - t

    # Everything is measured from the files on disk: what was written is what is vouched for.
    t = time.time()
    test_x, test_y = splits.test
    reference = keras_probabilities(model, test_x, batch_size)
    keras_path = os.path.join(out_dir, MODEL_FILE)
    artifacts = {}
    keras_entry = {"kind": "keras", "accuracy": _accuracy(reference, test_y)}
    if os.path.isfile(keras_path):
        keras_entry["size_bytes"] = os.path.getsize(keras_path)
        keras_entry["sha256"] = sha256_file(keras_path)
    artifacts[MODEL_FILE] = keras_entry

    sm = SavedModelClassifier(saved_model_path, batch_size=batch_size)
    artifacts[SAVED_MODEL_DIR] = {
        "kind": "saved_model", "size_bytes": tree_size(saved_model_path),
        "signature": SIGNATURE, "input": "images uint8 [batch, H, W, C], raw pixels 0..255",
        "outputs": "probabilities, logits: float32 [batch, num_classes]",
        **_agreement(sm(test_x), reference, test_y)}
    for name, kind in ((TFLITE_FILE, "tflite_float32"), (TFLITE_INT8_FILE, "tflite_int8")):
        path = os.path.join(out_dir, name)
        lite = TFLiteClassifier(path, num_threads=num_threads, batch_size=batch_size)
        entry = {"kind": kind, "size_bytes": os.path.getsize(path),
                 "input_dtype": lite.input_dtype, "output": "probabilities float32"}
        if lite.input_quantization is not None:
            scale, zero_point = lite.input_quantization
            entry.update(input_scale=scale, input_zero_point=zero_point,
                         raw_pixel_input=bool(scale == 1.0 and zero_point == 0))
        entry.update(_agreement(lite(test_x), reference, test_y))
        if kind == "tflite_int8":
            entry.update(int8_choice)
        artifacts[name] = entry
    seconds["evaluate"] = time.time() - t
    seconds["total"] = time.time() - started

    result = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "tensorflow": tf.__version__,
        "input": {"name": "images", "dtype": "uint8", "shape": [None, *image_shape],
                  "pixels": "raw 0..255; normalisation is inside the model"},
        "num_classes": int(info.num_classes),
        "class_names": [str(c) for c in info.class_names],
        "params": int(sum(int(np.prod(v.shape)) for v in model.trainable_weights)),
        "test_examples": int(len(test_y)),
        "representative": {"split": "train", "count": int(len(representative)), "seed": seed},
        "artifacts": artifacts,
        "seconds": seconds,
    }
    rd.write_json(export_path, result)
    return result


# --------------------------------------------------------------------------- building

def load_keras_model(path):
    """Loads a final model saved by bonsai_tf (its custom layers are registered on import)."""
    import keras

    import bonsai_tf.layers  # noqa: F401 - registers the custom layers for deserialisation

    if not os.path.isfile(path):
        raise ExportError(f"Keras model {path!r} does not exist: expected a .keras file")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad file
        raise ExportError(f"cannot load Keras model {path!r} ({type(e).__name__}: "
                          f"{_one_line(e)}): expected a model.keras written by bonsai_tf") from None


def check_model(model, info):
    """Checks the model takes info.image_shape and gives num_classes logits; returns (H, W, C)."""
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        raise ExportError(f"model has {len(inputs or [])} inputs: expected one image input")
    image_shape = tuple(inputs[0].shape[1:])
    expected = tuple(int(v) for v in info.image_shape)
    if image_shape != expected:
        raise ExportError(f"model takes images of shape {image_shape}: expected {expected} "
                          f"(the shape of dataset {info.name!r})")
    out = model.outputs[0]
    if len(out.shape) != 2 or out.shape[-1] != info.num_classes:
        raise ExportError(f"model's first output has shape {tuple(out.shape)}: expected "
                          f"(batch, {info.num_classes}) logits for {info.num_classes} classes")
    return expected


def model_logits(model, x):
    """Logits of the final head: inference mode, first output if the model has several."""
    out = model(x, training=False)
    # Network builds its models with a list of outputs (final head first); Keras may
    # hand a one-element list back as the bare tensor.
    return out[0] if isinstance(out, (list, tuple)) else out


def _tf_variables(model):
    # The tf.Variables under the Keras variables, listed explicitly: tracked through the
    # Keras model (or as Keras variables) some went unsaved, and the TFLite converter
    # then left an unfrozen READ_VARIABLE that fails at run time.
    return [v.value for v in model.variables]


def serving_module(model, image_shape):
    """A tf.Module whose `serve` (uint8 images -> probabilities, logits) wraps `model`."""
    import tensorflow as tf

    module = tf.Module(name="bonsai_classifier")
    module.model_variables = _tf_variables(model)

    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.uint8, name="images")])
    def serve(images):
        logits = model_logits(model, tf.cast(images, tf.float32))
        return {"probabilities": tf.nn.softmax(logits), "logits": logits}

    module.serve = serve
    return module


def _tflite_module(model, image_shape, dtype):
    import tensorflow as tf

    module = tf.Module(name="bonsai_tflite")
    module.model_variables = _tf_variables(model)

    # A single output keeps the TFLite models trivial to consume.
    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], dtype, name="images")])
    def probabilities(images):
        return tf.nn.softmax(model_logits(model, tf.cast(images, tf.float32)))

    module.probabilities = probabilities
    return module


def tflite_float(model, image_shape):
    """Float32 TFLite flatbuffer (bytes): uint8 raw pixels in, probabilities out."""
    import tensorflow as tf

    module = _tflite_module(model, image_shape, tf.uint8)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.probabilities.get_concrete_function()], module)
    return _convert(converter, "float32")


def tflite_int8(model, image_shape, representative, per_channel=True):
    """Full-integer TFLite flatbuffer (bytes) calibrated on uint8 `representative` images.

    per_channel=False quantizes each weight tensor with one scale: a smaller file (no
    per-channel scale and zero-point arrays, which weigh much in a small network) at
    some risk to accuracy; `export_model` picks between the two on validation data.
    """
    import tensorflow as tf

    representative = np.asarray(representative)
    if representative.dtype != np.uint8 or representative.shape[1:] != tuple(image_shape) \
            or len(representative) == 0:
        raise ExportError(f"representative images are {representative.dtype} "
                          f"{representative.shape}: expected uint8 "
                          f"[N>0, {', '.join(map(str, image_shape))}]")
    # The graph takes float pixels so that the converter quantizes the input itself
    # (inference_input_type): given a uint8 graph input it keeps a float CAST and a
    # float tensor at the front, and the model is no longer integer-only.
    module = _tflite_module(model, image_shape, tf.float32)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.probabilities.get_concrete_function()], module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32

    def samples():
        for image in representative:
            yield [image[None].astype(np.float32)]

    converter.representative_dataset = samples
    if not per_channel:
        # The converter's only switch for per-tensor weight scales (TF 2.21).
        converter._experimental_disable_per_channel = True
    return _convert(converter, "int8")


# Per-tensor int8 is kept when it loses at most this much validation accuracy
# against per-channel int8: the file is smaller and the loss is within noise.
PER_TENSOR_TOLERANCE = 0.0025


def choose_int8(model, image_shape, representative, val, num_threads=None, batch_size=256):
    """(flatbuffer, record): per-channel or per-tensor int8, chosen on validation data.

    The choice never looks at the test split, whose accuracy export.json reports.
    """
    candidates = {}
    for mode, per_channel in (("per-channel", True), ("per-tensor", False)):
        blob = tflite_int8(model, image_shape, representative, per_channel)
        accuracy = None
        if len(val[1]):
            lite = TFLiteClassifier(blob, num_threads=num_threads, batch_size=batch_size)
            accuracy = _accuracy(lite(val[0]), val[1])
        candidates[mode] = (blob, accuracy)
    (pc, pc_acc), (pt, pt_acc) = candidates["per-channel"], candidates["per-tensor"]
    use_tensor = pc_acc is not None and pt_acc >= pc_acc - PER_TENSOR_TOLERANCE
    record = {"quantization": "per-tensor" if use_tensor else "per-channel",
              "candidates": {m: {"size_bytes": len(b), "val_accuracy": a}
                             for m, (b, a) in candidates.items()},
              "rule": f"per-tensor when its validation accuracy is within "
                      f"{PER_TENSOR_TOLERANCE * 100:g} points of per-channel's"}
    return (pt if use_tensor else pc), record


def _convert(converter, what):
    try:
        return converter.convert()
    except Exception as e:  # noqa: BLE001 - the converter raises many types
        raise ExportError(f"TFLite {what} conversion failed ({type(e).__name__}: "
                          f"{_one_line(e)[-500:]}): expected a model of TFLite builtin "
                          "operations") from None


# --------------------------------------------------------------------------- running

class _Classifier:
    """Runs `run_batch` (uint8 images -> probabilities) over inputs of any length."""

    def __call__(self, images):
        images = _check_images(images, self.image_shape)
        out = np.empty((len(images), self.num_classes), np.float32)
        for start in range(0, len(images), self.batch_size):
            out[start:start + self.batch_size] = self.run_batch(
                images[start:start + self.batch_size])
        return out


class TFLiteClassifier(_Classifier):
    """Runs a .tflite classifier with ai-edge-litert on uint8 images.

    Batches are run by resizing the input tensor, so any batch size works.  Integer
    inputs are quantized with the model's own parameters; integer outputs are
    dequantized.  Call it with uint8 [N, H, W, C]; it returns float32 [N, classes].
    """

    def __init__(self, model, num_threads=None, batch_size=256):
        from ai_edge_litert.interpreter import Interpreter

        _check_int("batch_size", batch_size, 1)
        if isinstance(model, (bytes, bytearray)):
            source, kwargs = "TFLite model bytes", {"model_content": bytes(model)}
        else:
            source = repr(os.fspath(model))
            if not os.path.isfile(model):
                raise ExportError(f"TFLite model {source} does not exist: expected a .tflite file")
            kwargs = {"model_path": os.fspath(model)}
        try:
            self._interpreter = Interpreter(num_threads=num_threads or os.cpu_count() or 1,
                                            **kwargs)
        except (ValueError, RuntimeError) as e:
            raise ExportError(f"cannot load {source} ({_one_line(e)}): expected a TFLite "
                              "flatbuffer") from None
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0]["shape_signature"]) != 4 \
                or len(outputs[0]["shape_signature"]) != 2:
            raise ExportError(f"{source} has {len(inputs)} input(s) and {len(outputs)} "
                              "output(s): expected one image input [batch, H, W, C] and one "
                              "probabilities output [batch, classes]")
        self._input, self._output = inputs[0], outputs[0]
        self.image_shape = tuple(int(v) for v in self._input["shape_signature"][1:])
        self.num_classes = int(self._output["shape_signature"][-1])
        self.input_dtype = np.dtype(self._input["dtype"]).name
        scale, zero_point = self._input["quantization"]
        self.input_quantization = ((float(scale), int(zero_point))
                                   if np.issubdtype(self._input["dtype"], np.integer) and scale
                                   else None)
        self.batch_size = batch_size
        self._batch = None

    def _resize(self, n):
        if n != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], [n, *self.image_shape])
            self._interpreter.allocate_tensors()
            self._batch = n

    def _prepare(self, images):
        dtype = self._input["dtype"]
        if self.input_quantization is None:
            return images.astype(dtype)
        scale, zero_point = self.input_quantization
        if scale == 1.0 and zero_point == 0 and dtype == np.uint8:
            return images
        info = np.iinfo(dtype)
        q = np.round(images.astype(np.float32) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(dtype)

    def _finish(self, out):
        scale, zero_point = self._output["quantization"]
        if np.issubdtype(out.dtype, np.integer) and scale:
            return (out.astype(np.float32) - zero_point) * scale
        return out.astype(np.float32)

    def run_batch(self, images):
        """One invocation on a whole (uint8) batch; returns float32 probabilities."""
        self._resize(len(images))
        self._interpreter.set_tensor(self._input["index"], self._prepare(images))
        self._interpreter.invoke()
        return self._finish(self._interpreter.get_tensor(self._output["index"]))


class SavedModelClassifier(_Classifier):
    """Runs the ``serving_default`` signature of an exported SavedModel on uint8 images."""

    def __init__(self, path, batch_size=256):
        import tensorflow as tf

        _check_int("batch_size", batch_size, 1)
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ExportError(f"{path!r} is not a SavedModel: expected a directory holding "
                              "saved_model.pb")
        try:
            self._loaded = tf.saved_model.load(path)
        except Exception as e:  # noqa: BLE001 - TF raises many types for a bad model
            raise ExportError(f"cannot load SavedModel {path!r} ({type(e).__name__}: "
                              f"{_one_line(e)}): expected one written by "
                              "bonsai_tf.export") from None
        fn = self._loaded.signatures.get(SIGNATURE)
        specs = fn.structured_input_signature[1] if fn is not None else {}
        outputs = fn.structured_outputs if fn is not None else {}
        if len(specs) != 1 or "probabilities" not in outputs:
            raise ExportError(f"SavedModel {path!r} has signatures "
                              f"{sorted(self._loaded.signatures)}: "
                              f"expected {SIGNATURE!r} with one image input and a "
                              "'probabilities' output")
        (self._input_name, spec), = specs.items()
        if len(spec.shape) != 4 or None in spec.shape[1:]:
            raise ExportError(f"SavedModel {path!r} takes {self._input_name!r} of shape "
                              f"{spec.shape}: expected [batch, H, W, C]")
        self._fn, self._dtype = fn, spec.dtype
        self.image_shape = tuple(int(v) for v in spec.shape[1:])
        self.num_classes = int(outputs["probabilities"].shape[-1])
        self.input_dtype = spec.dtype.name
        self.batch_size = batch_size

    def run_batch(self, images):
        import tensorflow as tf

        out = self._fn(**{self._input_name: tf.cast(tf.constant(images), self._dtype)})
        return out["probabilities"].numpy()


def load_classifier(path, num_threads=None, batch_size=256):
    """A TFLiteClassifier for a .tflite file, a SavedModelClassifier for a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return SavedModelClassifier(path, batch_size=batch_size)
    if os.path.isfile(path):
        return TFLiteClassifier(path, num_threads=num_threads, batch_size=batch_size)
    raise ExportError(f"model {path!r} does not exist: expected a .tflite file or a "
                      "SavedModel directory")


def keras_probabilities(model, images, batch_size=256):
    """Softmax of the model's (first) logits for uint8 images, batch by batch."""
    import tensorflow as tf

    images = np.asarray(images)
    shape = tuple(images.shape[1:])
    fn = tf.function(lambda x: tf.nn.softmax(model_logits(model, x)),
                     input_signature=[tf.TensorSpec([None, *shape], tf.float32)])
    out = np.empty((len(images), model.outputs[0].shape[-1]), np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32)
        out[start:start + batch_size] = fn(batch).numpy()
    return out


def find_class_names(model_path):
    """Class names from the dataset.json beside a model (or above a SavedModel dir), else None."""
    model_path = os.path.abspath(os.fspath(model_path))
    base = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    for directory in (base, os.path.dirname(base)):
        path = os.path.join(directory, DATASET_FILE)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    names = json.load(f).get("class_names")
            except (OSError, ValueError, AttributeError):
                return None
            return [str(n) for n in names] if isinstance(names, list) else None
    return None


def read_image(path):
    """Decodes an image file fully; ExportError if it cannot be read as an image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now so that a truncated file fails here
            return im.copy()
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not an image"
        raise ExportError(f"cannot read image {os.fspath(path)!r} ({type(e).__name__}: "
                          f"{_one_line(e)}): expected a PNG, JPEG or other image PIL "
                          "reads") from None


def image_to_array(image, image_shape):
    """A PIL image as uint8 [H, W, C] for a model taking `image_shape` (H, W, C).

    Converted to grey or RGB as the model needs (alpha dropped, as data.load_dataset
    does for folder data sets) and resized bilinearly if its size differs.
    """
    from PIL import Image

    height, width, channels = image_shape
    if channels == 1:
        image = image.convert("L")
    elif channels == 3:
        image = image.convert("RGB")
    else:
        raise ExportError(f"model takes {channels} channels: expected 1 (grey) or 3 (RGB) "
                          "to convert images for it")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8).reshape(height, width, channels)


# --------------------------------------------------------------------------- helpers

def _reload_splits(run_dir):
    from bonsai_tf import data as data_lib

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"run_dir {run_dir!r} has no {CONFIG_FILE}: expected the run's "
                          "configuration to reload its data set (or pass splits=)")
    config = rd.read_json(path)
    if not isinstance(config, dict) or not config.get("dataset"):
        raise ExportError(f"{path} names no dataset: expected a RunConfig with 'dataset'")
    image_size = config.get("image_size") or None
    return data_lib.load_dataset(
        config["dataset"], config.get("data_dir") or None,
        val_size=int(config.get("val_size", 5000)), seed=int(config.get("seed", 0)),
        image_size=tuple(image_size) if image_size else None)


def _check_splits(splits, image_shape, num_classes):
    for split in ("train", "test"):
        x, y = getattr(splits, split)
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != image_shape:
            raise ExportError(f"{split} images are {x.dtype} {x.shape}: expected uint8 "
                              f"[N, {', '.join(map(str, image_shape))}] like the model's input")
        if y.shape != (len(x),):
            raise ExportError(f"{split} labels have shape {y.shape}: expected ({len(x)},)")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ExportError(f"{split} labels span [{y.min()}, {y.max()}]: expected "
                              f"[0, {num_classes})")
    if len(splits.train[0]) == 0:
        raise ExportError("the train split is empty: expected training images to calibrate "
                          "the int8 model")
    if len(splits.test[0]) == 0:
        raise ExportError("the test split is empty: expected test images to evaluate the "
                          "exported models")


def _check_images(images, image_shape):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != image_shape:
        raise ExportError(f"images are {images.dtype} {images.shape}: expected uint8 "
                          f"[N, {', '.join(map(str, image_shape))}]")
    return images


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ExportError(f"{name}={value!r}: expected an integer >= {minimum}")


def _accuracy(probabilities, labels):
    return float(np.mean(np.argmax(probabilities, -1) == np.asarray(labels)))


def _agreement(probabilities, reference, labels):
    return {"accuracy": _accuracy(probabilities, labels),
            "max_abs_diff": float(np.max(np.abs(probabilities - reference))),
            "top1_agreement": float(np.mean(np.argmax(probabilities, -1)
                                            == np.argmax(reference, -1)))}


def _save_dir_atomically(write, path):
    """Writes a directory via write(tmp_dir) and renames it over `path`.

    A directory cannot replace a non-empty one in a single rename, so the old one is
    moved aside first: a crash in between leaves no `path` (and no export.json, which
    is written last), never a half-written one.
    """
    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{base}-")
    old = None
    try:
        write(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".old-{base}-")
            os.rmdir(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
    except OSError as e:
        raise rd.RunDirError(f"cannot write {path}: {e.strerror or e}; expected a writable "
                             "directory with free space") from None
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.exists(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


def _remove_leftovers(directory):
    # What a killed export left: temporary SavedModel dirs that nothing will ever rename.
    for name in os.listdir(directory):
        if name.startswith((f".tmp-{SAVED_MODEL_DIR}-", f".old-{SAVED_MODEL_DIR}-")):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def tree_size(path):
    """Total bytes of the files under a directory (a SavedModel's size)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def sha256_file(path):
    """Hex SHA-256 of a file: export.json ties the artifacts to the model.keras they came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _asdict(info):
    import dataclasses

    return dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(info)


def _one_line(e):
    return " ".join(str(e).split())
