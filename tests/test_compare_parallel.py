"""bench/compare.py --workers: the schedule arithmetic, and sub-runs handed out by a
KerasTuner chief to real worker processes (bench/compare_worker.py) over gRPC.

The sub-runs are tests/fake_subrun.py stand-ins (no TensorFlow, deterministic), so a
comparison run one sub-run at a time and one run by 2 workers must give the same
table, also when a worker is killed mid-job.
"""

import json
import os
import sys

import pytest

from bonsai_tf import comparison as cmp
from bonsai_tf import trial_queue
from compare_fixtures import RUNS, compare_argv, flagfile, load_compare  # noqa: F401  (fixture)

TESTS = os.path.dirname(os.path.abspath(__file__))
TIMING = ("retrain_seconds", "search_seconds", "total_seconds")


# ---- the schedule -----------------------------------------------------------------------------
def test_makespan_is_the_sum_on_one_worker_and_longest_first_on_more():
    assert cmp.makespan([3, 1, 1, 1], 1) == 6
    assert cmp.makespan([3, 1, 1, 1], 2) == 3      # 3 | 1+1+1
    assert cmp.makespan([2, 2, 3], 2) == 4         # 3 | 2+2, not 2+3
    assert cmp.makespan([5], 4) == 5
    with pytest.raises(ValueError):
        cmp.makespan([1], 0)


def test_split_budget_with_workers_lengthens_every_share_to_fill_the_search_side():
    one = cmp.split_budget(3600, 4, 3, 0.4)
    two = cmp.split_budget(3600, 4, 3, 0.4, workers=2)
    search_side = 0.4 * (3600 - one["reserve_seconds"])
    # 4 x 3 searches of one share, then a tuner of 3: 15 shares in turn; on two workers
    # the searches take 6 (6 | 6), then the tuner 3 more on one of them.
    assert one["search_run_seconds"] == pytest.approx(search_side / 15)
    assert two["search_run_seconds"] == pytest.approx(search_side / 9)
    assert two["tuner_seconds"] == pytest.approx(3 * two["search_run_seconds"])
    assert two["workers"] == 2 and any("2 at once" in w for w in two["why"])
    assert cmp.makespan([two["search_run_seconds"]] * 12, 2) + two["tuner_seconds"] == \
        pytest.approx(search_side)


def test_the_tuner_gets_what_the_costliest_strategys_searches_took_within_its_allowance():
    split = cmp.split_budget(3600, 2, 3, 0.4)
    allowance = split["tuner_seconds"]
    seconds, why = cmp.tuner_seconds_for(split, {"bonsai": [80.0, 90.0, 70.0],
                                                 "asap": [100.0, 110.0, 120.0]})
    assert seconds == pytest.approx(330.0) and seconds < allowance
    assert "asap's 3 searches took 330 s" in why
    # Searches that ran to their shares leave it its whole allowance, never more.
    full = [split["search_run_seconds"] + 30.0] * 3
    assert cmp.tuner_seconds_for(split, {"bonsai": full})[0] == pytest.approx(allowance)
    # Nor less than a trial's worth where the allowance holds it; nothing timed: all of it.
    assert cmp.tuner_seconds_for(split, {"bonsai": [5.0]})[0] == cmp.MIN_TUNER_SECONDS
    assert cmp.tuner_seconds_for(split, {})[0] == pytest.approx(allowance)
    small = cmp.split_budget(60, 1, 1, 0.4)
    assert cmp.tuner_seconds_for(small, {"bonsai": [1.0]})[0] == small["tuner_seconds"]


def test_plan_epochs_with_workers_fits_the_schedule_not_the_sum():
    runs = [{"name": f"r{i}", "epoch_seconds": 10.0, "overhead_seconds": 20.0}
            for i in range(4)]
    one = cmp.plan_epochs(1000.0, runs, safety=1.0)
    two = cmp.plan_epochs(1000.0, runs, safety=1.0, workers=2)
    assert one["epochs"] == 23            # 4 x (20 + 10 e) <= 1000
    assert two["epochs"] == 48            # 2 x (20 + 10 e) <= 1000
    assert two["expected_seconds"] == 2 * (20 + 480) <= 1000
    assert "2 at once" in two["why"] and "overrun" not in two["why"]


