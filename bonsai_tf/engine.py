"""One readable loop that runs a search (or a fixed/random network) in a run directory.

`Run` owns the network, the compiled steps, the optimizer and the search state.
Structural changes (deadheading, growth, the switch to the final network) happen
only between epochs; each is followed by a rebuild of the functional model from
the surviving layers, an optimizer `build` over the new variable set and a fresh
`tf.function`. State that a restart needs is written atomically at the end of
every epoch (see run_dir.py), so running the same command again resumes.
"""

import dataclasses
import logging
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import layers as L
from bonsai_tf import memory as memory_lib
from bonsai_tf import network as network_lib
from bonsai_tf import optim
from bonsai_tf import run_dir as rd
from bonsai_tf import space as space_lib

log = logging.getLogger("bonsai_tf")

GROW_AIM_HIGH = 0.9   # aim = e_c * 0.9 when e_c > AIM_SWITCH, else e_c * 0.66 (BONSAINET.md s5)
GROW_AIM_LOW = 0.66
AIM_SWITCH = 0.35
STATE_VERSION = 1


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class State:
    """Everything besides variables that a resumed run needs; plain JSON."""
    epoch: int = 0                       # completed epochs
    phase: str = "search"                # "search" or "final"
    genotype: dict = None                # the current network
    built_bytes: dict = None             # cell -> operation memory it was built with
    ratios: dict = None                  # pattern count -> e_c(n)
    cycles: int = 0                      # k: compression cycles so far
    cycle_start: int = 0                 # epoch at which the current cycle began
    last_deadhead: int = 0
    group_start: dict = None             # lr group -> epoch its schedule began
    search_seconds: float = 0.0
    seconds: float = 0.0
    measured_mb: float = None
    measured_source: str = None          # memory.StepMemory.source of measured_mb
    events: list = None
    version: int = STATE_VERSION


def _as_list(outs):
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


