"""The entry scripts: bad input gives one line on stderr, exit status 2, nothing lost."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = os.path.join(ROOT, "train", "search.py")
TRAIN = os.path.join(ROOT, "train", "train.py")


def run(script, *args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def assert_usage_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["--dataset=not_a_dataset"], ["not_a_dataset"]),
    (["--dataset=folder:/no/such/folder"], ["/no/such/folder"]),
    (["--patterns=[[\"n\"],"], ["--patterns", "expected"]),
    (["--patterns=[[\"q\"]]"], ["unknown cell code 'q'"]),
    (["--flagfile=/no/such.flags"], ["/no/such.flags"]),
    (["--scale=0"], ["scale = 0", "expected >= 1"]),
    (["--batch_size=many"], ["batch_size"]),
    (["--drop_path=1.5"], ["drop_path = 1.5", "[0, 1)"]),
    (["--strategy=fixed"], ["genotype"]),
    (["--memory_budget_mb=0.5", "--dataset=fashion_mnist", "--val_size=100"],
     ["too small for one pattern", "0.5"]),
    (["--strategy=spider", "--reductions=5", "--dataset=fashion_mnist", "--val_size=100"],
     ["too small for 5 reductions", "fewer --reductions"]),
    (["--strategy=spider", "--memory_budget_mb=0.5", "--dataset=fashion_mnist",
      "--val_size=100"], ["too small for SpiderNet's starting network", "0.5"]),
    (["--fashion_mnist"], ["fashion_mnist"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, fragments):
    out = tmp_path / "run"
    proc = run(SEARCH, f"--output_dir={out}", "--verbose=0", *args)
    assert_usage_error(proc, *fragments)


def test_missing_data_files_are_named(tmp_path):
    proc = run(SEARCH, f"--output_dir={tmp_path / 'run'}", f"--data_dir={tmp_path}",
               "--dataset=cifar10")
    assert_usage_error(proc, str(tmp_path))


def test_foreign_run_directory_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    config = {"dataset": "fashion_mnist", "scale": 99}
    (out / "config.json").write_text(json.dumps(config))
    (out / "genotype.json").write_text("{}")
    proc = run(SEARCH, f"--output_dir={out}", "--scale=8")
    assert_usage_error(proc, "different configuration", "--overwrite")
    assert json.loads((out / "config.json").read_text()) == config
    assert (out / "genotype.json").read_text() == "{}"


def test_non_run_directory_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = run(SEARCH, f"--output_dir={tmp_path}")
    assert_usage_error(proc, "not a bonsai-tf run directory")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_bad_genotype_for_train(tmp_path):
    g = tmp_path / "g.json"
    g.write_text('{"format": "bonsai-tf/genotype", "version": 1')
    proc = run(TRAIN, f"--genotype={g}", f"--output_dir={tmp_path / 'run'}")
    assert_usage_error(proc, "g.json", "not valid JSON")


# ---- flag precedence, help, logging and noise (issue 15) -------------------------------
def test_explicit_flags_win_over_flagfiles_wherever_they_stand(tmp_path):
    from absl import flags

    from bonsai_tf import cli
    fv = flags.FlagValues()
    flags.DEFINE_enum("strategy", "bonsai", ["bonsai", "random", "fixed"], "", flag_values=fv)
    flags.DEFINE_integer("epochs", 600, "", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "", flag_values=fv)
    first, second = tmp_path / "a.flags", tmp_path / "b.flags"
    first.write_text("--strategy=bonsai\n--epochs=18\n--seed=1\n")
    second.write_text("--seed=2\n")
    argv = ["train.py", "--strategy=random", "--epochs=2", f"--flagfile={first}",
            "--flagfile", str(second)]
    ordered = cli.flagfiles_first(argv)
    assert ordered == ["train.py", f"--flagfile={first}", "--flagfile", str(second),
                       "--strategy=random", "--epochs=2"]
    fv(ordered)
    assert (fv.strategy, fv.epochs, fv.seed) == ("random", 2, 2)  # a later flagfile still wins
    # train.py's implied --strategy=fixed beats the flagfile's bonsai, not the user's random.
    assert cli.flagfiles_first(["t", f"--flagfile={first}"], ["--strategy=fixed"]) == [
        "t", f"--flagfile={first}", "--strategy=fixed"]
    assert cli.flagfiles_first(argv, ["--strategy=fixed"])[3:5] == [str(second),
                                                                    "--strategy=fixed"]
    # Arguments after '--' are left where they are.
    assert cli.flagfiles_first(["s", "--", "--flagfile=x"]) == ["s", "--", "--flagfile=x"]


HELP_CODE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("EXIT", e.code, "tensorflow" in sys.modules)
"""


@pytest.mark.parametrize("script", [SEARCH, TRAIN], ids=["search", "train"])
@pytest.mark.parametrize("flag", ["--help", "-h", "--helpshort", "--helpfull"])
def test_help_prints_the_flags_and_exits_0(script, flag):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", HELP_CODE, script, flag], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Unknown command line flag" not in proc.stderr and "error" not in proc.stderr
    assert "--strategy" in proc.stdout and "--val_size" in proc.stdout, proc.stdout[-2000:]
    assert ("--undefok" in proc.stdout) == (flag == "--helpfull")  # every flag
    # Printed before TensorFlow is imported: help is instant.
    assert proc.stdout.strip().endswith("EXIT 0 False"), proc.stdout[-300:]


