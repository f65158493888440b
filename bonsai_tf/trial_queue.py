"""Independent sub-runs spread over worker processes by KerasTuner's distributed mode.

bench/compare.py's trainings (searches, baselines, retrainings) do not depend on each
other within a phase, so they can run at once. KerasTuner already has the machinery:
a chief process serves an Oracle over gRPC and every tuner process asks it for the
next trial, runs it and reports back; the processes find each other through its
environment variables

    KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT   where the chief serves
    KERASTUNER_TUNER_ID                           "chief" on the chief, unique on workers

Here a trial is one sub-run. `JobOracle` hands out the queued jobs in order (its
hyperparameter values carry the job's name and command line as JSON), answers IDLE
while a phase waits on running jobs, and STOPPED when the comparison is done.
`serve` runs KerasTuner's own OracleServicer in the chief's threads, so the chief
goes on deciding the next phase. `JobTuner` is a KerasTuner tuner whose trial runs
the job's command (as a subprocess, with its output in the job's log); it reports
the exit status, and a failed sub-run is a result, not a failed trial.

Every process must see the same paths (the output directory, the flagfile, the
repository): on several machines, a shared filesystem.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("bonsai_tf.compare")

ENV_IP, ENV_PORT, ENV_ID = "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"
ENV_VARS = (ENV_IP, ENV_PORT, ENV_ID)
OBJECTIVE = "ok"            # 1.0 when the sub-run exited 0: what KerasTuner scores
POLL_SECONDS = 2.0          # a worker's wait before asking again while the queue is IDLE


class QueueError(RuntimeError):
    """The trial queue cannot run: no address to serve at, or no worker left."""


class WorkersGone(QueueError):
    """Every worker process of this machine exited and none elsewhere can take the jobs."""


def job_spec(name, script, args, log_path, cwd):
    """What a worker needs to run one sub-run: JSON-able, every path as the chief sees it."""
    return {"name": name, "script": script, "args": list(args), "log": log_path, "cwd": cwd}


# What TensorFlow's native code prints on import, before its logging is set up (so
# TF_CPP_MIN_LOG_LEVEL cannot hide it); in the middle of compare.py's log it only confuses.
IMPORT_NOISE = ("WARNING: All log messages before absl::InitializeLog()",
                "I0000 00:00:")


def _kt():
    # KerasTuner imports Keras and TensorFlow: only the processes that queue pay for it.
    from bonsai_tf import cli
    with cli.dropping_stderr_lines(IMPORT_NOISE):
        import keras_tuner
    return keras_tuner


def make_oracle():
    """A JobOracle (defined on first use so that importing this module stays light)."""
    kt = _kt()
    from keras_tuner.src.engine import trial as trial_module

    class JobOracle(kt.Oracle):
        """Hands out queued jobs as trials; see the module docstring."""

        def __init__(self):
            # Failed sub-runs are reported as completed trials (ok = 0), so KerasTuner's
            # own stop after consecutive failures never fires on them.
            super().__init__(objective=kt.Objective(OBJECTIVE, "max"), max_trials=None,
                             max_consecutive_failed_trials=10 ** 9)
            self.verbose = 0      # KerasTuner's trial tables would print the specs
            self.lock = threading.Condition()
            self.pending = []     # specs not handed out yet, in order
            self.running = {}     # job name -> (tuner id, start time)
            self.results = {}     # job name -> {"exit", "seconds", "tuner"}
            self.finished = False

        # -- the chief's side ------------------------------------------------------------
        def submit(self, specs):
            with self.lock:
                self.pending.extend(specs)
                self.lock.notify_all()

        def finish(self):
            with self.lock:
                self.finished = True

        def wait(self, names, timeout):
            """Results of `names` that are in within `timeout` s: {name: result}."""
            with self.lock:
                self.lock.wait_for(lambda: all(n in self.results for n in names), timeout)
                return {n: self.results[n] for n in names if n in self.results}

        def requeue(self, tuner_id):
            """The job a dead worker was running goes back to the front of the queue."""
            with self.lock:
                trial = self.ongoing_trials.pop(tuner_id, None)
                self.tuner_ids.discard(tuner_id)
                if trial is None:
                    return None
                spec = json.loads(trial.hyperparameters.values["spec"])
                self.running.pop(spec["name"], None)
                self.pending.insert(0, spec)
                self.lock.notify_all()
                return spec["name"]

        # -- KerasTuner's side (called by the servicer's thread) ----------------------------
        def populate_space(self, trial_id):
            with self.lock:
                if self.pending:
                    spec = self.pending.pop(0)
                    return {"status": trial_module.TrialStatus.RUNNING,
                            "values": {"job": spec["name"], "spec": json.dumps(spec)}}
                if self.finished and not self.running:
                    return {"status": trial_module.TrialStatus.STOPPED}
                return {"status": trial_module.TrialStatus.IDLE}

        def create_trial(self, tuner_id):
            trial = super().create_trial(tuner_id)
            if trial.status == trial_module.TrialStatus.RUNNING:
                with self.lock:
                    self.running[trial.hyperparameters.values["job"]] = (tuner_id, time.time())
            return trial

        def end_trial(self, trial):
            super().end_trial(trial)
            kept = self.trials[trial.trial_id]
            name = kept.hyperparameters.values["job"]
            metrics = kept.metrics
            exit_code = (int(metrics.get_last_value("exit")) if metrics.exists("exit")
                         else None)
            seconds = (float(metrics.get_last_value("seconds")) if metrics.exists("seconds")
                       else None)
            with self.lock:
                tuner_id, started = self.running.pop(name, (None, time.time()))
                self.results[name] = {
                    "exit": exit_code, "tuner": tuner_id,
                    "seconds": seconds if seconds is not None else time.time() - started,
                    "message": kept.message}
                self.lock.notify_all()

        # The run directories are the record; KerasTuner's project files would only
        # describe queue positions that a rerun renumbers.
        def save(self):
            pass

        def _save_trial(self, trial):
            pass

    return JobOracle()


def serve(oracle, ip, port):
    """Serves `oracle` with KerasTuner's servicer at ip:port; returns (server, port).

    port 0 picks a free one. The servicer answers one call at a time, as KerasTuner's
    chief does (the Oracle is not thread-safe beyond its own locks).
    """
    from concurrent import futures

    import grpc
    _kt()
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    protos.get_service_grpc().add_OracleServicer_to_server(
        oracle_chief.OracleServicer(oracle), server)
    try:
        bound = server.add_insecure_port(f"{ip}:{port}")
    except RuntimeError:   # grpc raises where older versions returned 0
        bound = 0
    if not bound:
        raise QueueError(f"cannot serve the trial queue at {ip}:{port}; expected a free port "
                         f"on an address of this machine")
    server.start()
    return server, bound


def run_worker(directory, launcher, poll_seconds=POLL_SECONDS, extra_args=()):
    """A worker: runs the chief's jobs until it says STOPPED; returns the jobs it ran.

    Needs KERASTUNER_ORACLE_IP/PORT and a KERASTUNER_TUNER_ID other than "chief".
    launcher(script, args, log_path) -> (exit status, error line) runs one job.
    directory: where KerasTuner keeps this tuner's own small files. extra_args are
    appended to every job's arguments unless it sets the same flag already.
    """
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set; expected the chief's address in "
                         f"{ENV_IP}/{ENV_PORT} and this worker's id in {ENV_ID}")
    if "chief" in os.environ[ENV_ID]:
        raise ValueError(f"{ENV_ID}={os.environ[ENV_ID]}; a worker's id must not contain "
                         f"'chief' (KerasTuner would make it serve instead)")
    kt = _kt()
    from keras_tuner.src.engine import trial as trial_module
    ran = []

    class JobTuner(kt.engine.base_tuner.BaseTuner):
        def run_trial(self, trial):
            spec = json.loads(trial.hyperparameters.values["spec"])
            args = list(spec["args"])
            given = {a.split("=", 1)[0] for a in args}
            args += [a for a in extra_args if a.split("=", 1)[0] not in given]
            t0 = time.time()
            if spec.get("cwd") and os.path.isdir(spec["cwd"]):
                os.chdir(spec["cwd"])
            code, _ = launcher(spec["script"], args, spec["log"])
            ran.append(spec["name"])
            return {OBJECTIVE: float(code == 0), "exit": float(code),
                    "seconds": time.time() - t0}

    tuner = JobTuner(oracle=kt.oracles.RandomSearchOracle(
        objective=kt.Objective(OBJECTIVE, "max"), max_trials=1), directory=directory,
        project_name=os.environ[ENV_ID])
    client = tuner.oracle
    create = client.create_trial

    def create_trial(tuner_id):
        # KerasTuner's loop asks again at once after IDLE; the chief's phase may take hours.
        trial = create(tuner_id)
        if trial.status == trial_module.TrialStatus.IDLE:
            time.sleep(poll_seconds)
        return trial
    client.create_trial = create_trial
    tuner.search()
    return ran


class Chief:
    """The chief's side: the oracle, its server and this machine's worker processes.

    ip, port: where to serve (port 0: a free one). local_workers: worker processes
    started here, each with worker_argv(i) and the environment that points it at the
    chief; remote: whether workers elsewhere may connect (else losing every local
    one is an error). A local worker that dies gives its job back to the queue and is
    restarted (up to `restarts` times); its job resumes from its run directory.
    """

    def __init__(self, ip, port, local_workers, worker_argv, log_dir, remote=False,
                 restarts=2, popen=None):
        self.oracle = make_oracle()
        self.server, self.port = serve(self.oracle, ip, port)
        self.ip, self.remote, self.restarts = ip, remote, restarts
        self.worker_argv, self.log_dir = worker_argv, log_dir
        self.popen = popen or subprocess.Popen
        self.procs, self.restarted = {}, {}
        os.makedirs(log_dir, exist_ok=True)
        host = os.uname().nodename.split(".")[0] or "host"
        for i in range(local_workers):
            self._start(f"{host}-{i}", i)

    def _start(self, tuner_id, i):
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        env.update({ENV_IP: self.ip, ENV_PORT: str(self.port), ENV_ID: tuner_id})
        out = open(os.path.join(self.log_dir, f"worker-{tuner_id}.log"), "ab")
        try:
            self.procs[tuner_id] = (self.popen(dying_with_parent(self.worker_argv(i)),
                                               env=env, stdout=out, stderr=out), i)
        finally:
            out.close()

    def submit(self, specs):
        self.oracle.submit(specs)

    def wait(self, names, timeout=5.0):
        """Results that came in within `timeout` s; looks after the local workers."""
        got = self.oracle.wait(names, timeout)
        self.check_workers()
        return got

    def check_workers(self):
        for tuner_id, (proc, i) in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[tuner_id]
            job = self.oracle.requeue(tuner_id)
            if self.oracle.finished and job is None:
                continue
            n = self.restarted.get(tuner_id, 0)
            log.info("worker %s exited (status %s)%s", tuner_id, code,
                     f"; its job {job} goes back to the queue" if job else "")
            if n < self.restarts:
                self.restarted[tuner_id] = n + 1
                self._start(tuner_id, i)
        if not self.procs and not self.remote and not self.oracle.finished:
            raise WorkersGone(f"every worker process exited (see {self.log_dir}/worker-*.log); "
                              f"expected them to run the queued sub-runs")

    def finish(self, timeout=60.0):
        """Tells the workers to stop once the queue is empty and waits for the local ones."""
        self.oracle.finish()
        deadline = time.time() + timeout
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: close() ends it
                pass
        self.close()

    def close(self):
        """Stops the local workers (their sub-runs get SIGINT and resume later)."""
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=45)
            except Exception:  # noqa: BLE001 - still running: the sub-run ignored SIGINT
                proc.kill()
                proc.wait()
        self.procs.clear()
        self.server.stop(grace=1)


# Run as `python -c _ORPHAN_GUARD PARENT_PID PROGRAM ARGS...`: asks Linux to SIGTERM this
# process when its parent dies (PR_SET_PDEATHSIG survives exec), then becomes PROGRAM.
# Not a preexec_fn: Python code between fork and exec aborts in a process whose gRPC
# threads (a worker's KerasTuner client, the chief's server) hold the event engine.
_ORPHAN_GUARD = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass  # not Linux: a child may outlive a killed parent
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the parent died before the guard was set
os.execv(sys.argv[2], sys.argv[2:])
"""


def dying_with_parent(argv):
    """argv, run so that the process ends when this one dies, even by SIGKILL (Linux)."""
    return [sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), *argv]


# ---- one sub-run ------------------------------------------------------------------------
def subprocess_launcher(script, args, log_path):
    """Runs `python script args` with its output appended to log_path.

    Returns (exit status, its last `error:` line or last line). The child is ended
    when its parent (compare.py, or a worker) dies, even by SIGKILL (Linux), so that
    a rerun never finds an orphan still working on the run directory it resumes.
    """
    # A worker's KerasTuner address is not the sub-run's: tune.py would join the queue.
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"\n$ {sys.executable} {script} {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen(dying_with_parent([sys.executable, script, *args]),
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except BaseException:
            # Ctrl-C (or another exception) in compare.py: the sub-run stops too; it
            # resumes from its last checkpoint when the comparison is run again.
            try:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            raise
    return code, last_error(log_path)


def last_error(path):
    """The last `error:` line of a log, else its last line; None without one."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-200:] if line.strip()]
    except OSError:
        return None
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [None])[-1]
