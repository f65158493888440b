"""A calibration figure: how fast this machine trains a fixed small Keras model.

    python bench/calibrate.py       # prints the machine's identity and its images/s

Machines of the same kind differ by 4x or more, so every benchmark here writes
this figure beside its own: figures from two machines compare as ratios to their
calibrations, never as absolute times. The workload is fixed forever (changing it
would break every comparison): a plain Keras CNN (3x3 convolutions 32 and 64
channels, max pooling, a dense classifier; about 110k parameters) trained with SGD
on random 28x28x1 images, batch 64, in a tf.function; the median of 5 timed rounds
of 20 steps, after a warm-up round.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bonsai_tf  # noqa: E402,F401  (before TensorFlow: its oneDNN default applies)
from bonsai_tf import machine  # noqa: E402

WORKLOAD = "keras-cnn-32-64 28x28x1 batch 64 sgd (bench/calibrate.py)"


def images_per_second(rounds=5, steps=20, batch=64):
    import numpy as np
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10),
    ])
    opt = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = tf.constant(np.random.RandomState(0).rand(batch, 28, 28, 1).astype(np.float32))
    y = tf.constant(np.arange(batch) % 10)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    def timed_round():
        t = time.perf_counter()
        for _ in range(steps):
            step()
        step().numpy()
        return time.perf_counter() - t
    timed_round()
    times = sorted(timed_round() for _ in range(rounds))
    return batch * (steps + 1) / times[len(times) // 2]


def describe():
    """Machine identity plus its calibration figure (JSON-able)."""
    import tensorflow as tf
    return {**machine.identity(), "tensorflow": tf.__version__,
            "threads_inter_intra": [tf.config.threading.get_inter_op_parallelism_threads(),
                                    tf.config.threading.get_intra_op_parallelism_threads()],
            "calibration_images_per_second": round(images_per_second(), 1),
            "calibration_workload": WORKLOAD}


if __name__ == "__main__":
    machine.configure_threads()
    print(json.dumps(describe(), indent=1))