def test_train_refuses_strategy_bonsai():
    proc = run(TRAIN, "--strategy=bonsai", "--genotype=g.json")
    assert_usage_error(proc, "--strategy=bonsai", "expected fixed or random")


def test_logging_setup_prints_each_line_once(tmp_path):
    import io
    import logging

    from bonsai_tf import cli
    name = "bonsai_tf_test_logging"
    stream, root_stream = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    # What absl's logging does on TensorFlow's first message (saving a SavedModel):
    # logging.basicConfig(), a handler on the root logger.
    root_handler = logging.StreamHandler(root_stream)
    root.addHandler(root_handler)
    try:
        cli.setup_logging(name, stream=stream)
        log = cli.setup_logging(name, str(tmp_path / "log.txt"), stream=stream)
        log = cli.setup_logging(name, str(tmp_path / "log.txt"), stream=stream)
        log.info("test accuracy %.4f", 0.5)
    finally:
        root.removeHandler(root_handler)
        for h in list(logging.getLogger(name).handlers):
            logging.getLogger(name).removeHandler(h)
            h.close()
    assert stream.getvalue().count("test accuracy 0.5000") == 1, stream.getvalue()
    assert root_stream.getvalue() == ""
    assert (tmp_path / "log.txt").read_text().count("test accuracy 0.5000") == 1


def test_progress_bar_is_one_line_per_epoch_when_not_a_terminal():
    import io

    from bonsai_tf import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert cli.progress_verbosity(1, io.StringIO()) == 2
    assert cli.progress_verbosity(1, Terminal()) == 1
    assert cli.progress_verbosity(0, io.StringIO()) == 0
    assert cli.progress_verbosity(2, Terminal()) == 2


def test_converter_noise_is_dropped_and_errors_pass(capfd):
    from bonsai_tf import cli
    with cli.dropping_stderr_lines(cli.EXPORT_NOISE):
        os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8\n")
        os.write(2, b"E0000 real error\n")
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nno newline")
    os.write(2, b"\nafter\n")
    assert capfd.readouterr().err == "E0000 real error\nno newline\nafter\n"


def test_a_run_made_before_a_field_existed_resumes_at_its_default(tmp_path):
    """config.json of an older version lacks fields added since: they read as their
    defaults (the behaviour the run had), not as a different configuration."""
    out = tmp_path / "run"
    code = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, "train")!r})
import runner
from bonsai_tf import config, run_dir as rd
out = {str(out)!r}
older = config.RunConfig(measure_memory=False).to_dict()
del older["final_with_val"], older["settle_epochs"]
rd.write_json(out + "/config.json", older)
print(runner.prepare_run_dir(config.RunConfig(measure_memory=False), out, False))
print(sorted(rd.read_json(out + "/config.json")) == sorted(config.RunConfig().to_dict()))
try:
    runner.prepare_run_dir(config.RunConfig(measure_memory=False, final_with_val=True), out,
                           False)
except runner.UsageError as e:
    print("refused:", e)
"""
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["resume", "True"]     # and config.json now names every field
    assert lines[2].startswith("refused: ") and "differs in: final_with_val" in lines[2]


def test_resumed_run_records_its_non_identity_flags(tmp_path):
    """config.json (what the report shows) follows --nomeasure_memory on resuming."""
    out = tmp_path / "run"
    code = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, "train")!r})
import runner
from bonsai_tf import config, report, run_dir as rd
out = {str(out)!r}
rd.write_json(out + "/config.json", config.RunConfig(measure_memory=True).to_dict())
status = runner.prepare_run_dir(config.RunConfig(measure_memory=False), out, False)
print(status, rd.read_json(out + "/config.json")["measure_memory"])
print('"measure_memory": false' in open(report.write_report(out)).read())
"""
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["resume", "False", "True"]


@pytest.mark.slow
def test_retraining_takes_the_command_line_over_the_flagfile(tmp_path):
    """train.py --strategy=random ... --flagfile=F: F's bonsai, search_epochs and epochs
    yield to the command line (README's random baseline, with a shorter --epochs)."""
    from bonsai_tf import genotype as G
    from helpers import make_folder
    data = make_folder(tmp_path / "data")
    genotype = tmp_path / "g.json"
    genotype.write_text(G.initial("small", (12, 12, 1), 3, 4, 1, [["n"], ["r"]], 1).to_json())
    flagfile = tmp_path / "search.flags"
    flagfile.write_text("\n".join([
        f"--dataset=folder:{data}", "--strategy=bonsai", "--space=small", "--scale=4",
        "--nodes=1", '--patterns=[["n"],["r"]]', "--epochs=5", "--search_epochs=4",
        "--batch_size=16", "--val_size=0.2", "--memory_budget_mb=0", "--seed=3"]) + "\n")
    out = tmp_path / "run"
    proc = run(TRAIN, "--strategy=random", f"--genotype={genotype}", "--epochs=1",
               f"--output_dir={out}", "--noexport", "--verbose=1", "--nomeasure_memory",
               f"--flagfile={flagfile}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["strategy"], config["epochs"], config["search_epochs"]) == ("random", 1, 0)
    assert config["val_size"] == 0.2
    log = (out / "log.txt").read_text()
    assert "77 training, 19 validation" in log  # 96 after the folder's test split; 20% of it
    assert f"data read from image folder {data}" in log
    # stdout is a pipe: one progress line for the one epoch, no redrawing.
    assert "\b" not in proc.stdout and "\r" not in proc.stdout
    assert len([l for l in proc.stdout.splitlines() if "/step" in l]) == 1, proc.stdout
    assert proc.stderr.count("test accuracy") == 1
