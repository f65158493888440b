"""Paired found-vs-random statistics (comparison.paired_differences) and their pooling over
comparisons of other seeds (bench/pool_compare.py), on compare.py runs with faked sub-runs."""

import json
import os

import pytest

from bonsai_tf import comparison as cmp
from bonsai_tf import run_dir as rd
from helpers import load_script
from compare_fixtures import RUNS, compare_argv, flagfile, load_compare  # noqa: F401
from test_compare import FakeScripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pool():
    return load_script("pool_compare", os.path.join(ROOT, "bench", "pool_compare.py"))


def test_t95_matches_the_table_and_its_large_sample_limit():
    assert cmp.t95(1) == 12.706 and cmp.t95(2) == 4.303 and cmp.t95(30) == 2.042
    assert cmp.t95(40) == pytest.approx(2.021, abs=0.004)
    assert cmp.t95(120) == pytest.approx(1.980, abs=0.002)
    assert [cmp.t95(df) for df in range(1, 200)] == sorted(
        (cmp.t95(df) for df in range(1, 200)), reverse=True)
    with pytest.raises(ValueError, match="df=0"):
        cmp.t95(0)


def test_paired_differences_pair_by_seed_and_bound_the_mean():
    found = {0: 0.92, 1: 0.921, 2: 0.919, 3: None}
    random = {0: 0.90, 1: 0.90, 2: 0.90, 3: 0.95, 4: 0.99}
    p = cmp.paired_differences(found, random)
    assert p["seeds"] == [0, 1, 2] and p["n"] == 3 and p["wins"] == 3
    assert p["differences"] == pytest.approx([0.02, 0.021, 0.019])
    assert p["mean"] == pytest.approx(0.02) and p["std"] == pytest.approx(0.001)
    half = 4.303 * 0.001 / 3 ** 0.5
    assert p["ci95"] == pytest.approx([0.02 - half, 0.02 + half])
    assert p["verdict"] == "gains"
    assert "+2.00 points over 3 seed(s), found higher for 3" in cmp.paired_line(p)
    across = cmp.paired_differences({0: 0.92, 1: 0.89}, {0: 0.90, 1: 0.90})
    assert across["verdict"] == "cannot tell" and across["wins"] == 1
    assert cmp.paired_differences({0: 0.88, 1: 0.881, 2: 0.879},
                                  {0: 0.90, 1: 0.90, 2: 0.90})["verdict"] == "loses"
    one = cmp.paired_differences({0: 0.9}, {0: 0.8})
    assert one["verdict"] == "undetermined" and one["ci95"] is None
    assert "no interval" in cmp.paired_line(one)
    assert cmp.paired_line(cmp.paired_differences({}, {})).startswith("no seed")


def _comparison(flagfile, out, *extra):
    compare = load_compare()
    assert compare.main(compare_argv(flagfile, out, "--strategies=bonsai", *extra),
                        launcher=FakeScripts()) == 0
    return rd.read_json(os.path.join(out, "compare.json"))


def test_compare_reports_the_paired_differences(flagfile, tmp_path):
    state = _comparison(flagfile, str(tmp_path / "a"), "--seeds=2")
    p = state["verdicts"][0]["paired"]
    # The fake found networks score 0.90 + 0.01 seed, their random ones 0.80 + 0.01 seed.
    assert p["seeds"] == [0, 1] and p["mean"] == pytest.approx(0.10)
    assert p["verdict"] == "gains"
    md = open(tmp_path / "a" / "compare.md").read()
    assert "Paired by seed, found - random: +10.00 points over 2 seed(s)" in md
    assert "seeds 0..1" in md


def test_pool_adds_the_pairs_of_comparisons_of_other_seeds(flagfile, tmp_path, capsys):
    pool = load_pool()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _comparison(flagfile, a, "--seeds=2")
    _comparison(flagfile, b, "--seeds=2", "--first_seed=2")
    out = str(tmp_path / "pooled")
    assert pool.main(["pool_compare.py", a, b, f"--output_dir={out}"]) == 0
    result = json.load(open(os.path.join(out, "pool.json")))
    p = result["strategies"]["bonsai"]["paired"]
    assert p["n"] == 4 and p["seeds"] == [0, 1, 2, 3] and p["verdict"] == "gains"
    assert [c["seeds"] for c in result["comparisons"]] == [[0, 1], [2, 3]]
    md = open(os.path.join(out, "pool.md")).read()
    assert md == capsys.readouterr().out
    assert "| `b` | 3 | 93.00% | 83.00% | +10.00 |" in md
    assert "+10.00 points over 4 seed(s)" in md


