"""Classifies image files with an exported model (.tflite or SavedModel directory).

  python export/predict.py --model=runs/fmnist_bonsai_s0/model_int8.tflite shoe.png bag.jpg

Prints one line per image, tab-separated: path, label, probability.  The label is
the class name from the dataset.json beside the model (for a SavedModel directory:
inside it or in its parent, the run directory), else the class index.  Images are
converted to the model's channels (grey or RGB) and resized to its height and width.
Bad input (missing model, unreadable image) prints one line ``error: ...`` and exits
with status 2.
"""

import os
import sys

# Runnable as `python export/predict.py` from the repository root without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from bonsai_tf import cli  # noqa: E402
from bonsai_tf import export as export_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A .tflite file or a SavedModel directory written by "
                    "export/export.py.")
flags.DEFINE_integer("num_threads", 0, "TFLite interpreter threads; 0 = all cores.")



def main(argv):
    """Classifies the images named in argv[1:]; returns the exit status (0, or 2).

    Callable directly as main(["predict.py", "--model=M", "a.png"]) as well as through
    app.run.
    """
    import numpy as np

    argv, status = cli.parse_argv(FLAGS, argv, positional=True)
    if status is not None:
        return status
    paths = argv[1:]
    if not FLAGS.model:
        return cli.error("no --model given: expected --model=PATH, a .tflite file or a "
                      "SavedModel directory")
    if not paths:
        return cli.error("no images given: expected one or more image files after the flags")
    if not os.path.exists(FLAGS.model):
        return cli.error(f"model {FLAGS.model!r} does not exist: expected a .tflite file or a "
                      "SavedModel directory")
    try:
        # Images are decoded before the model loads so that a bad file is reported alone.
        images = [export_lib.read_image(p) for p in paths]
        model = export_lib.load_classifier(FLAGS.model, num_threads=FLAGS.num_threads or None)
        batch = np.stack([export_lib.image_to_array(im, model.image_shape) for im in images])
        probabilities = model(batch)
    except export_lib.ExportError as e:
        return cli.error(e)
    names = export_lib.find_class_names(FLAGS.model)
    if names is not None and len(names) != model.num_classes:
        names = None  # a dataset.json of another model: indices are at least not wrong
    for path, p in zip(paths, probabilities):
        k = int(np.argmax(p))
        print(f"{path}\t{names[k] if names else k}\t{p[k]:.4f}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(FLAGS))
