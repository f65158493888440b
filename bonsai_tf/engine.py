"""One readable loop that runs a search strategy (or a fixed network) in a run directory.

`Run` owns what every method shares: the network, the compiled steps, the
optimizers, the data, the time budget, records and checkpoints. What a method
decides (which parameters the cells carry, extra losses, pruning, growth, when
the search ends) comes from its strategy (bonsai_tf.strategies), which the loop
knows only through the interface in strategies/base.py.

Structural changes happen only between epochs; each is followed by a rebuild of
the model from the surviving layers, an optimizer `build` over the new variable
set and a fresh `tf.function`. State that a restart needs is written atomically
at the end of every epoch (see run_dir.py), so running the same command again
resumes.
"""

import dataclasses
import functools
import logging
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from bonsai_tf import budget as budget_lib
from bonsai_tf import distribute as distribute_lib
from bonsai_tf import genotype as genotype_lib
from bonsai_tf import machine
from bonsai_tf import memory as memory_lib
from bonsai_tf import network as network_lib
from bonsai_tf import optim
from bonsai_tf import run_dir as rd
from bonsai_tf import space as space_lib
from bonsai_tf import strategies

log = logging.getLogger("bonsai_tf")

STATE_VERSION = 2
PLAN_FILE = "plan.json"
MODEL_FILE = "model.keras"      # the final, deployable network (plain Keras layers)
DATASET_FILE = "dataset.json"   # data.DatasetInfo of the run: shape, classes, mean/std

from bonsai_tf.strategies.bonsai import BudgetError  # noqa: E402,F401 - the runner reports it


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class State:
    """Everything besides variables that a resumed run needs; plain JSON."""
    epoch: int = 0                       # completed epochs
    phase: str = "search"                # "search" or "final"
    phase_epochs: int = 0                # completed epochs of the current phase
    genotype: dict = None                # the current network
    group_start: dict = None             # lr group -> epoch (or progress, under a budget)
    search_seconds: float = 0.0
    # Search seconds spent on structural changes: rebuilding the network and the extra
    # time of the first step after it (tracing the new step, optimising its graph).
    restructure_seconds: float = 0.0
    restructures: int = 0                # structural changes (rebuilds) of the search
    seconds: float = 0.0                 # training seconds (epochs) so far
    wall_seconds: float = 0.0            # whole-command seconds of earlier processes
    measured_mb: float = None
    measured_source: str = None          # memory.StepMemory.source of measured_mb
    events: list = None
    strategy: dict = None                # the strategy's own state
    plan: dict = None                    # budget.Plan, under a time budget
    version: int = STATE_VERSION


def _as_list(outs):
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def _first_call_excess(seconds):
    """How much longer the first of these timed calls took than the median of the rest
    (0 with fewer than two calls)."""
    if len(seconds) < 2:
        return 0.0
    return max(0.0, seconds[0] - float(np.median(seconds[1:])))


def _then_true(fn):
    """A tf.cond branch that runs fn's stateful ops and returns True."""
    fn()
    return tf.constant(True)


def _in_scope(method):
    """`method` run in the Run's tf.distribute scope: the variables it makes (networks,
    optimizer slots) are the strategy's (mirrored) ones."""
    @functools.wraps(method)
    def scoped(self, *args, **kwargs):
        with self.dist.scope():
            return method(self, *args, **kwargs)
    return scoped


