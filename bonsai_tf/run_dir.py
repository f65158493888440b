"""The run directory: atomic files, checkpoints and the metrics log.

Everything is written to a temporary file in the same directory, flushed and
fsync'ed, then renamed over the target, so a kill at any moment leaves either
the old or the new file, never a torn one. Checkpoints keep the previous good
one until the new one is complete.
"""

import io
import json
import os
import tempfile
import zipfile

import numpy as np


FAULT_ENV = "BONSAI_TF_FAULT"


def fault_point(name):
    """Kills the process here (SIGKILL) when $BONSAI_TF_FAULT names this point.

    Fault injection for the crash/resume tests: a kill at a named moment (mid-epoch,
    growth, checkpoint write, ...) is the only way to test those moments repeatably.
    """
    if os.environ.get(FAULT_ENV) == name:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


# Every name a run writes in its directory (what --overwrite may remove).
RUN_FILES = ("config.json", "dataset.json", "genotype.json", "metrics.jsonl", "metrics.json",
             "checkpoint", "checkpoint.old", "checkpoint.new", "tensorboard", "model.keras",
             "report.md", "saved_model", "model.tflite", "model_int8.tflite", "export.json",
             "log.txt", "plan.json", "accuracy.png", "compression.png", "params.png",
             "memory.png", "alphas.png")


def remove_run_files(run_dir):
    """Removes what a run wrote in `run_dir` (RUN_FILES, cell drawings), nothing else."""
    import shutil
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name in RUN_FILES or (name.startswith("cell_") and name.endswith(".png")):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


class RunDirError(RuntimeError):
    """The run directory cannot be used (unwritable, full, corrupt or foreign)."""


def atomic_write(path, data, mode="w"):
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb" if "b" in mode else "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {e.strerror or e}; expected a writable directory "
                          f"with free space") from None


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (tuple, set)):
        return list(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is corrupt ({e}); expected a JSON file") from None


def write_metrics(path, records):
    """Rewrites the whole metrics log atomically (it is small: one line an epoch)."""
    atomic_write(path, "".join(json.dumps(r, sort_keys=True, default=_jsonable) + "\n"
                               for r in records))


def read_metrics(path):
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise RunDirError(f"{path} line {n} is corrupt; expected one JSON object per "
                                      f"line") from None
    return out


CKPT = "checkpoint"


def save_checkpoint(run_dir, arrays, state):
    """Writes checkpoint/{weights.npz,state.json} as one unit.

    The new checkpoint is assembled in checkpoint.new/, the old one is moved to
    checkpoint.old/ and removed only after the new one has been renamed in place.
    """
    new = os.path.join(run_dir, CKPT + ".new")
    cur = os.path.join(run_dir, CKPT)
    old = os.path.join(run_dir, CKPT + ".old")
    try:
        _rmtree(new)
        os.makedirs(new)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(os.path.join(new, "weights.npz"), buf.getvalue(), mode="wb")
        # state.json last: its presence marks a complete checkpoint.
        write_json(os.path.join(new, "state.json"), state)
        _fsync_dir(new)
        fault_point("checkpoint")
        if os.path.exists(cur):
            _rmtree(old)
            os.replace(cur, old)
        fault_point("checkpoint_swap")
        os.replace(new, cur)
        _fsync_dir(run_dir)
        _rmtree(old)
    except OSError as e:
        raise RunDirError(f"cannot write checkpoint in {run_dir}: {e.strerror or e}") from None


def load_checkpoint(run_dir):
    """Returns (arrays, state) of the newest complete checkpoint, or None."""
    for name in (CKPT, CKPT + ".old"):
        d = os.path.join(run_dir, name)
        if os.path.exists(os.path.join(d, "state.json")):
            try:
                state = read_json(os.path.join(d, "state.json"))
                with np.load(os.path.join(d, "weights.npz")) as z:
                    arrays = {k: z[k] for k in z.files}
                return arrays, state
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, RunDirError) as e:
                raise RunDirError(f"checkpoint {d} is corrupt ({e}); expected a complete "
                                  f"checkpoint: remove {d} to start over or pass --overwrite") from None
    return None


def _rmtree(path):
    import shutil
    if os.path.exists(path):
        shutil.rmtree(path)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
