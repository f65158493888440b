import dataclasses
import json

import pytest

from bonsai_tf import genotype as G
from bonsai_tf import memory as M


def small(n=2, nodes=2, space="bonsai7"):
    return G.initial(space, (12, 12, 1), 3, 4, nodes, [["n"], ["r"]], n)


def test_initial_genotype_has_every_operation_on_every_edge():
    g = small(2, nodes=3)
    assert [c.kind for c in g.cells] == ["normal", "reduction"]
    assert [c.channels for c in g.cells] == [4, 8]
    # 2 inputs x 3 nodes + 3 node-to-node edges, 7 operations each
    assert all(len(c.edges) == 9 and c.num_ops() == 63 for c in g.cells)
    assert [len(c.inputs) for c in g.cells] == [1, 2]


def test_json_round_trip_and_hash():
    g = small()
    text = g.to_json()
    back = G.Genotype.from_json(text)
    assert back == g and back.hash() == g.hash()
    assert json.loads(text)["format"] == "bonsai-tf/genotype"
    # weights do not change the architecture's hash; structure does
    w = dataclasses.replace(g, cells=(dataclasses.replace(g.cells[0], inputs=((0, 0.7),)),) + g.cells[1:])
    assert w.hash() == g.hash()
    assert small(3).hash() != g.hash()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d.update(colour="red"), "unknown field"),
    (lambda d: d.pop("cells"), "missing field"),
    (lambda d: d["cells"][0]["edges"][0]["ops"].update(warp_drive=0.1), "unknown operation 'warp_drive'"),
    (lambda d: d["cells"][0]["edges"][0].update(to=9), "is not in a cell of 2 nodes"),
    (lambda d: d["cells"][0].update(kind="weird"), "kind 'weird'"),
    (lambda d: d.update(space="nope"), "unknown search space"),
    (lambda d: d["cells"][1]["inputs"].update({"5": 0.1}), "not an earlier output"),
])
def test_bad_genotypes_are_refused_with_a_reason(mutate, message):
    d = small().to_dict()
    mutate(d)
    with pytest.raises(G.GenotypeError, match=message):
        G.Genotype.from_dict(d)


def test_truncated_json_is_refused(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(small().to_json()[:100])
    with pytest.raises(G.GenotypeError, match="not valid JSON"):
        G.Genotype.load(str(p))


def test_dead_nodes_are_removed():
    g = small(1, nodes=3)
    cell = g.cells[0]
    # keep only x->0, 0->2 and y->1; node 1 does not reach the output (2), so it dies
    keep = {("x", 0), (0, 2), ("y", 1)}
    cell = dataclasses.replace(cell, edges=tuple(
        dataclasses.replace(e, ops=e.ops[:1] if (e.src, e.dst) in keep else ()) for e in cell.edges))
    c = dataclasses.replace(g, cells=(cell,)).canonical().cells[0]
    assert {(e.src, e.dst) for e in c.edges} == {("x", 0), (0, 2)}
    assert c.inputs == ()  # y feeds nothing now


def test_disconnected_cell_is_invalid():
    g = small(1)
    cell = dataclasses.replace(g.cells[0], edges=tuple(
        dataclasses.replace(e, ops=()) if e.dst == 1 else e for e in g.cells[0].edges))
    with pytest.raises(G.GenotypeError, match="no path"):
        dataclasses.replace(g, cells=(cell,)).validate()


def test_patterns_growth_and_heads():
    g = G.initial("bonsai7", (32, 32, 3), 10, 4, 1, [["n", "na"], ["r"]], 1)
    assert [c.kind for c in g.cells] == ["normal", "normal"]
    g = G.grow(G.grow(g))
    assert [c.kind[0] for c in g.cells] == ["n", "n", "r", "n", "n"]
    assert G.num_patterns(g) == 3 and G.pattern_ends(g) == [1, 2, 4]
    assert G.head_cells(g) == [1]  # the preserved 'na' head; 'r' head was dropped
    assert G.max_patterns([["n"], ["r"]], 8, 2) == 5  # 8 -> 4 -> 2
    with pytest.raises(G.GenotypeError, match="first cell must be normal"):
        G.parse_patterns([["r"]])
    with pytest.raises(G.GenotypeError, match="unknown cell code"):
        G.parse_patterns([["n", "q"]])


def test_random_baseline_matches_cells_and_memory_fractions():
    g = small(2, nodes=3)
    cells = []
    for cell in g.cells:  # keep one cheap op per edge
        cells.append(dataclasses.replace(cell, edges=tuple(
            dataclasses.replace(e, ops=(("sep_conv_3x3", 0.1),)) for e in cell.edges)))
    found = dataclasses.replace(g, cells=tuple(cells))

    def cost(c, src, op):
        return M.edge_op_cost(found, c, src, op).bytes(1)
    r1 = G.random_like(found, cost, seed=1)
    r2 = G.random_like(found, cost, seed=2)
    assert len(r1.cells) == len(found.cells)
    assert [c.kind for c in r1.cells] == [c.kind for c in found.cells]
    assert r1.hash() != r2.hash()
    for c, cell in enumerate(r1.cells):
        mine = sum(cost(c, e.src, o) for e in cell.edges for o in e.op_names())
        theirs = sum(cost(c, e.src, o) for e in found.cells[c].edges for o in e.op_names())
        assert 0.5 * theirs <= mine <= 2.5 * theirs