class Run:
    """Runs `config` (RunConfig) on `splits` (data.Splits) in `run_dir`."""

    def __init__(self, config, splits, run_dir, verbose=1):
        self.cfg, self.splits, self.run_dir, self.verbose = config, splits, run_dir, verbose
        info = splits.info
        self.input_shape = tuple(info.image_shape)
        # A constant channel (std 0) carries nothing to learn: standardise it to 0, not NaN.
        self.mean, self.std = tuple(info.mean), tuple(s if s > 0 else 1.0 for s in info.std)
        self.num_classes = info.num_classes
        self.augment = config.augment or info.augment
        self.total_epochs = config.epochs
        self.search_epochs = config.resolved_search_epochs
        spatial_cap = genotype_lib.max_patterns(
            config.patterns, -(-min(self.input_shape[:2]) // config.stem_stride),
            config.reduction_target)
        self.max_patterns = min(config.max_patterns or spatial_cap, spatial_cap)
        self.net = None
        self.state = None
        self.records = []
        self._writer = None

    # ---- set-up -------------------------------------------------------------------
    def _initial_state(self):
        cfg = self.cfg
        st = State(genotype=None, built_bytes={}, ratios={}, group_start={}, events=[])
        if cfg.strategy == "bonsai":
            start = genotype_lib.initial(cfg.space, self.input_shape, self.num_classes, cfg.scale,
                                         cfg.nodes, cfg.patterns, 1, cfg.init_weight,
                                         stem_stride=cfg.stem_stride)
            n = 1
            if cfg.memory_budget_mb > 0:
                budget = cfg.memory_budget_mb * 2**20
                n, ratios = memory_lib.size_budget(start, budget, cfg.batch_size, self.max_patterns,
                                                   len(space_lib.space_ops(cfg.space)))
                if n == 0:
                    need = memory_lib.estimate(start, cfg.batch_size)["mb"]
                    raise BudgetError(
                        f"memory_budget_mb = {cfg.memory_budget_mb:g} is too small for one pattern "
                        f"of cells: expected at least {need:.1f} MB at batch {cfg.batch_size} "
                        f"(scale {cfg.scale}, nodes {cfg.nodes})")
                st.ratios = {str(k): v for k, v in ratios.items()}
            g = start
            while genotype_lib.num_patterns(g) < n:
                g = genotype_lib.grow(g, cfg.init_weight)
            st.phase = "search" if self.search_epochs > 0 else "final"
            for p in range(n):
                st.group_start[str(p)] = 0
        else:
            g = genotype_lib.Genotype.load(cfg.genotype)
            if tuple(g.input_shape) != self.input_shape or g.num_classes != self.num_classes:
                raise genotype_lib.GenotypeError(
                    f"genotype {cfg.genotype} is for input {tuple(g.input_shape)} with "
                    f"{g.num_classes} classes; the dataset has {self.input_shape} and "
                    f"{self.num_classes}")
            if cfg.strategy == "random":
                found = g
                g = genotype_lib.random_like(
                    found, lambda c, src, op: memory_lib.edge_op_cost(found, c, src, op).bytes(1),
                    seed=cfg.seed)
            st.phase = "final"
            for p in range(genotype_lib.num_patterns(g)):
                st.group_start[str(p)] = 0
        st.genotype = g.to_dict()
        st.built_bytes = self._built_bytes(g, {})
        return st

    def _built_bytes(self, g, known):
        out = dict(known)
        costs = memory_lib.cell_op_bytes(g, self.cfg.batch_size)
        for c in range(len(g.cells)):
            if str(c) not in out:
                out[str(c)] = float(sum(costs[c].values()))
        return out

    def _build_network(self):
        cfg, st = self.cfg, self.state
        g = _in_space_order(genotype_lib.Genotype.from_dict(st.genotype))
        if st.phase == "search":
            self.net = network_lib.Network(g, self.mean, self.std, with_pruners=True,
                                           drop_path=cfg.drop_path, seed=cfg.seed)
        else:
            self.net = network_lib.Network(g, self.mean, self.std, with_pruners=False,
                                           drop_path=cfg.drop_path, seed=cfg.seed)
        self.opt = optim.MomentumSGD(cfg.momentum, cfg.weight_decay)
        self._compile()

    # ---- compiled steps ---------------------------------------------------------------
    def _groups(self):
        """Variables by lr group: one per pattern (its cells and head), gates separately."""
        g = self.net.genotype
        cell_pattern, count = {}, 0
        for p in range(genotype_lib.num_patterns(g)):
            for _ in genotype_lib.pattern_codes(g.patterns, p):
                cell_pattern[count] = p
                count += 1
        gate_ids = {id(p.w) for _, _, _, p in self.net.gates()}
        groups = {}
        for v in self.net.model.trainable_variables:
            top = v.path.split("/")[0]
            if id(v) in gate_ids:
                key = "gates"
            elif top.startswith("cell"):
                key = str(cell_pattern[int(top[4:])])
            elif top.startswith("head"):
                key = str(cell_pattern[int(top[4:])])
            else:
                key = "0"
            groups.setdefault(key, []).append(v)
        return [(k, vs, k != "gates") for k, vs in sorted(groups.items())]

    def _compile(self):
        cfg, net = self.cfg, self.net
        model = net.model
        self.variables = self.opt.build(self._groups())
        search = net.with_pruners
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if cfg.label_smoothing:
            loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                           label_smoothing=cfg.label_smoothing)
        smoothing, num_classes = cfg.label_smoothing, self.num_classes

        def ce(y, logits):
            if smoothing:
                return loss_fn(tf.one_hot(y, num_classes), logits)
            return loss_fn(y, logits)

        # Compression terms (BONSAINET.md s3): per cell, gated operation memory over
        # the memory the cell was built with, and its input gates over their count.
        op_terms, in_terms = [], []
        if search:
            costs = memory_lib.cell_op_bytes(net.genotype, cfg.batch_size)
            for c, cell in enumerate(net.cells):
                ops, ins = [], []
                for kind, key, p in cell.gates():
                    if kind == "op":
                        src, dst = _edge_src_dst(cell, key[0])
                        ops.append((p, costs[c][(src, dst, key[1])]))
                    else:
                        ins.append(p)
                if ops:
                    op_terms.append((ops, self.state.built_bytes[str(c)]))
                if ins:
                    in_terms.append((ins, float(c + 1)))
        aux_w, lam_e, lam_i = cfg.aux_weight, cfg.lambda_edge, cfg.lambda_input
        variables, opt = self.variables, self.opt

        def gate_vector(pruners):
            return L.saw_gate_value(tf.stack([p.w.value for p in pruners]))

        def compression(aim, pressure):
            # Gates of a cell are evaluated on their stacked weights: a few graph ops
            # per cell instead of a few per gate.
            terms = []
            if op_terms:
                soft = tf.stack([tf.reduce_sum(gate_vector([p for p, _ in ops])
                                               * tf.constant([m / built for _, m in ops]))
                                 for ops, built in op_terms])
                terms.append(lam_e * pressure * _safe_norm(aim - soft))
            if in_terms:
                ratio = tf.stack([tf.reduce_sum(gate_vector(ps)) / n for ps, n in in_terms])
                target = tf.constant([1.0 / n for _, n in in_terms])
                terms.append(lam_i * pressure * _safe_norm(target - ratio))
            return tf.add_n(terms) if terms else tf.constant(0.0)

        def train_step(x, y, aim, pressure):
            with tf.GradientTape() as tape:
                outs = _as_list(model(x, training=True))
                main = ce(y, outs[0])
                total = main
                if len(outs) > 1:
                    total = total + aux_w * tf.add_n([ce(y, o) for o in outs[1:]])
                comp = compression(aim, pressure) if search else tf.constant(0.0)
                total = total + comp
            grads = tape.gradient(total, variables)
            opt.apply(grads)
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(outs[0], -1), y), tf.float32))
            return {"loss": total, "ce": main, "compression_loss": comp, "correct": correct}

        def eval_step(x, y):
            logits = _as_list(model(x, training=False))[0]
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))
            return {"loss_sum": loss, "correct": correct}

        spec = [tf.TensorSpec((None,) + self.input_shape, tf.float32), tf.TensorSpec((None,), tf.int64)]
        scal = tf.TensorSpec((), tf.float32)
        self.train_step = tf.function(train_step, jit_compile=cfg.jit_compile or None,
                                      input_signature=spec + [scal, scal])
        self.eval_step = tf.function(eval_step, jit_compile=cfg.jit_compile or None,
                                     input_signature=spec)
        self.compression_loss = compression
        self._measure_next = cfg.measure_memory

    # ---- the loop -----------------------------------------------------------------
    def run(self):
        """Runs (or resumes) to the end; returns the final metrics dict."""
        from bonsai_tf import data as data_lib
        cfg = self.cfg
        ckpt = rd.load_checkpoint(self.run_dir)
        if ckpt is not None:
            arrays, state = ckpt
            self._restore(arrays, state)
            log.info("resuming %s at epoch %d (%s phase)", self.run_dir, self.state.epoch,
                     self.state.phase)
        else:
            keras.utils.set_random_seed(cfg.seed)
            self.state = self._initial_state()
            self._build_network()
            self._write_genotype()
            rd.write_json(os.path.join(self.run_dir, DATASET_FILE), dataclasses.asdict(self.splits.info))
        self.records = rd.read_metrics(os.path.join(self.run_dir, "metrics.jsonl"))[:self.state.epoch]
        self._writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard"))
        train_x, train_y = self.splits.train
        while self.state.epoch < self.total_epochs:
            st = self.state
            started = time.time()
            # Every random draw of an epoch (tf.data shuffle and augmentation seeds depend
            # on the global seed too) follows from (seed, epoch) alone, so a resumed run
            # draws exactly what an uninterrupted one does.
            keras.utils.set_random_seed(cfg.seed * 1000 + 500 + st.epoch)
            if st.phase == "search" and st.epoch >= self.search_epochs:
                self._to_final("search epochs used up")
                continue
            x, y = train_x, train_y
            subset = cfg.train_subset if st.phase == "search" else cfg.final_subset
            if subset and subset < len(x):
                x, y = x[:subset], y[:subset]  # data.load_dataset already shuffled (seeded)
            ds = data_lib.make_dataset(x, y, batch_size=cfg.batch_size, training=True,
                                       augment=self.augment, seed=cfg.seed * 100003 + st.epoch,
                                       drop_remainder=True)
            if cfg.steps_per_epoch:
                ds = ds.take(cfg.steps_per_epoch)
            self._set_lrs(st.epoch)
            self.net.reseed(st.epoch)
            logs = self._train_epoch(ds, st.epoch)
            # Validate the network that was trained this epoch, before any structural
            # change: a grown network's new head has not been trained yet.
            val = self.evaluate(*self.splits.val) if len(self.splits.val[1]) else {}
            events = []
            if st.phase == "search":
                for _, _, _, p in self.net.gates():
                    p.record()
                events += self._after_search_epoch(st.epoch + 1)
            elapsed = time.time() - started
            st.epoch += 1
            st.seconds += elapsed
            if st.phase == "search" or any(e.startswith("final") for e in events):
                st.search_seconds += elapsed
            record = self._record(logs, val, elapsed, events)
            self.records.append(record)
            st.events = (st.events or []) + [f"epoch {st.epoch}: {e}" for e in events]
            self._save()
        return self._finish()

    def _train_epoch(self, ds, epoch):
        st = self.state
        aim = tf.constant(self._aim() or 1.0, tf.float32)
        pressure = tf.constant(2.0 ** st.cycles, tf.float32)
        total = {"loss": 0.0, "ce": 0.0, "compression_loss": 0.0, "correct": 0.0}
        seen = steps = 0
        steps_total = self._steps_per_epoch()
        bar = keras.utils.Progbar(steps_total, stateful_metrics=["loss", "acc"],
                                  verbose=self.verbose) if self.verbose else None
        for xb, yb in ds:
            if self._measure_next and steps == 1:
                # The second step: the first one traced the graph.
                out = {}
                measured = memory_lib.measure_step_peak(
                    lambda: out.update(self.train_step(xb, yb, aim, pressure)))
                st.measured_mb, st.measured_source = measured.mb, measured.source
                self._measure_next = False
            else:
                out = self.train_step(xb, yb, aim, pressure)
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"training loss became {loss} at epoch {epoch + 1}, step {steps + 1}; expected a "
                    f"finite loss: lower --lr_max or check the data. The last good checkpoint in "
                    f"{self.run_dir} is kept")
            for k in total:
                total[k] += float(out[k]) * (1 if k == "correct" else int(yb.shape[0]))
            seen += int(yb.shape[0])
            steps += 1
            if steps == 2:
                rd.fault_point(f"mid_epoch:{epoch + 1}")
            if bar is not None:
                bar.update(steps, [("loss", total["loss"] / seen), ("acc", total["correct"] / seen)])
        seen = max(seen, 1)
        return {"train_loss": total["loss"] / seen, "train_ce": total["ce"] / seen,
                "compression_loss": total["compression_loss"] / seen,
                "train_accuracy": total["correct"] / seen, "steps": steps}

    def _steps_per_epoch(self):
        cfg, st = self.cfg, self.state
        n = len(self.splits.train[1])
        subset = cfg.train_subset if st.phase == "search" else cfg.final_subset
        if subset:
            n = min(n, subset)
        steps = n // cfg.batch_size
        return min(steps, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps

    def evaluate(self, images, labels, batch_size=256):
        from bonsai_tf import data as data_lib
        ds = data_lib.make_dataset(images, labels, batch_size=batch_size, training=False)
        loss = correct = 0.0
        for xb, yb in ds:
            out = self.eval_step(xb, yb)
            loss += float(out["loss_sum"])
            correct += float(out["correct"])
        n = max(len(labels), 1)
        return {"loss": loss / n, "accuracy": correct / n}

    def _set_lrs(self, epoch):
        cfg = self.cfg
        for name in self.opt.lrs:
            if name == "gates":
                lr_max = cfg.gate_lr or cfg.lr_max
                start = 0
            else:
                lr_max = cfg.lr_max
                start = self.state.group_start.get(name, 0)
            self.opt.set_lr(name, optim.cosine_lr(epoch, start, self.total_epochs, lr_max, cfg.lr_min))

    # ---- search decisions -------------------------------------------------------------
    def _patterns(self):
        return genotype_lib.num_patterns(self.net.genotype)

    def _target(self):
        return (self.state.ratios or {}).get(str(self._patterns()))

    def _aim(self):
        target = self._target()
        if target is None:
            # At the pattern cap (or without a budget) there is nothing to grow into:
            # compress towards the smallest keep ratio the budget plan ever asked for.
            ratios = [v for v in (self.state.ratios or {}).values()]
            target = min(ratios) if ratios else None
        if target is None:
            return None
        return target * (GROW_AIM_HIGH if target > AIM_SWITCH else GROW_AIM_LOW)

    def compression(self):
        """Hard compression: memory of operations whose gate is open over all built."""
        g = self.net.current_genotype()
        costs = memory_lib.cell_op_bytes(g, self.cfg.batch_size)
        alive = 0.0
        for c, cell in enumerate(g.cells):
            for e in cell.edges:
                for op, w in e.ops:
                    if w > 0 or not self.net.with_pruners:
                        alive += costs[c][(e.src, e.dst, op)]
        built = sum(self.state.built_bytes.values())
        return alive / built if built else 1.0

    def _after_search_epoch(self, epochs_done):
        cfg, st = self.cfg, self.state
        events = []
        if epochs_done - st.last_deadhead >= cfg.prune_interval:
            msg = self._deadhead()
            st.last_deadhead = epochs_done
            if msg:
                events.append(msg)
        target = self._target()
        comp = self.compression()
        if target is not None and comp < target and self._patterns() < self.max_patterns:
            events.append(self._grow(epochs_done))
            st.cycles, st.cycle_start = 0, epochs_done
        elif epochs_done - st.cycle_start >= cfg.cycle_len:
            st.cycles += 1
            st.cycle_start = epochs_done
            events.append(f"compression cycle {st.cycles}: pressure x{2 ** st.cycles}")
        if epochs_done >= self.search_epochs:
            events.append(self._to_final("search finished"))
        return events

    def _deadhead(self):
        """Removes, for good, every operation and input whose gate stayed closed."""
        net = self.net
        g = net.current_genotype()
        removed_ops = removed_inputs = 0
        cells = []
        for c, (spec, cell) in enumerate(zip(g.cells, net.cells)):
            dead = []
            for e in spec.edges:
                edge = cell.edges[L.edge_name(e.src, e.dst)]
                for (op, w), p in zip(e.ops, edge.pruners):
                    if p is not None and float(p.records.numpy()) > 0 and float(p.open_records.numpy()) == 0:
                        dead.append((w, "op", (e.src, e.dst, op)))
            for j, w in spec.inputs:
                p = cell.y_gates.get(str(j))
                if p is not None and float(p.records.numpy()) > 0 and float(p.open_records.numpy()) == 0:
                    dead.append((w, "input", j))
            # Most closed first; skip a removal that would disconnect the cell's output.
            for _, kind, key in sorted(dead, key=lambda t: t[0]):
                trial = _remove(spec, kind, key)
                if genotype_lib._reaches_output(trial):
                    spec = trial
                    if kind == "op":
                        removed_ops += 1
                    else:
                        removed_inputs += 1
            cells.append(spec)
        new = dataclasses.replace(g, cells=tuple(cells)).canonical()
        for _, _, _, p in net.gates():
            p.reset_records()
        if new.num_ops() == g.num_ops() and not removed_inputs:
            return None
        lost = g.num_ops() - new.num_ops()
        self._rebuild(new)
        rd.fault_point("deadhead")
        return (f"deadhead: removed {lost} operations"
                + (f", {removed_inputs} inputs" if removed_inputs else ""))

    def _grow(self, epochs_done):
        g = genotype_lib.grow(self.net.current_genotype(), self.cfg.init_weight)
        before = len(self.net.cells)
        p = genotype_lib.num_patterns(g) - 1
        self.state.group_start[str(p)] = epochs_done
        self.state.built_bytes = self._built_bytes(g, self.state.built_bytes)
        # New cells draw their initial weights from a seed fixed by the epoch, so a
        # resumed run grows exactly the cells an uninterrupted one would.
        keras.utils.set_random_seed(self.cfg.seed * 1000 + epochs_done)
        self._rebuild(g)
        rd.fault_point("grow")
        return f"grow: pattern {p + 1}, cells {before}-{len(g.cells) - 1}"

    def _to_final(self, why):
        """Folds the gates: closed operations go, open ones become plain operations."""
        st = self.state
        if st.phase == "final":
            return "final"
        g = self.net.closed_removed().canonical()
        self.net = self.net.final(g, aux_heads=True, drop_path=self.cfg.drop_path)
        st.phase = "final"
        st.genotype = self.net.genotype.to_dict()
        self.opt = optim.MomentumSGD(self.cfg.momentum, self.cfg.weight_decay)
        self._compile()
        self._write_genotype()
        return f"final network: {why}, {g.num_ops()} operations kept"

    def _rebuild(self, genotype):
        self.net.rebuild(genotype)
        self.state.genotype = self.net.genotype.to_dict()
        self._compile()
        self._write_genotype()

    # ---- records, checkpoints ---------------------------------------------------------
    def _record(self, logs, val, elapsed, events):
        st, cfg = self.state, self.cfg
        est = memory_lib.estimate(self.net.genotype, cfg.batch_size)
        target = self._target() if st.phase == "search" else None
        r = {"epoch": st.epoch, "phase": st.phase, "params": self.net.count_params(),
             "cells": len(self.net.cells), "patterns": self._patterns(),
             "compression": self.compression(), "target": target,
             "aim": self._aim() if st.phase == "search" else None,
             "cycles": st.cycles, "operations": self.net.genotype.num_ops(),
             "val_accuracy": val.get("accuracy"), "val_loss": val.get("loss"),
             "memory_mb": est["mb"], "memory_measured_mb": st.measured_mb,
             "memory_measured_source": st.measured_source, "flops": est["flops"],
             "lr": float(self.opt.lrs["0"].numpy()) if "0" in self.opt.lrs else None,
             "seconds": st.seconds, "epoch_seconds": elapsed, "events": events}
        r.update({k: v for k, v in logs.items() if k != "steps"})
        with self._writer.as_default(step=st.epoch):
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    tf.summary.scalar(k, v)
            for e in events:
                tf.summary.text("events", e)
        self._writer.flush()
        log.info("epoch %d/%d %s: loss %.4f acc %.4f val %.4f params %d cells %d compression "
                 "%.3f%s", st.epoch, self.total_epochs, st.phase, r["train_loss"],
                 r["train_accuracy"], r["val_accuracy"] or float("nan"), r["params"], r["cells"],
                 r["compression"], "".join(f" | {e}" for e in events))
        return r

    def _write_genotype(self):
        rd.atomic_write(os.path.join(self.run_dir, "genotype.json"),
                        self.net.current_genotype().canonical().to_json())

    def _arrays(self):
        arrays = {f"w/{v.path}": np.asarray(v.numpy()) for v in self.net.model.weights}
        arrays.update({f"opt/{k}": v for k, v in self.opt.state().items()})
        return arrays

    def _save(self):
        st = self.state
        st.genotype = self.net.current_genotype().to_dict()
        state = dataclasses.asdict(st)
        rd.write_metrics(os.path.join(self.run_dir, "metrics.jsonl"), self.records)
        rd.save_checkpoint(self.run_dir, self._arrays(), state)
        self._write_genotype()

    def _restore(self, arrays, state):
        state = dict(state) if isinstance(state, dict) else {}
        if state.get("version") != STATE_VERSION:
            raise rd.RunDirError(f"checkpoint state version {state.get('version')!r}; expected "
                                 f"{STATE_VERSION}: resume it with the bonsai-tf that wrote it, or "
                                 f"pass --overwrite to start over")
        try:
            self.state = State(**state)
            genotype_lib.Genotype.from_dict(self.state.genotype)
        except (TypeError, genotype_lib.GenotypeError) as e:
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

    def _finish(self):
        st = self.state
        test = self.evaluate(*self.splits.test)
        final = self.net.final(self.net.closed_removed())
        g = final.genotype
        metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                   "params": final.count_params(), "cells": len(g.cells),
                   "operations": g.num_ops(), "genotype_hash": g.hash(),
                   "compression": self.compression(), "search_seconds": st.search_seconds,
                   "total_seconds": st.seconds, "epochs": st.epoch,
                   "memory_mb": memory_lib.estimate(g, self.cfg.batch_size)["mb"],
                   "memory_measured_mb": st.measured_mb,
                   "memory_measured_source": st.measured_source,
                   "best_val_accuracy": max((r["val_accuracy"] or 0.0 for r in self.records),
                                            default=None),
                   "flops": memory_lib.estimate(g, 1)["flops"]}
        rd.atomic_write(os.path.join(self.run_dir, "genotype.json"), g.to_json())
        save_model(network_lib.deployable(final), os.path.join(self.run_dir, MODEL_FILE))
        # metrics.json last: its presence marks a finished run.
        rd.write_json(os.path.join(self.run_dir, "metrics.json"), metrics)
        self.final_network = final
        return metrics


MODEL_FILE = "model.keras"      # the final, deployable network (no pruners, no aux heads)
DATASET_FILE = "dataset.json"   # data.DatasetInfo of the run: shape, classes, mean/std


def save_model(model, path):
    """Saves a Keras model atomically (Keras writes the file in place)."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise rd.RunDirError(f"cannot write {path}: {e.strerror or e}") from None


class BudgetError(ValueError):
    """The memory budget cannot hold even the smallest network."""


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


def _safe_norm(v):
    # tf.norm's gradient is NaN at 0, which a cell with one input reaches at once.
    return tf.sqrt(tf.reduce_sum(tf.square(v)) + 1e-12)


def _edge_src_dst(cell, key):
    for e in cell.cell.edges:
        if L.edge_name(e.src, e.dst) == key:
            return e.src, e.dst
    raise KeyError(key)


def _remove(spec, kind, key):
    if kind == "input":
        return dataclasses.replace(spec, inputs=tuple((j, w) for j, w in spec.inputs if j != key))
    src, dst, op = key
    return dataclasses.replace(spec, edges=tuple(
        dataclasses.replace(e, ops=tuple((o, w) for o, w in e.ops if o != op))
        if (e.src, e.dst) == (src, dst) else e for e in spec.edges))
