"""The validated, frozen configuration of a run (what entry scripts build from flags)."""

import dataclasses
import json
import math

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import machine
from bonsai_tf import space as space_lib

# The names strategies.get knows (a test keeps the two in step; this module imports
# no TensorFlow, so the lists cannot be read from the strategies themselves).
STRATEGIES = ("bonsai", "asap", "bayes", "proxyless", "spider", "random", "fixed")
SEARCHING = ("bonsai", "asap", "bayes", "proxyless", "spider")
AUGMENT = ("", "none", "crop", "crop_flip", "crop_flip_cutout")  # data.AUGMENT_POLICIES and ''
# ProxylessNAS's gradient to the alphas (strategies/proxyless.py): BinaryConnect through
# two-path gates, or REINFORCE over one path drawn from the full softmax.
PROXYLESS_GRADS = ("binaryconnect", "reinforce")
LATENCY_SELECTS = ("measured", "table", "argmax")
DISTRIBUTE = ("none", "mirrored", "multi_worker")


class ConfigError(ValueError):
    """A configuration value out of range or of the wrong type."""


def pattern_cap(cfg, image_shape):
    """How many patterns a run of `cfg` on images of `image_shape` may grow to.

    The spatial size after the stem must stay >= reduction_target through every
    reduction (genotype.max_patterns), and --max_patterns caps it further. A
    configuration that leaves not even one pattern is refused here, before any
    network is built.
    """
    h, w = image_shape[:2]
    spatial = -(-min(h, w) // cfg.stem_stride)
    if cfg.strategy == "spider":
        # SpiderNet's network is its reductions + 1 cells, each after the first a reduction.
        size = spatial
        for _ in range(cfg.reductions):
            if size < 2 * cfg.reduction_target - 1:
                raise ConfigError(f"{h}x{w} images with stem stride {cfg.stem_stride} are "
                                  f"{spatial} pixels across after the stem, too small for "
                                  f"{cfg.reductions} reductions with reduction_target "
                                  f"{cfg.reduction_target}; expected fewer --reductions or a "
                                  f"smaller --reduction_target or --stem_stride")
            size = genotype_lib.halve(size)
        return cfg.reductions + 1
    cap = genotype_lib.max_patterns(cfg.patterns, spatial, cfg.reduction_target)
    if cap < 1:
        first = [list(p) for p in cfg.patterns[:1]]
        raise ConfigError(f"{h}x{w} images with stem stride {cfg.stem_stride} are {spatial} "
                          f"pixels across after the stem, too small for one pattern {first} "
                          f"with reduction_target {cfg.reduction_target}; expected a smaller "
                          f"--reduction_target or --stem_stride, larger --image_size, or a "
                          f"first pattern with fewer reductions")
    return min(cfg.max_patterns or cap, cap)


VAL_SIZE_EXPECTED = ("a count >= 0 of training examples (e.g. 5000) or a fraction in (0, 1) "
                     "of the training split (e.g. 0.1)")


def _val_size(v):
    """`v` as an int count or a float fraction in (0, 1), else ConfigError.

    A whole float (5000.0, as a float flag or JSON may give it) is the count.
    """
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and v >= 1:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            isinstance(v, int) and v < 0) or (isinstance(v, float) and not 0 <= v < 1):
        raise ConfigError(f"val_size = {v!r}; expected {VAL_SIZE_EXPECTED}")
    return 0 if v == 0 else v


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = "fashion_mnist"
    data_dir: str = ""
    val_size: int = 5000           # a count, or a float in (0, 1): that fraction of the train split
    train_subset: int = 0          # 0 = all; searches may use a subset
    final_subset: int = 0          # 0 = all training data for the final network
    # The final network also trains on the validation examples (the DARTS protocol's final
    # training on the whole training split); its epochs are then not validated. The search
    # still validates on them, and the test split stays unseen until the end.
    final_with_val: bool = False
    image_size: tuple = ()         # folder datasets: resize to (h, w)
    augment: str = ""              # "" = the dataset's default policy
    # search space
    strategy: str = "bonsai"
    space: str = "bonsai7"
    scale: int = 16
    nodes: int = 4
    stem_stride: int = 1           # 2: halve the resolution in the stem (cheap CPU searches)
    patterns: tuple = (("n", "na"), ("r",))
    max_patterns: int = 0          # 0 = as many as the spatial size allows
    reduction_target: int = 2
    init_weight: float = 0.1
    genotype: str = ""             # strategy random/fixed: the genotype file to match/train
    # schedule
    epochs: int = 600              # search + final, as in BonsaiNet
    search_epochs: int = 0         # 0 = half of `epochs`
    batch_size: int = 64
    lr_max: float = 0.01
    lr_min: float = 0.0
    gate_lr: float = 0.0           # 0 = same as lr_max, cosine like the rest
    momentum: float = 0.9
    weight_decay: float = 3e-4
    drop_path: float = 0.3
    aux_weight: float = 0.2
    label_smoothing: float = 0.0
    # compression and growth
    lambda_edge: float = 0.01
    lambda_input: float = 0.01
    prune_interval: int = 4
    cycle_len: int = 8
    settle_epochs: int = 0         # end the search this many epochs after its last change
                                   # at the pattern cap (0 = search for all its epochs)
    memory_budget_mb: float = 0.0  # 0 = no growth beyond the initial network
    # bi-level strategies (ASAP): the architecture's optimizer
    arch_lr: float = 3e-4
    # ASAP (METHODS.md): tau = tau0 * beta^epoch; prune below threshold / ops on the edge
    asap_tau0: float = 1.6
    asap_beta: float = 0.95
    asap_threshold: float = 0.4
    # BayesNAS (METHODS.md): group-lasso lambdas of edge (parent) and operation (child)
    # switches (the authors' runs used 0.01, 0.007 and 0.005), the gamma below which a
    # switch is pruned, the Hessian estimator and its held-out batches, warm-up epochs
    bayes_lambda_edge: float = 0.01
    bayes_lambda_op: float = 0.01
    bayes_threshold: float = 0.01
    bayes_hessian: str = "hutchinson"
    bayes_hessian_batches: int = 8
    bayes_warmup_epochs: int = 1
    # ProxylessNAS (METHODS.md): epochs of weights only, on uniformly drawn paths
    proxyless_warmup_epochs: int = 1
    proxyless_grad: str = "binaryconnect"   # or "reinforce" (PROXYLESS_GRADS)
    # ProxylessNAS's hardware term: w * log(E[latency] / target)^2 with E from the batch-1
    # TFLite latency table measured on this machine (int8 or float); 0 = no term
    latency_target_ms: float = 0.0
    latency_weight: float = 1.0
    latency_int8: bool = True
    # ProxylessNAS's final network under a target: the most probable one found at or below
    # it, timed here ("measured") or predicted by the table ("table"); or the plain
    # argmax ("argmax", the paper's rule) (LATENCY_SELECTS)
    latency_select: str = "measured"
    # SpiderNet (METHODS.md): reductions + 1 cells grown by edge splits in rounds of
    # round_epochs epochs; deadhead below the open share; candidate edges per cell and
    # round (0 = all); the batches of the train-free scores
    reductions: int = 2
    round_epochs: int = 4
    spider_rounds: int = 30
    spider_deadhead: float = 0.25
    spider_candidates: int = 2
    spider_ntk_batch: int = 8
    spider_regions_batch: int = 2000
    # the wall-clock budget of the whole command (0 = none: `epochs` count instead)
    time_budget_minutes: float = 0.0
    search_fraction: float = 0.35  # of the training time under a budget
    # run
    seed: int = 0
    deterministic: bool = False
    jit_compile: bool = False
    graph_optimizer: str = "auto"   # Grappler: auto (off without a GPU), on, off
    mixed_precision: str = "none"   # or mixed_float16 (loss-scaled), mixed_bfloat16
    # tf.distribute (bonsai_tf/distribute.py): none, mirrored (this machine's devices; a
    # GPU-less CPU split into `devices` logical ones, 0 = 2), multi_worker (TF_CONFIG)
    distribute: str = "none"
    devices: int = 0
    steps_per_epoch: int = 0       # 0 = one pass over the training data
    # > 0: once the search ends, the final network is only timed, over one epoch of at
    # most this many steps, and the run finishes: for search runs whose found network is
    # trained elsewhere (bench/compare.py retrains it from scratch), which would otherwise
    # spend the rest of their budget training a network nobody uses.
    final_probe_steps: int = 0
    measure_memory: bool = True

    def __post_init__(self):
        def check(cond, name, expected):
            if not cond:
                raise ConfigError(f"{name} = {getattr(self, name)!r}; expected {expected}")
        ints = ("train_subset", "final_subset", "scale", "nodes", "stem_stride", "max_patterns",
                "reduction_target", "epochs", "search_epochs", "batch_size", "prune_interval",
                "cycle_len", "settle_epochs", "seed", "steps_per_epoch", "bayes_hessian_batches",
                "bayes_warmup_epochs", "proxyless_warmup_epochs", "reductions", "round_epochs",
                "spider_rounds", "spider_candidates", "spider_ntk_batch", "spider_regions_batch",
                "devices", "final_probe_steps")
        for name in ints:
            check(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                  name, "an integer")
        floats = ("init_weight", "lr_max", "lr_min", "gate_lr", "momentum", "weight_decay",
                  "drop_path", "aux_weight", "label_smoothing", "lambda_edge", "lambda_input",
                  "memory_budget_mb", "arch_lr", "asap_tau0", "asap_beta", "asap_threshold",
                  "bayes_lambda_edge", "bayes_lambda_op", "bayes_threshold",
                  "latency_target_ms", "latency_weight", "spider_deadhead",
                  "time_budget_minutes", "search_fraction")
        for name in floats:
            check(isinstance(getattr(self, name), (int, float)) and not isinstance(
                getattr(self, name), bool), name, "a number")
        check(self.strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}")
        if self.strategy in ("random", "fixed"):
            # No search: a flagfile's search_epochs (say the quick one's 5 with a shorter
            # --epochs for a retraining) must not make the run invalid.
            object.__setattr__(self, "search_epochs", 0)
        object.__setattr__(self, "val_size", _val_size(self.val_size))
        check(self.augment in AUGMENT, "augment", f"one of {AUGMENT} ('' = the dataset's default)")
        check(self.graph_optimizer in machine.GRAPH_OPTIMIZER_CHOICES, "graph_optimizer",
              f"one of {machine.GRAPH_OPTIMIZER_CHOICES}")
        check(self.mixed_precision in machine.PRECISIONS, "mixed_precision",
              f"one of {machine.PRECISIONS}")
        check(self.distribute in DISTRIBUTE, "distribute", f"one of {DISTRIBUTE}")
        check(self.devices >= 0, "devices", ">= 0 (0 = every GPU, or 2 CPU devices)")
        check(not (self.jit_compile and self.distribute != "none"), "jit_compile",
              "False with distribute != 'none' (XLA is for one device here)")
        check(self.space in space_lib.SPACES, "space", f"one of {sorted(space_lib.SPACES)}")
        check(self.scale >= 1, "scale", ">= 1")
        check(1 <= self.nodes <= 16, "nodes", "in [1, 16]")
        check(self.stem_stride in (1, 2), "stem_stride", "1 or 2")
        check(self.max_patterns >= 0, "max_patterns", ">= 0")
        check(self.reduction_target >= 1, "reduction_target", ">= 1")
        check(self.epochs >= 1, "epochs", ">= 1")
        check(0 <= self.search_epochs <= self.epochs, "search_epochs", f"in [0, epochs={self.epochs}]")
        check(self.batch_size >= 1, "batch_size", ">= 1")
        check(self.train_subset >= 0, "train_subset", ">= 0")
        check(self.final_subset >= 0, "final_subset", ">= 0")
        check(self.lr_max > 0, "lr_max", "> 0")
        check(0 <= self.lr_min <= self.lr_max, "lr_min", f"in [0, lr_max={self.lr_max}]")
        check(self.gate_lr >= 0, "gate_lr", ">= 0")
        check(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", ">= 0")
        check(0 <= self.drop_path < 1, "drop_path", "in [0, 1)")
        check(self.aux_weight >= 0, "aux_weight", ">= 0")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")
        check(self.lambda_edge >= 0, "lambda_edge", ">= 0")
        check(self.lambda_input >= 0, "lambda_input", ">= 0")
        check(self.prune_interval >= 1, "prune_interval", ">= 1")
        check(self.cycle_len >= 1, "cycle_len", ">= 1")
        check(self.settle_epochs >= 0, "settle_epochs", ">= 0 (0 = search for all its epochs)")
        check(self.memory_budget_mb >= 0, "memory_budget_mb", ">= 0 (0 = no growth)")
        check(self.arch_lr > 0, "arch_lr", "> 0")
        check(self.asap_tau0 > 0, "asap_tau0", "> 0")
        check(0 < self.asap_beta <= 1, "asap_beta", "in (0, 1]")
        check(0 <= self.asap_threshold < 1, "asap_threshold", "in [0, 1)")
        check(self.bayes_lambda_edge > 0, "bayes_lambda_edge", "> 0")
        check(self.bayes_lambda_op > 0, "bayes_lambda_op", "> 0")
        check(self.bayes_threshold >= 0, "bayes_threshold", ">= 0 (0 = never prune)")
        check(self.bayes_hessian in ("hutchinson", "exact"), "bayes_hessian",
              "hutchinson or exact")
        check(self.bayes_hessian_batches >= 1, "bayes_hessian_batches", ">= 1")
        check(self.bayes_warmup_epochs >= 0, "bayes_warmup_epochs", ">= 0")
        check(self.time_budget_minutes >= 0 and math.isfinite(self.time_budget_minutes),
              "time_budget_minutes", ">= 0 (0 = no budget: --epochs count)")
        check(0 < self.search_fraction < 1, "search_fraction", "in (0, 1)")
        if self.strategy in ("asap", "proxyless"):
            # Its architecture steps on held-out batches (first-order bi-level).
            check(self.val_size != 0, "val_size", f"> 0 with strategy={self.strategy} (the "
                  f"architecture weights step on the validation split)")
        check(self.proxyless_warmup_epochs >= 0, "proxyless_warmup_epochs", ">= 0")
        check(self.proxyless_grad in PROXYLESS_GRADS, "proxyless_grad",
              f"one of {PROXYLESS_GRADS}")
        check(self.latency_select in LATENCY_SELECTS, "latency_select",
              f"one of {LATENCY_SELECTS}")
        check(self.latency_target_ms >= 0 and math.isfinite(self.latency_target_ms),
              "latency_target_ms", ">= 0 (0 = no latency term)")
        check(self.latency_weight >= 0, "latency_weight", ">= 0")
        check(0 <= self.reductions <= 8, "reductions", "in [0, 8]")
        check(self.round_epochs >= 1, "round_epochs", ">= 1")
        check(self.spider_rounds >= 1, "spider_rounds", ">= 1")
        check(0 <= self.spider_deadhead < 1, "spider_deadhead", "in [0, 1)")
        check(self.spider_candidates >= 0, "spider_candidates", ">= 0 (0 = every edge)")
        check(self.spider_ntk_batch >= 2, "spider_ntk_batch", ">= 2")
        check(self.spider_regions_batch >= 1, "spider_regions_batch", ">= 1")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", ">= 0")
        check(self.final_probe_steps >= 0, "final_probe_steps",
              ">= 0 (0 = train the final network fully)")
        check(not (self.final_probe_steps and self.strategy not in SEARCHING),
              "final_probe_steps", f"0 with strategy={self.strategy} (it trains only a final "
              f"network: there is no search to stop after)")
        check(isinstance(self.final_with_val, bool), "final_with_val", "True or False")
        check(not (self.final_with_val and self.val_size == 0), "final_with_val",
              "False with val_size=0 (no examples are held out to add to the final training)")
        check(self.seed >= 0, "seed", ">= 0")
        check(self.init_weight > 0, "init_weight", "> 0 (gates start open)")
        check(len(self.image_size) in (0, 2) and all(isinstance(v, int) and v > 0
                                                     for v in self.image_size),
              "image_size", "empty or (height, width) of positive ints")
        try:
            patterns = genotype_lib.parse_patterns(self.patterns)
        except genotype_lib.GenotypeError as e:
            raise ConfigError(str(e)) from None
        object.__setattr__(self, "patterns", patterns)
        object.__setattr__(self, "image_size", tuple(self.image_size))
        if self.strategy in ("random", "fixed"):
            check(bool(self.genotype), "genotype", f"a genotype file with strategy={self.strategy}")

    @property
    def resolved_search_epochs(self):
        if self.strategy not in SEARCHING:
            return 0
        return self.search_epochs or self.epochs // 2

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["patterns"] = [list(p) for p in self.patterns]
        d["image_size"] = list(self.image_size)
        return d

    def to_json(self):
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def defaults(cls):
        """The defaults as a config.json holds them. A field added after a run was made is
        absent from its config.json, and the run behaved as the field's default does (a new
        field's default keeps the old behaviour): read such a file over these."""
        return json.loads(cls().to_json())

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)}; expected a subset of "
                              f"{sorted(fields)}")
        d = dict(d)
        if "patterns" in d:
            d["patterns"] = tuple(tuple(p) for p in d["patterns"])
        if "image_size" in d:
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)

    # Fields that do not change what a run computes: a resumed run may differ in them.
    # Settings that change how a run computes, not what: a run may resume under others
    # (a mirrored run's steps are one device's, summed over replicas).
    NON_IDENTITY = ("measure_memory", "jit_compile", "graph_optimizer", "data_dir",
                    "distribute", "devices")

    def identity(self):
        d = self.to_dict()
        for k in self.NON_IDENTITY:
            d.pop(k, None)
        return d