def test_pool_plan_serves_locally_or_where_the_chief_says_and_refuses_what_cannot_work():
    compare = load_compare()
    assert compare.pool_plan(1, -1, {}) is None
    assert compare.pool_plan(2, -1, {}) == {"ip": "127.0.0.1", "port": 0, "local": 2,
                                            "remote": False, "workers": 2}
    env = {"KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "10.0.0.1",
           "KERASTUNER_ORACLE_PORT": "8470"}
    assert compare.pool_plan(4, 1, env) == {"ip": "10.0.0.1", "port": 8470, "local": 1,
                                            "remote": True, "workers": 4}
    for workers, local, environ, words in (
            (3, 1, {}, "KERASTUNER_TUNER_ID=chief"),
            (2, 0, {"KERASTUNER_TUNER_ID": "chief"}, "KERASTUNER_ORACLE_IP"),
            (2, 0, {**env, "KERASTUNER_ORACLE_PORT": "x"}, "port number")):
        with pytest.raises(compare.UsageError, match=words):
            compare.pool_plan(workers, local, environ)


def test_bad_worker_flags_are_one_error_line(flagfile, tmp_path, capsys):  # noqa: F811
    compare = load_compare()
    for extra, words in ((["--workers=0"], "--workers=0"),
                         (["--workers=2", "--local_workers=3"], "--local_workers=3")):
        assert compare.main(compare_argv(flagfile, str(tmp_path / "out"), *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and words in err[0]


def test_a_worker_refuses_to_start_without_the_chiefs_address(tmp_path, monkeypatch):
    for var in trial_queue.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="KERASTUNER_ORACLE_IP"):
        trial_queue.run_worker(str(tmp_path), lambda *a: (0, None))
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "1")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief-2")
    with pytest.raises(ValueError, match="must not contain 'chief'"):
        trial_queue.run_worker(str(tmp_path), lambda *a: (0, None))


# ---- real workers -------------------------------------------------------------------------------
@pytest.fixture
def fake_scripts(tmp_path, monkeypatch):
    """compare.py's SEARCH/TUNE/TRAIN pointed at stand-in scripts of the same names."""
    compare = load_compare()
    d = tmp_path / "fake"
    d.mkdir()
    for name in ("search", "tune", "train"):
        (d / f"{name}.py").write_text(
            f"import sys\nsys.path.insert(0, {TESTS!r})\nimport fake_subrun\n"
            f"sys.exit(fake_subrun.main({name + '.py'!r}, sys.argv[1:]))\n")
        monkeypatch.setattr(compare, name.upper(), str(d / f"{name}.py"))
    return compare


def _table(out):
    state = json.load(open(os.path.join(out, "compare.json")))
    per_run = [{k: v for k, v in r.items() if k not in TIMING} for r in state["per_run"]]
    rows = [{k: v for k, v in r.items() if "seconds" not in k} for r in state["rows"]]
    return rows, per_run, state["verdicts"], state


def test_two_workers_give_the_serial_table_even_when_one_is_killed(fake_scripts, flagfile,  # noqa: F811
                                                                   tmp_path, monkeypatch):
    compare = fake_scripts
    serial, parallel = str(tmp_path / "serial"), str(tmp_path / "parallel")
    assert compare.main(compare_argv(flagfile, serial, "--epochs=3")) == 0
    # search-asap-s1's first run kills the worker running it: the chief gives the job
    # back to the queue and restarts the worker; the job runs again.
    monkeypatch.setenv("FAKE_KILL_WORKER", "search-asap-s1")
    assert compare.main(compare_argv(flagfile, parallel, "--epochs=3", "--workers=2")) == 0
    rows, per_run, verdicts, state = _table(parallel)
    assert (rows, per_run, verdicts) == _table(serial)[:3]
    assert [r["status"] for r in per_run] == ["done"] * len(per_run)
    runs = state["runs"]
    assert set(runs) == set(RUNS)
    assert len({r["worker"] for r in runs.values()}) >= 2, runs   # both took jobs
    assert runs["search-asap-s1"]["invocations"] == 1   # the lost run was not counted
    assert os.path.exists(os.path.join(parallel, "search-asap-s1", "killed-worker"))
    logs = os.listdir(os.path.join(parallel, "logs"))
    assert sum(name.startswith("worker-") for name in logs) == 2
    assert state["split"]["workers"] == 2


def test_worker_script_stops_when_the_chief_is_done(tmp_path):
    # The chief with an empty queue that is finished: a worker started by hand asks,
    # hears STOPPED and exits 0, having run nothing.
    import subprocess
    chief = trial_queue.Chief("127.0.0.1", 0, 0, None, str(tmp_path), remote=True)
    try:
        chief.oracle.finish()
        env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1",
               "KERASTUNER_ORACLE_PORT": str(chief.port), "KERASTUNER_TUNER_ID": "by-hand"}
        worker = os.path.join(os.path.dirname(TESTS), "bench", "compare_worker.py")
        done = subprocess.run([sys.executable, worker, f"--directory={tmp_path / 'w'}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "ran 0 sub-run(s)" in done.stdout
    finally:
        chief.close()
