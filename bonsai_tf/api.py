"""The Python entry point: search on images in memory, as `tuner.search(x, y)` does.

    import bonsai_tf
    result = bonsai_tf.search(x_train, y_train, x_test, y_test, minutes=20)
    result.model.predict(images)          # a plain Keras model: raw pixels in, logits out
    result.genotype.to_json()             # the found architecture
    result.metrics["test_accuracy"]

It runs what `train/search.py` runs (search, final training, report, exports) in a
run directory, with the CPU-friendly settings of train/configs/fmnist_quick.flags
(QUICK) unless keyword arguments say otherwise; any RunConfig field can be given.
"""

import dataclasses
import json
import os
import tempfile
import time

from bonsai_tf import config as config_lib
from bonsai_tf import run_dir as rd

# train/configs/fmnist_quick.flags as keyword values (tests/test_api.py keeps the two
# in step): a search that fits 2 CPU cores.
QUICK = dict(space="small", scale=16, nodes=2, patterns=(("n",), ("r",)), max_patterns=3,
             train_subset=8000, final_subset=0, batch_size=64, lr_max=0.05, gate_lr=0.05,
             weight_decay=3e-4, drop_path=0.0, aux_weight=0.0, label_smoothing=0.1,
             lambda_edge=0.5, lambda_input=0.5, prune_interval=1, cycle_len=2, settle_epochs=3,
             memory_budget_mb=115.0, search_fraction=0.3)


@dataclasses.dataclass
class SearchResult:
    model: object        # keras.Model of built-in layers: raw pixels in, logits out
    genotype: object     # genotype.Genotype of the found network
    metrics: dict        # metrics.json: test_accuracy, params, search_seconds, ...
    run_dir: str         # everything the run wrote: report.md, exports, checkpoints


def search(x, y, x_test=None, y_test=None, *, minutes=20.0, budget_mb=None, strategy="bonsai",
           output_dir=None, class_names=None, val_size=0.1, export=True, verbose=1, seed=0,
           overwrite=False, **config):
    """Searches an architecture for images `x` with labels `y` and trains it.

    x: [N, H, W] or [N, H, W, C] pixels 0..255; y: N integer labels. x_test, y_test:
      the test split reported at the end (default: a stratified 20% of x).
    minutes: the wall-clock budget of the whole search (0: count --epochs instead).
    budget_mb: the training-memory budget that growth fills (default QUICK's).
    output_dir: the run directory (default: a new temporary one); running again with
      the same arguments resumes it.
    config: any other RunConfig field (scale=..., space=..., epochs=...).
    Returns a SearchResult.
    """
    import keras
    from bonsai_tf import data as data_lib
    from bonsai_tf import engine
    from bonsai_tf import genotype as genotype_lib
    from bonsai_tf import machine
    from bonsai_tf import report
    started = time.time()
    splits = data_lib.from_arrays(x, y, x_test, y_test, val_size=val_size, seed=seed,
                                  class_names=class_names)
    values = {**QUICK, "strategy": strategy, "seed": seed, "time_budget_minutes": float(minutes),
              "val_size": val_size, "dataset": "arrays"}
    h, w = splits.info.image_shape[:2]
    values["stem_stride"] = 2 if min(h, w) >= 24 else 1  # small images keep their pixels
    if budget_mb is not None:
        values["memory_budget_mb"] = float(budget_mb)
    values.update(config)
    cfg = config_lib.RunConfig(**values)
    config_lib.pattern_cap(cfg, splits.info.image_shape)
    output_dir = output_dir or tempfile.mkdtemp(prefix="bonsai-search-")
    _claim(output_dir, cfg, overwrite)
    machine.configure_threads()
    if os.path.exists(os.path.join(output_dir, "metrics.json")):
        metrics = rd.read_json(os.path.join(output_dir, "metrics.json"))
    else:
        metrics = engine.Run(cfg, splits, output_dir, verbose=verbose, started=started).run()
    if export:
        from bonsai_tf import export as export_lib
        export_lib.export_run(output_dir, splits=splits)
    report.write_report(output_dir)
    model = keras.models.load_model(os.path.join(output_dir, engine.MODEL_FILE), compile=False)
    genotype = genotype_lib.Genotype.load(os.path.join(output_dir, "genotype.json"))
    return SearchResult(model=model, genotype=genotype, metrics=metrics, run_dir=output_dir)


def _claim(output_dir, cfg, overwrite):
    """Writes config.json, or checks a run directory made by the same arguments."""
    path = os.path.join(output_dir, "config.json")
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            old = json.load(f)
        if {k: v for k, v in old.items() if k not in cfg.NON_IDENTITY} != cfg.identity():
            raise rd.RunDirError(f"{output_dir} holds a run of other arguments; expected the "
                                 f"same arguments to resume it, or overwrite=True")
        return
    if os.path.isdir(output_dir) and set(os.listdir(output_dir)) - set(rd.RUN_FILES) \
            and not overwrite:
        raise rd.RunDirError(f"output_dir={output_dir} is not empty and holds no bonsai-tf run; "
                             f"expected a new or empty directory (or overwrite=True)")
    if overwrite:
        rd.remove_run_files(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    rd.write_json(path, cfg.to_dict())
