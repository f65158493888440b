"""What the tests of bench/compare.py share: the script loaded as a module, a tiny
flagfile, the command line and the sub-runs it makes."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(ROOT, "bench", "compare.py")


def load_compare():
    if "compare_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("compare_script", COMPARE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["compare_script"] = module
        spec.loader.exec_module(module)
    return sys.modules["compare_script"]


@pytest.fixture
def flagfile(tmp_path):
    path = tmp_path / "tiny.flags"
    path.write_text("--dataset=folder:/nowhere\n--space=small\n--scale=4\n--nodes=1\n"
                    "--patterns=[[\"n\"],[\"r\"]]\n--batch_size=16\n--val_size=20\n"
                    "--time_budget_minutes=20\n--output_dir=runs/ignored\n")
    return str(path)


def compare_argv(flagfile, out, *extra):
    return ["compare.py", f"--flagfile={flagfile}", "--strategies=bonsai,asap", "--seeds=2",
            "--minutes=30", f"--output_dir={out}", "--final_subset=64", *extra]


RUNS = ["search-bonsai-s0", "search-asap-s0", "search-bonsai-s1", "search-asap-s1", "tuner",
        "retrain-bonsai-s0", "random-bonsai-s0", "retrain-asap-s0", "random-asap-s0",
        "retrain-bonsai-s1", "random-bonsai-s1", "retrain-asap-s1", "random-asap-s1",
        "retrain-tuner", "retrain-cnn"]
