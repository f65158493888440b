"""Every command block of README.md runs as written (shortened by flags appended to it).

The README's shell blocks (```sh) are read from the file itself, so a command changed
there is what runs here. Each command runs in a scratch directory that sees the
repository's code (links) and writes its own runs/; flags appended to every training
command make it short and point it at a tiny generated dataset: what is tested is
that the command, as a user types it, works and writes what the README says it does.
Installing commands (scripts/*.sh) and the test command are CI's own business.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import make_folder

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# What makes a run short; appended last, so these win over the command's own flags.
SHORT_RUN = ["--time_budget_minutes=0", "--epochs=2", "--search_epochs=1", "--steps_per_epoch=2",
             "--scale=4", "--val_size=0.2", "--batch_size=16", "--train_subset=0",
             "--memory_budget_mb=0", "--max_patterns=1", "--verbose=0"]
SHORTEN = {
    "train/search.py": SHORT_RUN,
    "train/train.py": SHORT_RUN,
    "train/tune.py": ["--time_budget_minutes=0.3", "--scale=4", "--val_size=0.2",
                      "--batch_size=16", "--trial_epochs=1"],
    "export/export.py": [],
    "export/predict.py": [],
    "bench/calibrate.py": [],
}
NOT_RUN = ("bash scripts/", "source ",
           "tensorboard ", "pip ",
           # A comparison is minutes even on tiny data; tests/test_compare.py runs this
           # script end to end (every row, a kill and a resume) on generated images.
           "python bench/compare.py",
           # It reads finished comparisons; tests/test_pool_compare.py runs it on some.
           "python bench/pool_compare.py")


def readme_commands():
    """The commands of the README's ```sh blocks, continuation lines joined."""
    with open(README) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_readme_has_the_commands_this_test_knows():
    commands = readme_commands()
    assert any("train/search.py" in c for c in commands)
    for c in commands:
        if c.startswith(NOT_RUN):
            continue
        script = _script(c)
        assert script in SHORTEN, f"README command {c!r}: teach tests/test_readme.py to run it"


def _script(command):
    for word in shlex.split(command):
        if word.endswith(".py"):
            return word
    return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch copy of the repository's layout (code linked) with a tiny dataset."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("bonsai_tf", "train", "export", "bench", "tests"):
        os.symlink(os.path.join(ROOT, name), work / name)
    data = make_folder(work / "tiny", per_class=24)
    # An image file for predict.py, as a user would have one.
    from PIL import Image
    import numpy as np
    Image.fromarray(np.full((12, 12), 200, np.uint8)).save(work / "image.png")
    return work, data


def _run(command, work, data):
    argv = shlex.split(command)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    script = _script(command)
    extra = list(SHORTEN[script])
    if script in ("train/search.py", "train/train.py", "train/tune.py"):
        extra.append(f"--dataset=folder:{data}")
    argv = [a.replace("image.png", str(work / "image.png")) for a in argv] + extra
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(argv, cwd=work, capture_output=True, text=True, env=env, timeout=900)


def test_every_readme_command_runs_as_written(workdir):
    work, data = workdir
    ran = []
    for command in readme_commands():
        if command.startswith(NOT_RUN):
            continue
        proc = _run(command, work, data)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        ran.append(command)
        _check_claims(command, work, proc)
    assert len(ran) >= 5, ran


def _check_claims(command, work, proc):
    """What the README says each command writes."""
    argv = shlex.split(command)
    out = _flag(argv, "output_dir")
    script = _script(command)
    if script in ("train/search.py", "train/train.py"):
        run = work / (out or "runs")
        for name in ("config.json", "genotype.json", "metrics.json", "report.md", "model.keras"):
            assert (run / name).exists(), (command, name)
        import json
        cfg = json.loads((run / "config.json").read_text())
        # A strategy on the line wins; train.py ignores a flagfile's (it does not search).
        strategy = next((a.split("=", 1)[1] for a in argv if a.startswith("--strategy=")),
                        None)
        if strategy is None:
            strategy = "fixed" if script == "train/train.py" else _flag(argv, "strategy") or "bonsai"
        assert cfg["strategy"] == strategy, (command, cfg["strategy"])
    elif script == "export/export.py":
        run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--run_dir="))
        assert (work / run_dir / "export.json").exists()
    elif script == "export/predict.py":
        assert proc.stdout.strip(), command


def _flag(argv, name):
    """The value of --name as the command gives it: on its line, else in its --flagfile."""
    for a in reversed(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    for a in argv:
        if a.startswith("--flagfile="):
            with open(os.path.join(ROOT, a.split("=", 1)[1])) as f:
                for line in f:
                    if line.startswith(f"--{name}="):
                        return line.strip().split("=", 1)[1]
    return None