def test_pool_refuses_what_would_not_measure_one_thing(flagfile, tmp_path, capsys):
    pool = load_pool()
    a, c = str(tmp_path / "a"), str(tmp_path / "c")
    _comparison(flagfile, a, "--seeds=2")
    _comparison(flagfile, c, "--seeds=1", "--first_seed=5", "--minutes=45")

    def refused(*argv):
        capsys.readouterr()     # what the comparisons logged
        assert pool.main(["pool_compare.py", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err
    assert "differs in: time_budget_minutes" in refused(a, c)
    assert "seed 0 is in both" in refused(a, a)
    assert "no compare.json" in refused(a, str(tmp_path))
    assert "no comparison given" in refused()
    # The same settings but sub-runs resolved otherwise (another version of the code).
    d = str(tmp_path / "d")
    _comparison(flagfile, d, "--seeds=1", "--first_seed=7")
    cfg = {"lr_max": 0.05, "seed": 7, "output_dir": "x"}
    rd.write_json(os.path.join(a, "search-bonsai-s0", "config.json"), dict(cfg, seed=0))
    rd.write_json(os.path.join(d, "search-bonsai-s7", "config.json"), dict(cfg, lr_max=0.1))
    assert "differs in: search-bonsai.lr_max" in refused(a, d)
    # A field that one comparison's sub-runs predate reads as its default: at the
    # default it is the same run, set otherwise it differs.
    rd.write_json(os.path.join(d, "search-bonsai-s7", "config.json"),
                  dict(cfg, final_with_val=False))
    capsys.readouterr()
    assert pool.main(["pool_compare.py", a, d]) == 0
    rd.write_json(os.path.join(d, "search-bonsai-s7", "config.json"),
                  dict(cfg, final_with_val=True))
    assert "differs in: search-bonsai.final_with_val" in refused(a, d)
    rd.write_json(os.path.join(d, "search-bonsai-s7", "config.json"), cfg)
    # Planned epochs and their length (compare.py plans in steps) may differ, as the
    # same budget buys other counts on other machines; anything else in them may not.
    for run, planned in ((os.path.join(a, "retrain-bonsai-s0"), {"epochs": 6}),
                         (os.path.join(d, "retrain-bonsai-s7"),
                          {"epochs": 7, "steps_per_epoch": 3})):
        rd.write_json(os.path.join(run, "config.json"), dict(cfg, **planned))
    capsys.readouterr()
    assert pool.main(["pool_compare.py", a, d]) == 0
    rd.write_json(os.path.join(d, "retrain-bonsai-s7", "config.json"),
                  dict(cfg, epochs=7, steps_per_epoch=3, lr_max=0.1))
    assert "differs in: retrain-bonsai.lr_max" in refused(a, d)
    # Repeated seeds only when asked, and then said.
    capsys.readouterr()
    assert pool.main(["pool_compare.py", a, a, "--allow_repeated_seeds"]) == 0
    out = capsys.readouterr().out
    assert "+10.00 points over 4 seed(s)" in out and "not independent" in out


def test_pool_compare_runs_as_a_script(flagfile, tmp_path):
    """As the README types it: the script's own entry point, its help and a bad flag."""
    import subprocess
    import sys
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _comparison(flagfile, a, "--seeds=2")
    _comparison(flagfile, b, "--seeds=2", "--first_seed=2")
    script = os.path.join(ROOT, "bench", "pool_compare.py")

    def run(*args):
        return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                              timeout=300)
    done = run(a, b)
    assert done.returncode == 0, done.stderr
    assert "+10.00 points over 4 seed(s)" in done.stdout
    helped = run("--help")
    assert helped.returncode == 0 and "--allow_repeated_seeds" in helped.stdout
    bad = run("--nosuch", a)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
