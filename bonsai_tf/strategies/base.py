"""The interface between the training loop (bonsai_tf.engine) and a search method.

The split follows KerasTuner's Oracle/Tuner and NNI's strategy/model-space split:
the engine owns everything that is the same for every method (the loop, the
compiled steps, the optimizers, the data, checkpoints, records, the time budget),
a strategy owns the decisions of one method and nothing else. The engine knows no
strategy by name; `bonsai_tf.strategies.get(name)` finds one.

A strategy answers seven questions:

  what the cells carry        `arch`: "saw" (a saw-gate pruner per operation and cell
                              input, BonsaiNet), "softmax" (one architecture weight
                              per operation, mixed by softmax(w / temperature) per
                              edge, ASAP), or "none" (a fixed network).
  what every step does        `after_train_step(net)`: a function traced into each
                              training step after the update (per-batch records);
  the extra loss terms        `loss(net)` returns a function of the step inputs
                              (`step_inputs`) traced into the training step;
                              `arch_loss(net)` one of the network's loss and the step
                              inputs, traced into the architecture step only (bi-level:
                              a score-function surrogate such as REINFORCE's).
  which variables step where  `arch_variables(net)`; with `bilevel` they step on the
                              validation split with their own optimizer (first-order),
                              else with the weights on the training split, in the
                              optimizer group "arch" at `arch_lr`.
  what happens between epochs `before_epoch` / `after_epoch` return a `Change`: a new
                              genotype (the engine rebuilds the model and retraces
                              the step), events for the log, a new pattern's index.
  when the search ends        `search_done`; the engine also ends it when the
                              planned search epochs (or time) are used up.
  the final genotype          `final_genotype(net)`.

A strategy that needs data between epochs (BayesNAS's Hessians) calls
`self.batches(n, epoch)`: n held-out batches (x, y) of the validation split (of the
training split where there is none), drawn from a seed fixed by the epoch. The engine
attaches it before the run starts (`attach`).

A strategy's own state (histories, counters, schedules) is plain JSON returned by
`state()` and given back by `load_state()`: it is written into every checkpoint,
so every strategy resumes after a kill as BonsaiNet does. Per-gate state that
must follow the gates (open/closed records) lives in the pruners' variables.
"""

import dataclasses


@dataclasses.dataclass
class Change:
    """What a strategy decided between epochs."""
    genotype: object = None       # genotype.Genotype to rebuild into, or None
    events: list = dataclasses.field(default_factory=list)
    new_pattern: int = None       # a grown pattern: its cells get their own lr schedule
    temperature: float = None     # arch "softmax": the mixing temperature from now on
    node_maps: dict = None        # {cell: {old node: new node}} where `genotype` renumbers

    def __bool__(self):
        return bool(self.genotype is not None or self.events or self.temperature is not None)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a strategy may know of the run besides its configuration."""
    input_shape: tuple
    num_classes: int
    max_patterns: int      # the pattern cap (configuration and spatial size)
    search_epochs: int     # epochs planned for the search (may be revised under a budget)


class Strategy:
    """Base class: a strategy that searches nothing (override what a method needs)."""

    name = "base"
    arch = "none"
    bilevel = False
    searches = True         # False: no search phase, the initial genotype is final

    def __init__(self, cfg, info):
        self.cfg, self.info = cfg, info
        self.batches = None

    def attach(self, batches):
        """The engine's `batches(n, epoch)` -> [(x, y)] of held-out data."""
        self.batches = batches

    # ---- structure ---------------------------------------------------------------
    def initial_genotype(self):
        raise NotImplementedError

    def final_genotype(self, net):
        return net.current_genotype().canonical()

    # ---- the training step -----------------------------------------------------------
    def step_inputs(self, net):
        """{name: float} fed to every training step of the coming epoch."""
        return {}

    def loss(self, net):
        """A function of the step inputs (dict of scalar tensors) giving the extra loss."""
        return None

    def arch_loss(self, net):
        """None, or a function of (the network's loss on the architecture batch, the step
        inputs) whose value is added to the architecture step's loss (bi-level strategies):
        a term for gradients that do not flow through the network, as REINFORCE's. It is
        given the loss before `loss(net)`'s extra terms."""
        return None

    def arch_variables(self, net):
        return []

    def arch_trainable(self, epoch):
        """Whether the architecture variables step during `epoch` (0-based)."""
        return True

    def after_train_step(self, net):
        """None, or a function of no arguments traced into every training step after the
        weights' update (SpiderNet: clamp the gates, count the batches they were open)."""
        return None

    def after_arch_step(self, net, arch_vars):
        """None, or a function of the values `arch_vars` had before the step, traced into
        every architecture step after the optimizer's update (bi-level strategies)."""
        return None

    # ---- between epochs -------------------------------------------------------------
    def begin(self, net, fresh):
        """Called after every (re)build of the network; `fresh` on a new run's first."""

    def before_epoch(self, epoch, net):
        return Change()

    def after_epoch(self, epoch, net):
        """`epoch` (1-based) has just ended and been validated."""
        return Change()

    def search_done(self, net):
        return False

    def record(self, net):
        """Extra per-epoch figures for metrics.jsonl (JSON values)."""
        return {}

    def summary(self, final):
        """Extra figures for metrics.json, given the final network (JSON values)."""
        return {}

    # ---- checkpoints ----------------------------------------------------------------
    def state(self):
        return {}

    def load_state(self, state):
        if state:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(state)}")