class Run:
    """Runs `config` (RunConfig) on `splits` (data.Splits) in `run_dir`.

    started: time.time() when the command started (the time budget counts from it).
    exports: whether an export follows (the budget keeps time for it).
    """

    def __init__(self, config, splits, run_dir, verbose=1, started=None, distribution=None,
                 exports=True):
        self.cfg, self.splits, self.run_dir, self.verbose = config, splits, run_dir, verbose
        self.exports = exports   # an export follows the run: the budget keeps time for it
        self._largest_fn = None  # `_largest`, traced on first use
        # tf.distribute: every variable is made in its scope (network, optimizer slots,
        # strategy state), every step runs in its replicas (`_compile`).
        self.dist = (distribution if distribution is not None else
                     distribute_lib.make(config.distribute, config.devices))
        self.distributed = distribute_lib.is_distributed(self.dist)
        # Processes of a multi-worker cluster: each measures its own times and takes the
        # decisions that depend on them (the time budget's plan, ProxylessNAS's measured
        # selection) only from values agreed over all of them (`_agree`, `_from_chief`).
        self.workers = distribute_lib.num_workers(self.dist)
        self.started = time.time() if started is None else started
        info = splits.info
        self.input_shape = tuple(info.image_shape)
        # A constant channel (std 0) carries nothing to learn: standardise it to 0, not NaN.
        self.mean, self.std = tuple(info.mean), tuple(s if s > 0 else 1.0 for s in info.std)
        self.num_classes = info.num_classes
        self.augment = config.augment or info.augment
        self.budgeted = config.time_budget_minutes > 0
        self.total_epochs = config.epochs
        self.search_epochs = config.resolved_search_epochs
        from bonsai_tf import config as config_lib
        self.max_patterns = config_lib.pattern_cap(config, self.input_shape)
        with self.dist.scope():
            self.strategy = strategies.get(config.strategy)(config, strategies.RunInfo(
                input_shape=self.input_shape, num_classes=self.num_classes,
                max_patterns=self.max_patterns, search_epochs=self.search_epochs))
        self.strategy.attach(self._held_out_batches)
        machine.configure_graph_optimizer(config.graph_optimizer)
        # Every layer takes its dtype policy when it is made: set before any network.
        machine.set_precision_policy(config.mixed_precision)
        self.net = None
        self.state = None
        self.plan = None
        self.records = []
        self._writer = None
        self.final_network = None
        self._rebuild_clock = 0.0       # this epoch's seconds in _rebuild
        # Whether the next training epoch's first step and the next evaluation's first
        # batch trace after a rebuild (a cost of the structural change).
        self._retrace_pending = {"train": False, "eval": False}
        self._eval_retrace = 0.0        # this epoch's seconds of that evaluation trace
        # Whether the current training and evaluation steps have run since they were
        # compiled, and the first-call excess of every epoch's calls on a graph already
        # traced: what a first batch costs without any structural change.
        self._traced = {"train": False, "eval": False}
        self._warmups = {"train": [], "eval": []}

    # ---- set-up -------------------------------------------------------------------
    @_in_scope
    def prepare(self, genotype=None):
        """A fresh run's state and network (also for benchmarks and tests): no training."""
        keras.utils.set_random_seed(self.cfg.seed)
        st = State(group_start={}, events=[])
        g = self.strategy.initial_genotype() if genotype is None else genotype
        searching = self.strategy.searches and (self.budgeted or self.search_epochs > 0)
        st.phase = "search" if searching else "final"
        for p in range(genotype_lib.num_patterns(g)):
            st.group_start[str(p)] = 0
        st.genotype = g.to_dict()
        self.state = st
        self._build_network()
        self.strategy.begin(self.net, fresh=True)
        self._same_start()
        return self

    def _build_network(self):
        cfg, st = self.cfg, self.state
        g = _in_space_order(genotype_lib.Genotype.from_dict(st.genotype))
        arch = self.strategy.arch if st.phase == "search" else "none"
        self.net = network_lib.Network(g, self.mean, self.std, with_pruners=arch != "none",
                                       drop_path=cfg.drop_path, seed=cfg.seed,
                                       mixing=arch if arch != "none" else "saw")
        self.opt = self._new_optimizer()
        self.arch_opt = optim.Adam(cfg.arch_lr) if self.strategy.bilevel else None
        self._compile()

    def _new_optimizer(self):
        cfg = self.cfg
        # float16 activations need loss scaling; bfloat16 has float32's exponent range.
        scale = optim.DynamicLossScale() if cfg.mixed_precision == "mixed_float16" else None
        return optim.MomentumSGD(cfg.momentum, cfg.weight_decay, loss_scale=scale)

    # ---- compiled steps ---------------------------------------------------------------
    def _groups(self):
        """Variables by lr group: one per pattern (its cells and head), arch separately."""
        g = self.net.genotype
        cell_pattern, count = {}, 0
        for p in range(genotype_lib.num_patterns(g)):
            for _ in genotype_lib.pattern_codes(g.patterns, p):
                cell_pattern[count] = p
                count += 1
        searching = self.state.phase == "search"
        arch_ids = {id(v) for v in self.strategy.arch_variables(self.net)} if searching else set()
        groups, arch = {}, []
        for v in self.net.model.trainable_variables:
            top = v.path.split("/")[0]
            if id(v) in arch_ids:
                if self.strategy.bilevel:
                    arch.append(v)
                    continue
                key = "gates"
            elif top.startswith("cell") or top.startswith("head"):
                key = str(cell_pattern[int(top[4:])])
            else:
                key = "0"
            groups.setdefault(key, []).append(v)
        return [(k, vs, k != "gates") for k, vs in sorted(groups.items())], arch

    def _compile(self):
        cfg, net = self.cfg, self.net
        self._traced = {"train": False, "eval": False}
        model = net.model
        groups, arch_vars = self._groups()
        moved = net.take_moved()    # renumbered nodes: momentum follows the weights
        self.variables = self.opt.build(groups, moved)
        searching = self.state.phase == "search"
        extra = self.strategy.loss(net) if searching else None
        # What a strategy does after every weight update (SpiderNet's gate clamp and
        # per-batch open records), traced into the step.
        post_train = self.strategy.after_train_step(net) if searching else None
        smoothing, num_classes, aux_w = cfg.label_smoothing, self.num_classes, cfg.aux_weight
        variables, opt = self.variables, self.opt
        scale = opt.loss_scale

        def ce(y, logits):
            # The mean over this batch, by TensorFlow's kernels: Keras' losses divide
            # by the number of replicas inside tf.distribute, and the steps weight each
            # replica by its share of the global batch themselves.
            if smoothing:
                labels = tf.one_hot(y, num_classes) * (1.0 - smoothing) + smoothing / num_classes
                return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, logits))
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))

        def total_loss(x, y):
            # Logits in float32 whatever the compute dtype: the loss wants the range.
            outs = [tf.cast(o, tf.float32) for o in _as_list(model(x, training=True))]
            main = ce(y, outs[0])
            total = main
            if len(outs) > 1:
                total = total + aux_w * tf.add_n([ce(y, o) for o in outs[1:]])
            return outs, main, total

        distributed = self.distributed
        if distributed:
            # Each replica's loss weighted by its share of the global batch, the
            # gradients summed over the replicas: the global batch's mean, as on one device.
            share_of, sum_replicas = distribute_lib.share_of, distribute_lib.sum_replicas
        else:
            share_of, sum_replicas = (lambda n: None), (lambda values: values)

        def weighted(t, share):
            return t if share is None else t * share

        def train_step(x, y, inputs):
            n = tf.shape(y)[0]
            share = share_of(n)
            with tf.GradientTape() as tape:
                outs, main, total = total_loss(x, y)
                comp = extra(inputs) if extra is not None else tf.constant(0.0)
                total = weighted(total + comp, share)
                # Scaled inside the tape: the gradient must see the multiply.
                scaled = scale.scaled(total) if scale is not None else None
            if scale is None:
                opt.apply(sum_replicas(tape.gradient(total, variables)))
            else:
                grads = scale.unscale(sum_replicas(tape.gradient(scaled, variables)))
                finite = scale.all_finite(grads)
                # An overflowed step is skipped (the weights stay) and the scale halves.
                tf.cond(finite, lambda: _then_true(lambda: opt.apply(grads)),
                        lambda: tf.constant(False))
                scale.update(finite)
            if post_train is not None:
                post_train()
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(outs[0], -1), y), tf.float32))
            return {"loss": total, "ce": weighted(main, share),
                    "compression_loss": weighted(comp, share), "correct": correct,
                    "n": tf.cast(n, tf.float32)}

        def eval_step(x, y):
            logits = tf.cast(_as_list(model(x, training=False))[0], tf.float32)
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))
            return {"loss_sum": loss, "correct": correct}

        names = sorted(self.strategy.step_inputs(net)) if searching else []
        spec = [tf.TensorSpec((None,) + self.input_shape, tf.float32), tf.TensorSpec((None,), tf.int64)]
        scalars = {k: tf.TensorSpec((), tf.float32) for k in names}
        jit = cfg.jit_compile or None
        if distributed:
            train_step = self._in_replicas(train_step)
        self.train_step = tf.function(train_step, jit_compile=jit and not distributed,
                                      input_signature=None if distributed else spec + [scalars],
                                      autograph=False)
        self.eval_step = tf.function(eval_step, jit_compile=jit, input_signature=spec,
                                     autograph=False)
        self.arch_step = None
        if searching and self.strategy.bilevel:
            arch_vars = self.arch_opt.build(arch_vars, moved)
            arch_opt = self.arch_opt
            # What a strategy does to the architecture right after each of its steps
            # (ProxylessNAS's alpha rescale), traced into the step.
            post = self.strategy.after_arch_step(net, arch_vars)
            arch_term = self.strategy.arch_loss(net)

            def arch_step(x, y, inputs):
                # First-order bi-level: the architecture steps on a validation batch
                # with the weights held as they are.
                share = share_of(tf.shape(y)[0])
                with tf.GradientTape() as tape:
                    _, main, total = total_loss(x, y)
                    total = weighted(total, share)
                    # Given the network's loss alone (the global batch's, the same on
                    # every replica): REINFORCE's reward leaves out the latency term,
                    # which reaches the alphas by its own gradient.
                    whole = total if share is None else sum_replicas([total])[0]
                    term = arch_term(whole, inputs) if arch_term is not None else None
                    if extra is not None:
                        total = total + weighted(extra(inputs), share)
                    if term is not None:
                        term = weighted(term, share)
                    # (a list of targets: the gradient of their sum)
                    targets = [total] if term is None else [total, term]
                    if scale is not None:
                        targets = [scale.scaled(t) for t in targets]
                grads = sum_replicas(tape.gradient(targets, arch_vars))
                if scale is not None:
                    grads = scale.unscale(grads)
                old = [tf.identity(v.value) for v in arch_vars] if post is not None else None

                def update():
                    arch_opt.apply(grads)
                    if post is not None:
                        post(old)
                if scale is None:
                    update()
                else:
                    # The weights' step owns the scale; an overflow here only skips.
                    tf.cond(scale.all_finite(grads), lambda: _then_true(update),
                            lambda: tf.constant(False))
                return {"loss": total, "ce": weighted(main, share)}
            if distributed:
                arch_step = self._in_replicas(arch_step)
            self.arch_step = tf.function(arch_step, jit_compile=jit and not distributed,
                                         input_signature=None if distributed else spec + [scalars],
                                         autograph=False)
        self.extra_loss = extra
        self._measure_next = cfg.measure_memory

    def _in_replicas(self, step):
        """`step` run in every replica; its outputs (weighted losses, counts) summed."""
        dist = self.dist

        def distributed_step(x, y, inputs):
            out = dist.run(step, args=(x, y, inputs))
            return {k: dist.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                    for k, v in out.items()}
        return distributed_step

    # ---- the loop -----------------------------------------------------------------
    def run(self):
        """Runs (or resumes) to the end; returns the final metrics dict."""
        cfg = self.cfg
        ckpt = rd.load_checkpoint(self.run_dir)
        if ckpt is not None:
            arrays, state = ckpt
            self._restore(arrays, state)
            log.info("resuming %s at epoch %d (%s phase)", self.run_dir, self.state.epoch,
                     self.state.phase)
        else:
            self.prepare()
            self._write_genotype()
            rd.write_json(os.path.join(self.run_dir, DATASET_FILE), dataclasses.asdict(self.splits.info))
        if self.budgeted and self.plan is None:
            self.plan = budget_lib.new_plan(cfg.time_budget_minutes * 60.0, cfg.search_fraction,
                                            self._agree(self._elapsed()),
                                            searches=self.state.phase == "search",
                                            exports=self.exports)
            self._write_plan()
        self.records = rd.read_metrics(os.path.join(self.run_dir, "metrics.jsonl"))[:self.state.epoch]
        self._writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard"))
        while not self._done():
            st = self.state
            started = time.time()
            self._rebuild_clock = self._eval_retrace = 0.0
            # Every random draw of an epoch (tf.data shuffle and augmentation seeds depend
            # on the global seed too) follows from (seed, epoch) alone, so a resumed run
            # draws exactly what an uninterrupted one does.
            keras.utils.set_random_seed(cfg.seed * 1000 + 500 + st.epoch)
            if st.phase == "search" and self._search_over():
                self._to_final("search epochs used up")
                continue
            events = []
            if st.phase == "search":
                events += self._apply(self.strategy.before_epoch(st.epoch, self.net), st.epoch)
            ds = self._dataset(st.epoch)
            self._set_lrs(st.epoch)
            self.net.reseed(st.epoch)
            logs = self._train_epoch(ds, st.epoch)
            if self.distributed:
                # Each replica's batch norms updated their moving statistics from their
                # own part of the batches: one value everywhere from here on.
                distribute_lib.average_replicas(self.dist, self.net.model.non_trainable_weights)
            # Validate the network that was trained this epoch, before any structural
            # change: a grown network's new head has not been trained yet.
            val_started = time.time()
            val = self.evaluate(*self.splits.val) if self._validates() else {}
            self._val_seconds = time.time() - val_started
            phase = st.phase
            if phase == "search":
                events += self._apply(self.strategy.after_epoch(st.epoch + 1, self.net),
                                      st.epoch + 1)
            # (the slowest worker's: the epoch and search seconds the plan reads agree)
            elapsed = self._agree(time.time() - started)
            logs["retrace_seconds"] += self._eval_retrace
            restructured = self._rebuild_clock + logs["retrace_seconds"]
            logs["restructure_seconds"] = restructured
            st.epoch += 1
            st.phase_epochs += 1
            st.seconds += elapsed
            if phase == "search":
                st.search_seconds += elapsed
                st.restructure_seconds += restructured
                if self._search_over():
                    events.append(self._to_final("search finished"))
            if self.budgeted:
                self.plan.epoch_done(phase, elapsed, logs["steps"],
                                     self._agree(logs["step_seconds"]),
                                     self._agree(logs["first_step_seconds"]))
                if st.phase == phase:
                    self._replan(phase)
            # The record carries the phase the run is in after the epoch (a last search
            # epoch reads "final"), as metrics.jsonl always has.
            logs["val_seconds"] = self._val_seconds
            record = self._record(logs, val, elapsed, events, st.phase)
            self.records.append(record)
            st.events = (st.events or []) + [f"epoch {st.epoch}: {e}" for e in events]
            saving = time.time()
            self._save()
            log.debug("checkpoint written in %.1f s", time.time() - saving)
        return self._finish()

    def _probing(self):
        """Whether the final network is only timed, not trained (final_probe_steps)."""
        return self.cfg.final_probe_steps > 0 and self.state.phase == "final"

    def _done(self):
        st = self.state
        if self._probing() and not self.budgeted:
            return st.phase_epochs >= 1
        if not self.budgeted:
            return st.epoch >= self.total_epochs
        p = self.plan.phases.get("final")
        return st.phase == "final" and p is not None and st.phase_epochs >= p.epochs

    def _search_over(self):
        st = self.state
        if self.strategy.search_done(self.net):
            return True
        if not self.budgeted:
            return st.epoch >= self.search_epochs
        p = self.plan.phases.get("search")
        return p is not None and st.phase_epochs >= p.epochs

    def _apply(self, change, epochs_done):
        """Carries out a strategy's Change: rebuild, schedules, temperature; its events."""
        if not change:
            return []
        if change.temperature is not None:
            self.net.set_temperature(change.temperature)
        if change.new_pattern is not None:
            self.state.group_start[str(change.new_pattern)] = (
                epochs_done if not self.budgeted else self._progress_now())
        if self.workers > 1:
            # Structural decisions are the chief's: every worker rebuilds the same model
            # even where a worker's own decision could differ (train-free scores, timed
            # selections: floating-point sums in another order on another machine).
            mine = _change_dict(change)
            chief = self._from_chief(mine)
            if chief != mine:
                log.warning("this worker's structural change differs from the chief's; "
                            "taking the chief's")
            change.genotype = (None if chief["genotype"] is None else
                               genotype_lib.Genotype.from_dict(chief["genotype"]))
            change.node_maps = _node_maps_from(chief["node_maps"])
        if change.genotype is not None:
            self._rebuild(change.genotype, change.node_maps)
            rd.fault_point("rebuild")
        return list(change.events)

    def _same_start(self):
        """After a (re)build under tf.distribute: every replica (every worker) takes the
        first replica's values of every variable, whatever each drew for new ones."""
        if not self.distributed:
            return
        moved = distribute_lib.broadcast_first(self.dist, self._all_variables())
        if moved:
            log.debug("replicas started from different values (largest difference %g): "
                      "the first replica's taken", moved)

    def _all_variables(self):
        out = list(self.net.model.weights) + list(self.opt.slots.values())
        if self.arch_opt is not None:
            out += [v for pair in self.arch_opt.slots.values() for v in pair]
        return out

    # ---- agreement between the workers of a cluster ------------------------------------
    def _agree(self, value):
        """`value` (a float) as every worker takes it: the largest over the workers (the
        slowest worker's time: a plan all of them keep). One worker: `value` itself."""
        if self.workers <= 1:
            return value
        return float(self._largest(tf.constant(float(value), tf.float32)))

    def _largest(self, tensor):
        """distribute_lib.largest over the workers, traced once per Run (not per call)."""
        if self._largest_fn is None:
            self._largest_fn = tf.function(functools.partial(distribute_lib.largest, self.dist),
                                           autograph=False)
        return self._largest_fn(tensor)

    def _from_chief(self, obj):
        """The chief's `obj` (plain JSON) on every worker."""
        if self.workers <= 1:
            return obj
        import json
        # Key order kept: an edge's operations come in the order that sums them.
        mine = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        n = int(self._agree(len(mine)))
        buf = np.zeros(n, np.int32)
        if distribute_lib.is_chief(self.dist):
            buf[:len(mine)] = mine
        # The others send zeros: the largest of every byte is the chief's.
        got = self._largest(tf.constant(buf)).numpy().astype(np.uint8)
        return json.loads(got.tobytes().rstrip(b"\0").decode())

    def _phase_parts(self):
        """[(images, labels), ...] the current phase trains on, without copying: the
        training split, or its first train_subset / final_subset examples
        (data.load_dataset already shuffled them, seeded), and with final_with_val the
        validation examples after them."""
        cfg, st = self.cfg, self.state
        x, y = self.splits.train
        subset = cfg.train_subset if st.phase == "search" else cfg.final_subset
        parts = [(x[:subset], y[:subset]) if subset else (x, y)]
        if st.phase == "final" and cfg.final_with_val:
            parts.append(self.splits.val)
        return parts

    def _phase_examples(self):
        parts = self._phase_parts()
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))

    def _phase_count(self):
        return sum(len(y) for _, y in self._phase_parts())

    def _validates(self):
        """Whether this epoch ends with a validation pass: not when the final network
        trains on the validation examples, whose accuracy would then be a training one."""
        if not len(self.splits.val[1]):
            return False
        return not (self.state.phase == "final" and self.cfg.final_with_val)

    def _dataset(self, epoch):
        from bonsai_tf import data as data_lib
        cfg = self.cfg
        x, y = self._phase_examples()
        ds = data_lib.make_dataset(x, y, batch_size=cfg.batch_size, training=True,
                                   augment=self.augment, seed=cfg.seed * 100003 + epoch,
                                   drop_remainder=True)
        if cfg.steps_per_epoch:
            ds = ds.take(cfg.steps_per_epoch)
        return self._distributed(ds)

    def _distributed(self, ds):
        """`ds` (global batches) split over the replicas; as it is on one device."""
        if not self.distributed:
            return ds
        return self.dist.experimental_distribute_dataset(ds)

    def _val_batches(self, epoch):
        """Endless validation batches for the architecture steps (bi-level strategies)."""
        from bonsai_tf import data as data_lib
        x, y = self.splits.val
        ds = data_lib.make_dataset(x, y, batch_size=min(self.cfg.batch_size, len(y)),
                                   training=True, augment="none",
                                   seed=self.cfg.seed * 100019 + epoch, drop_remainder=True)
        return iter(self._distributed(ds.repeat()))

    def _held_out_batches(self, n, epoch):
        """n batches of the validation split (the training split where there is none),
        drawn from a seed fixed by the epoch so a resumed run draws the same ones."""
        from bonsai_tf import data as data_lib
        x, y = self.splits.val if len(self.splits.val[1]) else self.splits.train
        ds = data_lib.make_dataset(x, y, batch_size=min(self.cfg.batch_size, len(y)),
                                   training=True, augment="none",
                                   seed=self.cfg.seed * 100043 + epoch, drop_remainder=True)
        return list(ds.repeat().take(n))

    def _train_epoch(self, ds, epoch):
        st = self.state
        searching = st.phase == "search"
        inputs = {k: tf.constant(v, tf.float32)
                  for k, v in (self.strategy.step_inputs(self.net) if searching else {}).items()}
        arch_on = self.arch_step is not None and self.strategy.arch_trainable(epoch)
        val_batches = self._val_batches(epoch) if arch_on else None
        plan = self.plan.phases.get(st.phase) if self.budgeted else None
        limit = plan.steps_per_epoch if plan is not None else None
        if self._probing():
            limit = min(limit or self.cfg.final_probe_steps, self.cfg.final_probe_steps)
        probe_from, epoch_started, step_times = None, time.time(), []
        total = {"loss": 0.0, "ce": 0.0, "compression_loss": 0.0, "correct": 0.0}
        seen = steps = 0
        bar = keras.utils.Progbar(limit or self._steps_per_epoch(), stateful_metrics=["loss", "acc"],
                                  verbose=self.verbose) if self.verbose else None
        for xb, yb in ds:
            if limit is not None and steps >= limit:
                break
            if self.budgeted:
                self._set_step_lrs(steps)
            step_started = time.time()
            if self._measure_next and steps == 1:
                # The second step: the first one traced the graph.
                out = {}
                measured = memory_lib.measure_step_peak(
                    lambda: out.update(self.train_step(xb, yb, inputs)))
                st.measured_mb, st.measured_source = measured.mb, measured.source
                self._measure_next = False
            else:
                out = self.train_step(xb, yb, inputs)
            if arch_on:
                xv, yv = next(val_batches)
                self.arch_step(xv, yv, inputs)
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"training loss became {loss} at epoch {epoch + 1}, step {steps + 1}; expected a "
                    f"finite loss: lower --lr_max or check the data. The last good checkpoint in "
                    f"{self.run_dir} is kept")
            n = int(out["n"])   # the global batch (a distributed one holds PerReplica parts)
            for k in total:
                total[k] += float(out[k]) * (1 if k == "correct" else n)
            step_times.append(time.time() - step_started)
            seen += n
            steps += 1
            if steps == 2:
                rd.fault_point(f"mid_epoch:{epoch + 1}")
            if self.budgeted and plan is None:
                # Unplanned phase: time a few steps after the traced first one, then plan.
                if steps == 1:
                    probe_from = time.time()
                elif steps == 1 + budget_lib.PROBE_STEPS:
                    plan = self._plan_phase((time.time() - probe_from) / budget_lib.PROBE_STEPS)
                    limit = plan.steps_per_epoch
                    if bar is not None:
                        bar.target = limit
            if bar is not None:
                bar.update(steps, [("loss", total["loss"] / seen), ("acc", total["correct"] / seen)])
        if self.budgeted and plan is None and steps:
            # An epoch shorter than the probe: plan from the steps it had (after the
            # traced first one where there were others).
            timed = (time.time() - probe_from) / (steps - 1) if steps > 1 else None
            self._plan_phase(timed or (time.time() - epoch_started) / steps)
        seen = max(seen, 1)
        retrace = self._trace_cost("train", step_times)
        return {"train_loss": total["loss"] / seen, "train_ce": total["ce"] / seen,
                "compression_loss": total["compression_loss"] / seen,
                "train_accuracy": total["correct"] / seen, "steps": steps,
                # The first step traces after every (re)build; the rest show the rate.
                "first_step_seconds": step_times[0] if step_times else 0.0,
                "retrace_seconds": retrace,
                "step_seconds": float(np.median(step_times[1:])) if len(step_times) > 1
                else (step_times[0] if step_times else 0.0)}

    def _steps_per_epoch(self):
        cfg = self.cfg
        steps = self._phase_count() // cfg.batch_size
        return min(steps, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps

    def evaluate(self, images, labels, batch_size=256):
        from bonsai_tf import data as data_lib
        ds = data_lib.make_dataset(images, labels, batch_size=batch_size, training=False)
        loss = correct = 0.0
        times = []
        for xb, yb in ds:
            started = time.time()
            out = self.eval_step(xb, yb)
            loss += float(out["loss_sum"])
            correct += float(out["correct"])
            times.append(time.time() - started)
        # The first evaluation after a rebuild traces the new evaluation step: a cost
        # of the structural change, as the first training step's is.
        self._eval_retrace += self._trace_cost("eval", times)
        n = max(len(labels), 1)
        return {"loss": loss / n, "accuracy": correct / n}

    def _trace_cost(self, kind, seconds):
        """What tracing after a rebuild cost the first of these timed calls (kind:
        "train" or "eval"); 0 unless a rebuild left the retrace pending.

        Every epoch's first batch is slower than the rest even on a graph already
        traced: its data pipeline starts (0.1-0.4 s a training epoch in quick searches,
        measured). So the first call after a compile costs its excess over the median
        of the later calls, less the median excess of the epochs that traced nothing;
        an epoch that traced nothing adds its excess to those and costs 0.
        """
        excess = _first_call_excess(seconds)
        pending, self._retrace_pending[kind] = self._retrace_pending[kind], False
        if self._traced[kind]:
            if len(seconds) > 1:
                self._warmups[kind].append(excess)
            return 0.0
        self._traced[kind] = True
        if not pending:     # a first trace (a new run, the final network): not a change's
            return 0.0
        warmups = self._warmups[kind]
        return max(0.0, excess - (float(np.median(warmups)) if warmups else 0.0))

    # ---- learning rates ---------------------------------------------------------------
    def _set_lrs(self, epoch):
        """Epoch mode: cosine over the run's epochs, each pattern from its own start."""
        if self.budgeted:
            return
        cfg = self.cfg
        for name in self.opt.lrs:
            if name == "gates":
                lr_max, start = cfg.gate_lr or cfg.lr_max, 0
            else:
                lr_max, start = cfg.lr_max, self.state.group_start.get(name, 0)
            lr = optim.cosine_lr(epoch, start, self.total_epochs, lr_max, cfg.lr_min)
            self.opt.set_lr(name, lr if self._arch_steps(name) else 0.0)

    def _arch_steps(self, group):
        """False for the "gates" group while the strategy holds the architecture still
        (a warm-up that trains the weights only)."""
        return group != "gates" or self.strategy.arch_trainable(self.state.epoch)

    def _progress_now(self, step=0):
        st = self.state
        return self.plan.progress(st.phase, st.phase_epochs, step)

    def _set_step_lrs(self, step):
        """Budget mode: cosine over the run's planned progress, set every step."""
        cfg = self.cfg
        p = self._progress_now(step)
        for name in self.opt.lrs:
            if name == "gates":
                lr_max, start = cfg.gate_lr or cfg.lr_max, 0.0
            else:
                lr_max, start = cfg.lr_max, float(self.state.group_start.get(name, 0.0))
            lr = optim.cosine_lr(p, start, 1.0, lr_max, cfg.lr_min)
            self.opt.set_lr(name, lr if self._arch_steps(name) else 0.0)

    # ---- the time budget --------------------------------------------------------------
    def _elapsed(self):
        """Seconds of the whole command so far, over every process of this run."""
        return self.state.wall_seconds + (time.time() - self.started)

    def _plan_phase(self, step_seconds):
        st = self.state
        n_val, n_test = len(self.splits.val[1]), len(self.splits.test[1])
        if st.phase == "final" and getattr(self, "_val_seconds", None) and n_val:
            if self.plan.reserve_for_finish(st.epoch, self._agree(self._val_seconds) / n_val,
                                            n_test, n_val):
                log.info("plan: %s", self.plan.log[-1]["why"])
        step_seconds = self._agree(step_seconds)
        if self._probing():
            steps = min(self.cfg.final_probe_steps, max(1, self._steps_per_epoch()))
            self.plan.fix_phase("final", st.epoch, steps, step_seconds,
                                f"the final network is only timed (final_probe_steps): one "
                                f"epoch of {steps} steps at {step_seconds:.3f} s/step measured")
            log.info("plan: %s", self.plan.log[-1]["why"])
            self._write_plan()
            return self.plan.phases["final"]
        seconds = self.plan.phase_seconds(st.phase, self._agree(self._elapsed()))
        if st.phase == "search":
            seconds = max(0.0, seconds - st.search_seconds)
        plan = self.plan.plan_phase(st.phase, st.epoch, seconds, step_seconds,
                                    max(1, self._steps_per_epoch()))
        log.info("plan: %s", self.plan.log[-1]["why"] + f" -> {plan.epochs} epochs of "
                 f"{plan.steps_per_epoch} steps")
        self._write_plan()
        return plan

    def _replan(self, phase):
        st = self.state
        if phase == "search":
            left = self.plan.phase_seconds("search", 0) - st.search_seconds
        else:
            left = self.plan.phase_seconds("final", self._agree(self._elapsed()))
        if self.plan.replan(phase, st.phase_epochs, left):
            log.info("plan: %s -> %d epochs", self.plan.log[-1]["why"],
                     self.plan.phases[phase].epochs)
            self._write_plan()

    def _write_plan(self):
        rd.write_json(os.path.join(self.run_dir, PLAN_FILE), self.plan.to_dict())

    # ---- structural changes -----------------------------------------------------------
    def _chiefs_genotype(self, g):
        if self.workers <= 1:
            return g
        return genotype_lib.Genotype.from_dict(self._from_chief(g.to_dict()))

    @_in_scope
    def _to_final(self, why):
        """Folds the strategy's final genotype into a network without pruners."""
        st = self.state
        if st.phase == "final":
            return "final"
        g = self._chiefs_genotype(self.strategy.final_genotype(self.net).canonical())
        self.net = self.net.final(g, aux_heads=True, drop_path=self.cfg.drop_path)
        st.phase, st.phase_epochs = "final", 0
        # The final network's first traces are not a search cost.
        self._retrace_pending = {"train": False, "eval": False}
        st.genotype = self.net.genotype.to_dict()
        self.opt = self._new_optimizer()
        self.arch_opt = None
        self._compile()
        self._same_start()
        self._write_genotype()
        probe = (f"; only timed over {self.cfg.final_probe_steps} steps (final_probe_steps)"
                 if self._probing() else "")
        return f"final network: {why}, {g.num_ops()} operations kept{probe}"

    @_in_scope
    def _rebuild(self, genotype, node_maps=None):
        started = time.time()
        self.net.rebuild(genotype, node_maps)
        self.state.genotype = self.net.genotype.to_dict()
        self.state.restructures += 1
        self.strategy.begin(self.net, fresh=False)
        self._compile()
        self._same_start()
        self._write_genotype()
        self._rebuild_clock += time.time() - started
        # The next epoch's first step and first validation batch trace the new step
        # functions: their extra time is part of this change's cost.
        self._retrace_pending = {"train": True, "eval": True}

    # ---- records, checkpoints ---------------------------------------------------------
    def _record(self, logs, val, elapsed, events, phase):
        st, cfg = self.state, self.cfg
        est = memory_lib.estimate(self.net.genotype, cfg.batch_size)
        r = {"epoch": st.epoch, "phase": phase, "params": self.net.count_params(),
             "cells": len(self.net.cells), "patterns": genotype_lib.num_patterns(self.net.genotype),
             "operations": self.net.genotype.num_ops(),
             "val_accuracy": val.get("accuracy"), "val_loss": val.get("loss"),
             "memory_mb": est["mb"], "memory_measured_mb": st.measured_mb,
             "memory_measured_source": st.measured_source, "flops": est["flops"],
             "lr": float(self.opt.lrs["0"].numpy()) if "0" in self.opt.lrs else None,
             "seconds": st.seconds, "epoch_seconds": elapsed, "events": events}
        r.update(self.strategy.record(self.net))
        r.update(logs)
        with self._writer.as_default(step=st.epoch):
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    tf.summary.scalar(k, v)
            for e in events:
                tf.summary.text("events", e)
        self._writer.flush()
        total = self.total_epochs if not self.budgeted else "?"
        val = ("not validated" if r["val_accuracy"] is None
               else f"val {r['val_accuracy']:.4f}")
        log.info("epoch %d/%s %s: loss %.4f acc %.4f %s params %d cells %d%s%s", st.epoch,
                 total, phase, r["train_loss"], r["train_accuracy"], val, r["params"], r["cells"],
                 "".join(f" {k} {v:.3f}" for k, v in self.strategy.record(self.net).items()
                         if isinstance(v, float)),
                 "".join(f" | {e}" for e in events))
        return r

    def _write_genotype(self):
        rd.atomic_write(os.path.join(self.run_dir, "genotype.json"),
                        self.net.current_genotype().canonical().to_json())

    def _arrays(self):
        arrays = {f"w/{v.path}": np.asarray(v.numpy()) for v in self.net.model.weights}
        arrays.update({f"opt/{k}": v for k, v in self.opt.state().items()})
        if self.arch_opt is not None:
            arrays.update({f"arch_opt/{k}": v for k, v in self.arch_opt.state().items()})
        return arrays

    def _save(self):
        st = self.state
        st.genotype = self.net.current_genotype().to_dict()
        st.strategy = self.strategy.state()
        st.plan = self.plan.to_dict() if self.plan is not None else None
        state = dataclasses.asdict(st)
        # The whole command's time so far, as a resumed process will count it.
        state["wall_seconds"] = self._elapsed()
        rd.write_metrics(os.path.join(self.run_dir, "metrics.jsonl"), self.records)
        rd.save_checkpoint(self.run_dir, self._arrays(), state)
        self._write_genotype()

    @_in_scope
    def _restore(self, arrays, state):
        state = dict(state) if isinstance(state, dict) else {}
        if state.get("version") != STATE_VERSION:
            raise rd.RunDirError(f"checkpoint state version {state.get('version')!r}; expected "
                                 f"{STATE_VERSION}: resume it with the bonsai-tf that wrote it, or "
                                 f"pass --overwrite to start over")
        try:
            self.state = State(**state)
            genotype_lib.Genotype.from_dict(self.state.genotype)
            self.strategy.load_state(self.state.strategy or {})
            self.plan = (budget_lib.Plan.from_dict(self.state.plan)
                         if self.state.plan is not None else None)
        except (TypeError, KeyError, ValueError, genotype_lib.GenotypeError) as e:
            where = os.path.join(self.run_dir, rd.CKPT)
            raise rd.RunDirError(f"checkpoint {where} has a malformed state.json ({e}); expected "
                                 f"one written by bonsai-tf: remove {where} to start over or pass "
                                 f"--overwrite") from None
        self._build_network()
        missing = []
        for v in self.net.model.weights:
            key = f"w/{v.path}"
            if key not in arrays:
                missing.append(v.path)
                continue
            if tuple(arrays[key].shape) != tuple(v.shape):
                raise rd.RunDirError(f"checkpoint variable {v.path} has shape "
                                     f"{arrays[key].shape}, the network expects {tuple(v.shape)}")
            v.assign(arrays[key])
        if missing:
            raise rd.RunDirError(f"checkpoint in {self.run_dir} lacks {len(missing)} variables "
                                 f"(first: {missing[0]}); expected a checkpoint of this network")
        self.opt.load_state({k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
        if self.arch_opt is not None:
            self.arch_opt.load_state({k[9:]: v for k, v in arrays.items()
                                      if k.startswith("arch_opt/")})
        self.strategy.begin(self.net, fresh=False)
        self._same_start()

    def _finish(self):
        st = self.state
        test = self.evaluate(*self.splits.test)
        final = self.net.final(self._chiefs_genotype(self.strategy.final_genotype(self.net))
                               if st.phase == "search" else self.net.genotype)
        g = final.genotype
        metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                   "params": final.count_params(), "cells": len(g.cells),
                   "operations": g.num_ops(), "genotype_hash": g.hash(),
                   "search_seconds": st.search_seconds,
                   "restructure_seconds": st.restructure_seconds,
                   "restructure_share": (st.restructure_seconds / st.search_seconds
                                         if st.search_seconds else None),
                   # What one change costs whatever the search's length: the share
                   # above falls as a search runs on after its last change, this does not.
                   "restructures": st.restructures,
                   "restructure_seconds_per_change": (st.restructure_seconds / st.restructures
                                                      if st.restructures else None),
                   "total_seconds": st.seconds, "epochs": st.epoch,
                   "memory_mb": memory_lib.estimate(g, self.cfg.batch_size)["mb"],
                   "memory_measured_mb": st.measured_mb,
                   "memory_measured_source": st.measured_source,
                   # None when no epoch was validated (no validation split, or a
                   # final-only run with final_with_val), not 0.
                   "best_val_accuracy": max((r["val_accuracy"] for r in self.records
                                             if r["val_accuracy"] is not None), default=None),
                   "flops": memory_lib.estimate(g, 1)["flops"]}
        metrics.update({k: v for k, v in self.strategy.record(self.net).items()
                        if k == "compression"})
        metrics.update(self.strategy.summary(final))
        metrics["examples"] = {k: int(len(getattr(self.splits, k)[1]))
                               for k in ("train", "val", "test")}
        # What the final network trained on (final_subset, final_with_val).
        metrics["examples"]["final"] = int(self._phase_count()) if st.phase == "final" else None
        if self.cfg.final_with_val:
            metrics["final_with_val"] = True
        metrics["wall_seconds"] = self._elapsed()  # the whole command so far, every process
        if self.cfg.final_probe_steps:
            # The test accuracy above is the found network's after its search and the
            # probe, not a trained final network's.
            metrics["final_probe_steps"] = self.cfg.final_probe_steps
        if self.budgeted:
            metrics["time_budget_seconds"] = self.plan.budget_seconds
            metrics["planned_epochs"] = {k: p.epochs for k, p in self.plan.phases.items()}
        rd.atomic_write(os.path.join(self.run_dir, "genotype.json"), g.to_json())
        save_model(network_lib.deployable(final), os.path.join(self.run_dir, MODEL_FILE))
        # metrics.json last: its presence marks a finished run.
        rd.write_json(os.path.join(self.run_dir, "metrics.json"), metrics)
        self.final_network = final
        return metrics


def _change_dict(change):
    """The structural part of a strategy's Change, as plain JSON."""
    maps = change.node_maps
    return {"genotype": None if change.genotype is None else change.genotype.to_dict(),
            "node_maps": None if maps is None else
            [[c, [[old, new] for old, new in m.items()]] for c, m in maps.items()]}


def _node_maps_from(pairs):
    if pairs is None:
        return None
    return {c: {old: new for old, new in m} for c, m in pairs}


def save_model(model, path):
    """Saves a Keras model atomically (Keras writes the file in place)."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise rd.RunDirError(f"cannot write {path}: {e.strerror or e}") from None


def _in_space_order(g):
    """`g` with each edge's operations in search-space order and inputs ascending.

    The checkpoint's state.json is written with sorted keys, which reorders the
    operations of an edge (and inputs "10" < "2"); that order decides summation
    order, gate order and drop-path seeds, so a restored network must use the
    order an uninterrupted run builds.
    """
    rank = {op: i for i, op in enumerate(space_lib.space_ops(g.space))}
    cells = tuple(dataclasses.replace(
        c, inputs=tuple(sorted(c.inputs)),
        edges=tuple(dataclasses.replace(e, ops=tuple(sorted(e.ops, key=lambda o: rank.get(o[0], len(rank)))))
                    for e in c.edges)) for c in g.cells)
    return dataclasses.replace(g, cells=cells)
