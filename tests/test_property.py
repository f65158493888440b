"""Property test: any configuration a user can give builds, grows, prunes and folds, or is
refused at configuration time with one line (issue 7).

Random cases (seeded): image size 8 to 64, square or not, 1 or 3 channels, stem
stride 1 or 2, 2 to 4 nodes, every search space, several pattern lists and
reduction targets. For each, the whole life of a network is walked through at the
genotype level with the code the engine uses (growth to the pattern cap, a random
deadhead that closes every gate of one cell, the final genotype read off the
gates), and the shapes every layer will see are checked; a seeded share of the
cases also builds the real Keras supernet at its cap, grows it there through
rebuilds, and runs a training step of the folded final network.
"""

import dataclasses
import random

import numpy as np
import pytest

from bonsai_tf import config as config_lib
from bonsai_tf import genotype as G
from bonsai_tf import memory as M
from bonsai_tf import space as S

CASES = 400
BUILT = 24            # cases that also build and step real Keras networks
PATTERNS = ([["n"], ["r"]], [["n", "na"], ["r"]], [["n", "r"]], [["n"], ["n", "r"]],
            [["na", "n"], ["ra"]])


def draw(seed):
    rng = random.Random(seed)
    h = rng.randint(8, 64)
    w = h if rng.random() < 0.5 else rng.randint(8, 64)
    return dict(image=(h, w, rng.choice([1, 3])), stem_stride=rng.choice([1, 2]),
                nodes=rng.randint(2, 4), space=rng.choice(sorted(S.SPACES)),
                patterns=rng.choice(PATTERNS), reduction_target=rng.choice([1, 2, 3]),
                classes=rng.randint(2, 10), max_patterns=rng.choice([0, 0, 2, 3]))


def configure(case):
    """The run configuration, or the one-line ConfigError a user would see."""
    cfg = config_lib.RunConfig(space=case["space"], scale=2, nodes=case["nodes"],
                               stem_stride=case["stem_stride"], patterns=case["patterns"],
                               reduction_target=case["reduction_target"],
                               max_patterns=case["max_patterns"], epochs=2, search_epochs=1)
    cap = config_lib.pattern_cap(cfg, case["image"])
    return cfg, cap


def spatial_walk(g):
    """The (h, w) every cell sees, as the layers compute it; checks every y input
    reaches x's size through the stride the network will use."""
    shapes = [M.stem_shape(g)[:2]]
    for cell in g.cells:
        x = shapes[-1]
        for j, _ in cell.inputs:
            s = G.subsample_stride(shapes[j], x)
            assert (-(-shapes[j][0] // s), -(-shapes[j][1] // s)) == x
        shapes.append((G.halve(x[0]), G.halve(x[1])) if cell.reduction else x)
    assert min(shapes[-1]) >= 1
    return shapes


def life(case, seed):
    """Grow to the cap, deadhead at random (a whole cell closed), read off the final."""
    cfg, cap = configure(case)
    g = G.initial(cfg.space, case["image"], case["classes"], cfg.scale, cfg.nodes,
                  cfg.patterns, 1, stem_stride=cfg.stem_stride)
    stages = [g]
    while G.num_patterns(g) < cap:
        g = G.grow(g)
        stages.append(g)
    spatial_walk(g)
    rng = random.Random(seed)
    shut = rng.randrange(len(g.cells))
    cells = []
    for c, cell in enumerate(g.cells):
        # Gates: closed (negative weight) at random, every one of cell `shut`.
        closed = 1.0 if c == shut else rng.random()
        cell = dataclasses.replace(cell, edges=tuple(dataclasses.replace(e, ops=tuple(
            (o, -0.1 if rng.random() < closed else 0.1) for o, _ in e.ops)) for e in cell.edges),
            inputs=tuple((j, -0.1 if rng.random() < closed else 0.1) for j, _ in cell.inputs))
        dead = [(w, "op", (e.src, e.dst, o)) for e in cell.edges for o, w in e.ops if w < 0]
        dead += [(w, "input", j) for j, w in cell.inputs if w < 0]
        cell, _, _ = G.remove_dead(cell, dead)
        cells.append(G.open_part(cell))
    final = dataclasses.replace(g, cells=tuple(cells)).canonical().validate()
    spatial_walk(final)
    assert len(final.cells) == len(g.cells)
    return cfg, stages, final


@pytest.mark.parametrize("block", range(8))
def test_every_configuration_builds_or_is_refused(block):
    refused = 0
    for seed in range(block * CASES // 8, (block + 1) * CASES // 8):
        case = draw(seed)
        try:
            life(case, seed)
        except config_lib.ConfigError as e:
            assert len(str(e).splitlines()) == 1 and "expected" in str(e), e
            refused += 1
    assert refused < CASES // 8  # most configurations are buildable


def test_refusal_is_at_configuration_time_and_says_why():
    case = dict(image=(8, 8, 1), stem_stride=2, nodes=2, space="small", patterns=[["n", "r"]],
                reduction_target=3, classes=3, max_patterns=0)
    with pytest.raises(config_lib.ConfigError, match="8x8 images with stem stride 2"):
        configure(case)


@pytest.mark.parametrize("seed", [s for s in range(CASES) if s % (CASES // BUILT) == 0])
def test_real_networks_build_grow_fold_and_step(seed):
    import tensorflow as tf
    from bonsai_tf import network as N
    from bonsai_tf import optim
    case = draw(seed)
    try:
        cfg, stages, final = life(case, seed)
    except config_lib.ConfigError:
        pytest.skip("refused at configuration time (tested above)")
    c = case["image"][2]
    net = N.Network(stages[0], mean=(100.0,) * c, std=(50.0,) * c)
    for g in stages[1:]:
        net.rebuild(g)
    x = np.random.RandomState(seed).uniform(0, 255, (2,) + case["image"]).astype(np.float32)
    outs = net.model(x, training=True)
    assert [tuple(o.shape) for o in outs][0] == (2, case["classes"])
    # Fold onto the final genotype, as the engine does, and take one training step.
    fin = net.final(final, aux_heads=True)
    opt = optim.MomentumSGD()
    variables = opt.build([("0", fin.model.trainable_variables, True)])
    opt.set_lr("0", 0.01)
    y = tf.constant(np.arange(2) % case["classes"], tf.int64)
    with tf.GradientTape() as tape:
        logits = fin.model(x, training=True)
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
            y, logits[0], from_logits=True))
    opt.apply(tape.gradient(loss, variables))
    assert np.isfinite(float(loss))

