"""A Markdown report of a run directory: summary, events, training curves, cells.

Reads only the JSON files a run writes (config.json, metrics.jsonl,
metrics.json, genotype.json, export.json), so it works on a copied run
directory, on a run that is still in progress, and without TensorFlow. Every
file and every key is optional: what is missing is reported as missing.

Figures are drawn through matplotlib's object API on an Agg canvas rather than
through pyplot, so making a report never switches the caller's global backend
(a notebook keeps its inline backend) and keeps no figures alive afterwards.
"""

import json
import math
import os

REPORT_NAME = "report.md"
PLOT_NAMES = ("accuracy", "compression", "params", "memory")

SHORT_OPS = {
    "sep_conv_3x3": "sep3", "sep_conv_5x5": "sep5",
    "dil_conv_3x3": "dil3", "dil_conv_5x5": "dil5",
    "max_pool_3x3": "max", "avg_pool_3x3": "avg",
    "identity": "id", "conv_3x3": "conv3", "conv_1x1": "conv1", "zero": "zero",
}

# One colour AND one line style per kind of event, so kinds stay apart in grey print
# and for colour-blind readers: (kind, legend label, colour, line style).
EVENT_STYLES = (
    ("deadhead", "deadhead", "#d62728", ":"),
    ("grow", "grow", "#2ca02c", "--"),
    ("final", "final network", "#1f77b4", "-."),
    ("cycle", "compression cycle", "#9467bd", (0, (5, 1.5, 1, 1.5, 1, 1.5))),
    ("other", "other event", "#7f7f7f", (0, (1, 3))),
)
_EVENT_STYLE = {kind: (label, colour, ls) for kind, label, colour, ls in EVENT_STYLES}
_FINAL_SHADE = "#ffe9a8"
_DPI = 120


# ---- reading a run directory ------------------------------------------------
def _read_json(path):
    """The parsed file, or None where it is missing or half-written."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_object(path):
    d = _read_json(path)
    return d if isinstance(d, dict) else None


def read_records(path):
    """The per-epoch records of a metrics.jsonl; unreadable lines are skipped
    because the last line of a running search may be half-written."""
    records = []
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return records
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _number(v):
    """A finite float, or None: keys may be null, missing or of an older type."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _epochs(records):
    out = []
    for i, rec in enumerate(records):
        e = _number(rec.get("epoch"))
        out.append(e if e is not None else float(i + 1))
    return out


def _series(records, key):
    return [_number(rec.get(key)) for rec in records]


def _nan(values):
    """None -> NaN, so matplotlib leaves a gap."""
    return [math.nan if v is None else v for v in values]


def _events(rec):
    ev = rec.get("events")
    if isinstance(ev, str):
        ev = [ev]
    if not isinstance(ev, (list, tuple)):
        return []
    return [str(e) for e in ev if e not in (None, "")]


def _event_kind(text):
    """deadhead, grow, final, cycle or other, from the text engine.py writes
    ("compression cycle 2: pressure x4", "final network: ..."). Pruning by ASAP or
    BayesNAS ("prune: ...") removes operations for good, as deadheading does."""
    head = text.split(":", 1)[0].strip().lower()
    if head.startswith("deadhead") or head.startswith("prune"):
        return "deadhead"
    if head.startswith("grow"):
        return "grow"
    if head.startswith("final"):
        return "final"
    if head.startswith("compression cycle"):
        return "cycle"
    return "other"


# ---- training curves ---------------------------------------------------------
def _new_figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _spans(epochs, flags):
    """Contiguous runs of flagged epochs as (first, last) pairs."""
    spans, start, prev = [], None, None
    for e, f in zip(epochs, flags):
        if f and start is None:
            start = e
        if not f and start is not None:
            spans.append((start, prev))
            start = None
        prev = e
    if start is not None:
        spans.append((start, prev))
    return spans


def _decorate(ax, records, epochs):
    """Final-phase shading and event lines, shared by every curve plot so that a
    jump in any curve can be read against the deadhead or growth that caused it."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    finals = [rec.get("phase") == "final" for rec in records]
    for first, last in _spans(epochs, finals):
        ax.axvspan(first - 0.5, last + 0.5, color=_FINAL_SHADE, alpha=0.6, zorder=0, lw=0)
    if any(finals):
        handles.append(Patch(color=_FINAL_SHADE, alpha=0.6, label="final phase"))
    order = [kind for kind, *_ in EVENT_STYLES]
    seen = set()
    for rec, e in zip(records, epochs):
        evs = _events(rec)
        if not evs:
            continue
        kinds = sorted({_event_kind(t) for t in evs}, key=order.index)
        # Side by side where one epoch both deadheads and grows, so neither hides.
        for i, kind in enumerate(kinds):
            _, colour, ls = _EVENT_STYLE[kind]
            ax.axvline(e + 0.08 * (i - (len(kinds) - 1) / 2), color=colour, ls=ls, lw=1.2,
                       zorder=1, gid=f"event:{kind}")
            seen.add(kind)
    for kind in order:
        if kind in seen:
            label, colour, ls = _EVENT_STYLE[kind]
            handles.append(Line2D([], [], color=colour, ls=ls, lw=1.2, label=label))
    return handles


def _curve_figure(records, epochs, lines, title, ylabel, formatter=None, hlines=()):
    """One figure of `lines` ((label, values, style), ...) against epoch; `hlines`:
    ((value, label, style), ...) drawn across the whole plot."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure((8.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    handles = _decorate(ax, records, epochs)
    plotted = False
    for label, values, style in lines:
        xs = [e for e, v in zip(epochs, values) if v is not None]
        if not xs:
            continue
        # NaN breaks the line at missing epochs instead of bridging over them.
        ys = _nan(values)
        ax.plot(epochs, ys, label=label, **{"marker": "o", "ms": 3.5, "zorder": 3, **style})
        plotted = True
    for value, label, style in hlines:
        ax.axhline(value, label=label, **{"color": "#555555", "ls": "--", "lw": 1.0,
                                          "zorder": 2, **style})
    if not plotted:
        ax.text(0.5, 0.5, "no data recorded", transform=ax.transAxes, ha="center",
                va="center", color="#888888")
    if epochs:
        lo, hi = min(epochs), max(epochs)
        ax.set_xlim(lo - 0.6, hi + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if formatter is not None:
        ax.yaxis.set_major_formatter(formatter)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    h, _ = ax.get_legend_handles_labels()
    if h or handles:
        # Outside the axes: a legend inside would hide late epochs, where the
        # curves matter most.
        ax.legend(handles=h + handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    return fig


def metric_figures(records, memory_budget_mb=None, threshold=None):
    """{name: matplotlib Figure} for accuracy, compression, params and memory, drawn
    from per-epoch records (the lines of metrics.jsonl).

    memory_budget_mb: the run's budget (config.json), drawn on the memory plot when > 0.
    threshold: BayesNAS's pruning threshold on gamma, drawn on the gamma plot.
    """
    from matplotlib.ticker import EngFormatter

    records = [r for r in records if isinstance(r, dict)]
    epochs = _epochs(records)
    figures = {}
    figures["accuracy"] = _curve_figure(
        records, epochs,
        [("validation", _series(records, "val_accuracy"), {"color": "#1f77b4"}),
         ("training", _series(records, "train_accuracy"), {"color": "#ff7f0e"})],
        "Accuracy", "accuracy")

    # The growth threshold e_c(n) and the loss's aim change with the pattern count n,
    # so each is drawn as recorded, epoch by epoch: a step where it changes (a growth),
    # a gap where it is null (the final phase).
    step = {"drawstyle": "steps-post", "marker": None, "lw": 1.2}
    figures["compression"] = _curve_figure(
        records, epochs,
        [("compression", _series(records, "compression"), {"color": "#9467bd"}),
         ("growth threshold (target)", _series(records, "target"),
          dict(step, color="#555555", ls="--")),
         ("aim", _series(records, "aim"), dict(step, color="#8c564b", ls="-."))],
        "Compression", "compression")

    figures["params"] = _curve_figure(
        records, epochs,
        [("parameters", _series(records, "params"), {"color": "#17becf"})],
        "Parameters", "parameters", formatter=EngFormatter())

    if any(isinstance(r.get("mixing_weights"), dict) for r in records):
        figures["alphas"] = _mixing_figure(records, epochs)
    if any(isinstance(r.get("gammas"), dict) for r in records):
        figures["gammas"] = _gamma_figure(records, epochs, threshold)
    if any(_number(r.get("nodes")) is not None for r in records):
        # SpiderNet: every split adds a node and two edges, every deadhead may take some.
        figures["growth"] = _curve_figure(
            records, epochs,
            [("live nodes", _series(records, "nodes"), dict(step, color="#2ca02c")),
             ("edges", _series(records, "edges"), dict(step, color="#d62728"))],
            "Growth by edge splits", "count")
    budget = _number(memory_budget_mb)
    checked = ([("checked before splitting", _series(records, "spider_memory_mb"),
                 dict(step, color="#bcbd22"))]
               if any(_number(r.get("spider_memory_mb")) is not None for r in records) else [])
    figures["memory"] = _curve_figure(
        records, epochs,
        [("predicted", _series(records, "memory_mb"), {"color": "#e377c2"}),
         ("measured", _series(records, "memory_measured_mb"), {"color": "#7f7f7f"})] + checked,
        "Training memory", "memory (MB)",
        hlines=[(budget, f"budget ({_fmt(budget)} MB)",
                 {"color": "#000000", "ls": (0, (8, 3))})]
        if budget is not None and budget > 0 else ())
    return figures


def _mixing_figure(records, epochs):
    """ASAP: each edge's strongest mixing weight (1 once one operation is left) and the
    operations left, over epochs."""
    fig = _new_figure((8.0, 5.6))
    top = fig.add_subplot(2, 1, 1)
    handles = _decorate(top, records, epochs)
    edges = sorted({k for r in records if isinstance(r.get("mixing_weights"), dict)
                    for k in r["mixing_weights"]})
    for key in edges:
        ys = []
        for r in records:
            w = (r.get("mixing_weights") or {}).get(key)
            ys.append(max(w.values()) if isinstance(w, dict) and w else math.nan)
        top.plot(epochs, ys, lw=1.0, alpha=0.7, marker="o", ms=2.5)
    top.set_ylim(0.0, 1.05)
    top.set_ylabel("strongest weight on an edge")
    top.set_title(f"Mixing weights softmax(alpha / tau), {len(edges)} edges")
    top.grid(True, alpha=0.3)
    if handles:
        top.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   borderaxespad=0.0, frameon=False)
    bottom = _operations_panel(fig, top, records, epochs)
    taus = _series(records, "tau")
    if any(t is not None for t in taus):
        twin = bottom.twinx()
        twin.plot(epochs, _nan(taus), color="#d62728",
                  ls="--", label="temperature tau")
        twin.set_ylabel("tau")
        twin.legend(fontsize=8, loc="upper right", frameon=False)
    fig.tight_layout()
    return fig


def _operations_panel(fig, top, records, epochs):
    """The lower panel of the architecture figures: operations left, over epochs."""
    bottom = fig.add_subplot(2, 1, 2, sharex=top)
    bottom.plot(epochs, _nan(_series(records, "operations")), color="#2ca02c", marker="o",
                ms=3.5, label="operations left")
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("operations")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=8, loc="upper left", frameon=False)
    return bottom


def _gamma_figure(records, epochs, threshold=None):
    """BayesNAS: every switch group's relevance gamma (log scale) and the operations left."""
    fig = _new_figure((8.0, 5.6))
    top = fig.add_subplot(2, 1, 1)
    handles = _decorate(top, records, epochs)
    groups = sorted({k for r in records if isinstance(r.get("gammas"), dict) for k in r["gammas"]})
    for key in groups:
        ys = _nan([_number((r.get("gammas") or {}).get(key)) for r in records])
        # Edge (parent) switches solid, operation (child) switches thin.
        edge = key.count("/") == 1
        top.plot(epochs, ys, lw=1.4 if edge else 0.7, alpha=0.9 if edge else 0.5,
                 marker="o", ms=2.5 if edge else 1.5)
    thr = _number(threshold)
    if thr is not None and thr > 0:
        top.axhline(thr, color="#000000", ls=(0, (8, 3)), lw=1.0)
        top.text(epochs[0] if epochs else 0, thr, f" prune below {_fmt(thr)}", fontsize=8,
                 va="bottom")
    top.set_yscale("log")
    top.set_ylabel("gamma (relevance)")
    edges = sum(1 for k in groups if k.count("/") == 1)
    top.set_title(f"Relevance of {edges} edge groups (thick) and {len(groups) - edges} "
                  f"operation groups")
    top.grid(True, alpha=0.3)
    if handles:
        top.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   borderaxespad=0.0, frameon=False)
    _operations_panel(fig, top, records, epochs)
    fig.tight_layout()
    return fig


def plot_metrics(records, out_dir, memory_budget_mb=None, threshold=None):
    """Writes accuracy.png, compression.png, params.png, memory.png (and, for runs that
    record mixing weights, alphas.png; relevances, gammas.png; nodes, growth.png) into out_dir
    from per-epoch records (the lines of metrics.jsonl); returns their paths.

    Every plot is written even without data, so a report's links never break.
    memory_budget_mb: as metric_figures.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in metric_figures(records, memory_budget_mb, threshold).items():
        path = os.path.join(out_dir, name + ".png")
        fig.savefig(path)
        paths.append(path)
    return paths


# ---- cell pictures ------------------------------------------------------------
def _node_id(v):
    """'x', 'y' or an int node index; JSON writers may have stringified the int."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        if s in ("x", "y"):
            return s
        if s.lstrip("-").isdigit():
            return int(s)
    return None


def _ops_of(edge):
    """Surviving (name, weight) pairs, strongest first."""
    ops = edge.get("ops")
    if isinstance(ops, dict):
        items = [(str(k), _number(w)) for k, w in ops.items()]
    elif isinstance(ops, (list, tuple)):
        items = [(str(k), None) for k in ops]
    else:
        items = []
    return sorted(items, key=lambda kw: -(kw[1] if kw[1] is not None else -math.inf))


def _cell_inputs(cell):
    inputs = cell.get("inputs")
    if isinstance(inputs, dict):
        pairs = list(inputs.items())
    elif isinstance(inputs, (list, tuple)):
        pairs = [(k, None) for k in inputs]
    else:
        pairs = []
    out = []
    for k, w in pairs:
        j = _node_id(k)
        if isinstance(j, int):
            out.append((j, _number(w)))
    return sorted(out)


def _input_name(j):
    return "stem" if j == 0 else f"c{j - 1}"


def _cell_edges(cell):
    """Edges with at least one operation, as (src, dst, [(op, weight), ...])."""
    edges = []
    raw = cell.get("edges")
    for e in raw if isinstance(raw, (list, tuple)) else []:
        if not isinstance(e, dict):
            continue
        src, dst = _node_id(e.get("from")), _node_id(e.get("to"))
        ops = _ops_of(e)
        if src is None or not isinstance(dst, int) or not ops:
            continue
        edges.append((src, dst, ops))
    order = {"x": -2, "y": -1}
    edges.sort(key=lambda t: (t[1], order.get(t[0], t[0])))
    return edges


def _cell_nodes(cell, edges):
    n = _number(cell.get("nodes"))
    if n is not None and n >= 1:
        return int(n)
    ends = [d for _, d, _ in edges] + [s for s, _, _ in edges if isinstance(s, int)]
    return max(ends) + 1 if ends else 1


def _alive(nodes, edges, has_y):
    """Nodes fed from an input and feeding the output; the same rule as
    bonsai_tf.genotype's dead-node removal, restated here on plain dicts."""
    usable = [(s, d) for s, d, _ in edges if not (s == "y" and not has_y)]
    fed = set()
    for dst in range(nodes):
        if any(d == dst and (s in ("x", "y") or s in fed) for s, d in usable):
            fed.add(dst)
    useful = {nodes - 1} if nodes - 1 in fed else set()
    for src in reversed(range(nodes)):
        if src in fed and any(s == src and d in useful for s, d in usable):
            useful.add(src)
    return fed & useful


def _bezier(p0, p2, rad, t):
    # Matplotlib's arc3 control point; valid in data units because the axes
    # keep an equal aspect, so data and display coordinates differ by a scale.
    (x0, y0), (x2, y2) = p0, p2
    cx = (x0 + x2) / 2 + rad * (y2 - y0)
    cy = (y0 + y2) / 2 - rad * (x2 - x0)
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t * t
    return a * x0 + b * cx + c * x2, a * y0 + b * cy + c * y2


def _overlap(r1, r2):
    w = min(r1[2], r2[2]) - max(r1[0], r2[0])
    h = min(r1[3], r2[3]) - max(r1[1], r2[1])
    return w * h if w > 0 and h > 0 else 0.0


def draw_cell(cell, path, title):
    """Draws one genotype cell as a PNG: inputs x and y on the left, nodes
    0..nodes-1 left to right (the last is the output), one arrow per surviving
    edge labelled with its operations. Dead nodes and their edges are grey."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    unit = 0.55                                 # inches per data unit
    edges = _cell_edges(cell)
    nodes = _cell_nodes(cell, edges)
    inputs = _cell_inputs(cell)
    has_y = bool(inputs)
    alive = _alive(nodes, edges, has_y)
    reduction = cell.get("kind") == "reduction"
    live_fill = "#fdd9b5" if reduction else "#cfe2f3"
    live_edge = "#c45a00" if reduction else "#2b5d8a"
    grey = "#b0b0b0"

    fig = _new_figure((6, 4))
    renderer = fig.canvas.get_renderer()
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()

    def size_of(text):
        bb = text.get_window_extent(renderer)
        return bb.width / fig.dpi / unit, bb.height / fig.dpi / unit

    # y's label lists the earlier outputs it sums; wrapped so a late cell with
    # many kept inputs does not produce one very wide box.
    terms = [_input_name(j) for j, _ in inputs]
    if terms:
        rows = [" + ".join(terms[i:i + 3]) for i in range(0, len(terms), 3)]
        y_label = "y = " + " +\n     ".join(rows)
    else:
        y_label = "y (no inputs)"

    boxes = {}                                  # id -> (cx, cy, w, h, text, alive)
    labels = {"x": "x", "y": y_label}
    for k in range(nodes):
        labels[k] = f"{k} (out)" if k == nodes - 1 else str(k)
    sizes = {}
    texts = {}
    for key, label in labels.items():
        t = ax.text(0, 0, label, ha="center", va="center", fontsize=10, zorder=5,
                    multialignment="left",
                    fontweight="bold" if key == nodes - 1 else "normal")
        texts[key] = t
        w, h = size_of(t)
        sizes[key] = (max(w + 0.5, 1.0), max(h + 0.35, 0.7))

    in_w = max(sizes["x"][0], sizes["y"][0])
    gap, dy_in = 2.6, 1.9
    boxes["x"] = (0.0, dy_in, sizes["x"][0], sizes["x"][1], True)
    boxes["y"] = (0.0, -dy_in, sizes["y"][0], sizes["y"][1], has_y)
    x_pos = in_w / 2 + gap
    for k in range(nodes):
        w, h = sizes[k]
        boxes[k] = (x_pos + w / 2, 0.0, w, h, k in alive)
        x_pos += w + gap

    patches = {}
    for key, (cx, cy, w, h, ok) in boxes.items():
        is_input = key in ("x", "y")
        patch = FancyBboxPatch(
            (cx - w / 2, cy - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.2",
            facecolor=("#eeeeee" if is_input else live_fill) if ok else "#f4f4f4",
            edgecolor=("#333333" if is_input else live_edge) if ok else grey,
            ls="-" if ok else "--", lw=1.4, zorder=4)
        ax.add_patch(patch)
        patches[key] = patch
        texts[key].set_position((cx, cy))
        texts[key].set_color("#111111" if ok else "#999999")

    # Arcs keep edges that skip nodes from crossing them: x edges bow upwards,
    # y edges downwards, node-to-node skips alternate above and below the row.
    colours = {"x": "#1f5fa8", "y": "#2a8a3a"}
    obstacles = [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                 for cx, cy, w, h, _ in boxes.values()]
    placed = []
    curves = []
    for src, dst, ops in edges:
        if src not in boxes or dst not in boxes:
            continue
        ok = boxes[src][4] and boxes[dst][4]
        p0, p2 = boxes[src][:2], boxes[dst][:2]
        if src == "x":
            rad = -min(0.08 * dst, 0.3)
        elif src == "y":
            rad = min(0.08 * dst, 0.3)
        else:
            span = dst - src
            rad = 0.0 if span == 1 else (0.28 if span % 2 else -0.28)
        colour = colours.get(src, "#444444") if ok else grey
        arrow = FancyArrowPatch(
            p0, p2, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=14,
            color=colour, lw=1.3, ls="-" if ok else "--", zorder=2,
            patchA=patches[src], patchB=patches[dst], shrinkA=1, shrinkB=1)
        ax.add_patch(arrow)
        curves.append((p0, p2, rad))
        names = [SHORT_OPS.get(n, n) for n, _ in ops]
        if len(names) > 4:
            names = [", ".join(names[i:i + 2]) for i in range(0, len(names), 2)]
        t = ax.text(0, 0, "\n".join(names), ha="center", va="center", fontsize=8,
                    color=colour if ok else "#999999", zorder=6, linespacing=1.1,
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=colour, lw=0.8,
                              alpha=0.95))
        w, h = size_of(t)
        best = None
        # Slides the label along its arrow to the first spot clear of boxes and
        # earlier labels; where none is clear, the least covered spot wins.
        for frac in (0.5, 0.4, 0.6, 0.32, 0.68, 0.25, 0.75, 0.2, 0.8):
            px, py = _bezier(p0, p2, rad, frac)
            rect = (px - w / 2, py - h / 2, px + w / 2, py + h / 2)
            cost = sum(_overlap(rect, o) for o in obstacles + placed)
            if best is None or cost < best[0]:
                best = (cost, px, py, rect)
            if cost == 0:
                break
        _, px, py, rect = best
        t.set_position((px, py))
        placed.append(rect)

    # Limits cover boxes, labels and arc bulges; the figure is then sized so one
    # data unit is `unit` inches on both axes, which the label maths assumes.
    rects = obstacles + placed
    for p0, p2, rad in curves:
        px, py = _bezier(p0, p2, rad, 0.5)
        rects.append((px, py, px, py))
    x0 = min(r[0] for r in rects) - 0.4
    x1 = max(r[2] for r in rects) + 0.4
    y0 = min(r[1] for r in rects) - 0.4
    y1 = max(r[3] for r in rects) + 0.4
    title_t = ax.text(0, 0, title, ha="center", va="bottom", fontsize=12, fontweight="bold",
                      color=live_edge)
    tw, th = size_of(title_t)
    x0, x1 = min(x0, (x0 + x1) / 2 - tw / 2 - 0.3), max(x1, (x0 + x1) / 2 + tw / 2 + 0.3)
    title_t.set_position(((x0 + x1) / 2, y1 + 0.15))
    y1 += th + 0.5
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    fig.set_size_inches((x1 - x0) * unit, (y1 - y0) * unit)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, facecolor="white")
    return path


# ---- the report -----------------------------------------------------------------
def _fmt(v, digits=4):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) >= 1000:
            return f"{int(v):,}"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return _md(str(v))


def _fmt_seconds(v):
    v = _number(v)
    if v is None:
        return "–"
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(int(round(v)), 60)
    h, m = divmod(m, 60)
    return f"{v:,.0f} s ({h}h {m:02d}m {s:02d}s)" if h else f"{v:,.0f} s ({m}m {s:02d}s)"


def _md(text):
    # Pipes would split a table cell; newlines would end the row.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _last_value(records, key):
    for rec in reversed(records):
        v = rec.get(key)
        if v is not None:
            return v
    return None


def _summary_rows(config, metrics, records):
    config, metrics = config or {}, metrics or {}
    vals = [(v, e) for v, e in zip(_series(records, "val_accuracy"), _epochs(records))
            if v is not None]
    best = max(vals, key=lambda ve: ve[0]) if vals else None
    epochs = _epochs(records)
    rows = [
        ("dataset", _fmt(config.get("dataset"))),
        ("strategy", _fmt(config.get("strategy"))),
        ("search space", _fmt(_first(config.get("space"), metrics.get("space")))),
        ("test accuracy", _fmt(_number(metrics.get("test_accuracy")))
         + (f" (the found network after its search and {int(metrics['final_probe_steps'])} "
            f"timing steps: --final_probe_steps, not a trained final network)"
            if metrics.get("final_probe_steps") else "")),
        ("best val accuracy",
         (f"{_fmt(best[0])} (epoch {int(best[1])})" if best else "–")
         + (" (search epochs only: the final network also trained on the validation "
            "examples, --final_with_val)" if metrics.get("final_with_val") else "")),
        ("examples trained on", _examples(metrics.get("examples"))),
        ("params", _fmt(_first(metrics.get("params"), _last_value(records, "params")))),
        ("cells", _fmt(_first(metrics.get("cells"), _last_value(records, "cells")))),
        ("final compression",
         _fmt(_first(metrics.get("compression"), _last_value(records, "compression")))),
        ("epochs recorded", _fmt(int(max(epochs))) if epochs else "0"),
        ("search seconds", _fmt_seconds(metrics.get("search_seconds"))),
        ("of which restructuring", _restructure(metrics)),
        ("total seconds", _fmt_seconds(
            _first(metrics.get("total_seconds"), _last_value(records, "seconds")))),
        ("genotype hash",
         f"`{_md(metrics['genotype_hash'])}`" if metrics.get("genotype_hash") else "–"),
    ]
    return rows


def _examples(examples):
    """'training split N, validation V; the final network trained on M' as far as
    metrics.json recorded them ("–" for runs without the counts)."""
    if not isinstance(examples, dict) or not isinstance(examples.get("train"), int):
        return "–"
    text = f"training split {examples['train']:,}, validation {examples.get('val', 0):,}"
    if isinstance(examples.get("final"), int):
        text += f"; the final network trained on {examples['final']:,}"
    return text


def _restructure(metrics):
    """Rebuilds after structural changes and the retracing they caused, as a share of
    the search ("–" for runs that recorded none)."""
    seconds, share = metrics.get("restructure_seconds"), metrics.get("restructure_share")
    if not isinstance(seconds, (int, float)) or not isinstance(share, (int, float)):
        return "–"
    # The engine's own per-change figure (None where the search made no change).
    changes, each = metrics.get("restructures"), metrics.get("restructure_seconds_per_change")
    each = (f", {changes} changes, {each:.1f} s each"
            if isinstance(changes, int) and isinstance(each, (int, float)) else "")
    return f"{_fmt_seconds(seconds)} ({100 * share:.1f}%: rebuilds and retracing{each})"


def _cell_listing(cell, c):
    edges = _cell_edges(cell)
    nodes = _cell_nodes(cell, edges)
    inputs = _cell_inputs(cell)
    alive = _alive(nodes, edges, bool(inputs))
    kind = cell.get("kind", "?")
    lines = []
    facts = [f"{_md(kind)}", f"{_fmt(cell.get('channels'))} channels", f"{nodes} nodes"]
    if cell.get("aux"):
        facts.append("auxiliary head")
    lines.append(f"### Cell {c}: " + ", ".join(facts))
    lines.append("")
    lines.append(f"![cell {c}](cell_{c:02d}.png)")
    lines.append("")
    if inputs:
        y = " + ".join(f"{_input_name(j)} ({_fmt(w, 3)})" if w is not None else _input_name(j)
                       for j, w in inputs)
        lines.append(f"y = {y}")
    else:
        lines.append("y: no inputs (the y input was pruned)")
    lines.append("")
    if edges:
        lines.append("| from | to | operations (gate weight) |")
        lines.append("|---|---|---|")
        for src, dst, ops in edges:
            dead = not ((src in ("x", "y") or src in alive) and dst in alive) or (
                src == "y" and not inputs)
            ops_txt = ", ".join(f"{n} ({_fmt(w, 3)})" if w is not None else n for n, w in ops)
            to = f"{dst} (out)" if dst == nodes - 1 else str(dst)
            lines.append(f"| {_md(src)} | {to} | {_md(ops_txt)}{' *(dead)*' if dead else ''} |")
        lines.append("")
    else:
        lines.append("No edges.")
        lines.append("")
    dead_nodes = [k for k in range(nodes) if k not in alive]
    if dead_nodes:
        lines.append("Dead nodes (no path from an input to the output): "
                     + ", ".join(str(k) for k in dead_nodes) + ".")
        lines.append("")
    return lines


def _export_lines(export):
    arts = export.get("artifacts") if isinstance(export, dict) else None
    if not isinstance(arts, dict) or not arts:
        return ["export.json lists no artifacts.", ""]
    columns = [c for c in ("size_bytes", "accuracy", "max_abs_diff", "top1_agreement")
               if any(isinstance(a, dict) and a.get(c) is not None for a in arts.values())]
    lines = ["| artifact | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, a in arts.items():
        a = a if isinstance(a, dict) else {}
        cells = []
        for c in columns:
            v = a.get(c)
            cells.append(_fmt(_number(v) if _number(v) is not None else v))
        lines.append(f"| {_md(name)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _given_lines(metrics, records):
    """BayesNAS over a given network (--genotype): what it cost, what it removed."""
    given = (metrics or {}).get("compression_of_given")
    if not isinstance(given, dict):
        return []
    lines = ["## Compression of the given network", "", "| | given | found | kept |",
             "|---|---|---|---|"]
    for key in ("operations", "params"):
        pair = given.get(key)
        if isinstance(pair, list) and len(pair) == 2 and all(_number(v) for v in pair):
            a, b = pair
            lines.append(f"| {key} | {_fmt(a)} | {_fmt(b)} | {100.0 * b / a:.1f}% |")
    # Validation accuracy of the network as given (the last epoch before the first
    # pruning: validation runs before the epoch's structural change) against the
    # final network's.
    before = None
    for r in records:
        if any(str(e).startswith("prune:") for e in _events(r)):
            before = _number(r.get("val_accuracy"))
            break
        before = _number(r.get("val_accuracy"))
    after = _number(records[-1].get("val_accuracy")) if records else None
    test = _number((metrics or {}).get("test_accuracy"))
    lines += ["", f"Validation accuracy before the first pruning {_fmt(before)}, at the end "
              f"{_fmt(after)}; test accuracy of the final network {_fmt(test)}.", ""]
    return lines


def _spider_lines(metrics, records):
    """SpiderNet: what every round removed, scored and grew, and the memory check."""
    rounds = [(r.get("epoch"), r["spider_round"]) for r in records
              if isinstance(r.get("spider_round"), dict)]
    if not rounds:
        return []
    lines = ["## Growth rounds", "",
             "| round | after epoch | operations removed | candidates scored | accepted | "
             "splits applied | regions (unsplit) | NTK condition (unsplit) |",
             "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for epoch, info in rounds:
        if info.get("round") in seen:   # the record after the last round repeats it
            continue
        seen.add(info.get("round"))
        lines.append("| " + " | ".join(_fmt(v) for v in (
            info.get("round"), epoch, info.get("removed_operations"), info.get("candidates"),
            info.get("accepted"), info.get("mutations"), info.get("base_regions"),
            info.get("base_condition"))) + " |")
    m = metrics or {}
    check = m.get("spider_memory_check")
    lines += ["", f"Candidates scored: {_fmt(m.get('candidates_scored'))}, "
              f"{_fmt(m.get('trainfree_seconds_per_candidate'))} s each (both train-free "
              f"metrics, the network built twice); splits applied: {_fmt(m.get('mutations'))}."]
    if isinstance(check, dict):
        lines.append(f"Last memory check: {_fmt(check.get('mb'))} MB "
                     f"({_md(check.get('source'))}) against a budget of "
                     f"{_fmt(check.get('budget_mb'))} MB.")
    return lines + [""]


def _latency_lines(metrics, records):
    """ProxylessNAS under a target: the expected latency the search held, the argmax and
    the network chosen, each measured or predicted, and the switches between them."""
    sel = (metrics or {}).get("latency_selection")
    if not isinstance(sel, dict):
        return []
    expected = _last_value(records, "expected_latency_ms")
    target = sel.get("target_ms")
    lines = ["## Latency target", "",
             f"Target {_fmt(target)} ms (batch 1, on this machine); the search's expected "
             f"latency at its end {_fmt(expected)} ms. The final network is the dearest at "
             f"or under the target on the argmax's most probable way up or down "
             f"(`--latency_select={_md(sel.get('select'))}`).", "",
             "| | predicted ms | measured ms |", "|---|---|---|",
             f"| argmax of the alphas | {_fmt(sel.get('argmax_predicted_ms'))} | "
             f"{_fmt(sel.get('argmax_measured_ms'))} |",
             f"| final network | {_fmt(sel.get('predicted_ms'))} | "
             f"{_fmt(sel.get('measured_ms'))} |", ""]
    switches = sel.get("switches") or []
    if switches:
        lines += [f"{len(switches)} switch(es) {_md(sel.get('direction'))} from the argmax:", "",
                  "| cell | edge | from | to | ms saved (table) | log-probability lost |",
                  "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_fmt(sw.get(k)) for k in (
            "cell", "edge", "from", "to", "saved_ms", "log_p_lost")) + " |"
            for sw in switches if isinstance(sw, dict)]
        lines.append("")
    lines += [f"Target {'met' if sel.get('met') else '**not met**'}"
              f"{'' if sel.get('met') else ' (every edge at its cheapest operation, or the measurements used up)'}; "
              f"{len(sel.get('measurements') or [])} network(s) measured in "
              f"{_fmt(sel.get('seconds'))} s.", ""]
    return lines


def write_report(run_dir):
    """Writes report.md and its PNGs into run_dir; returns the report's path."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist; expected a "
                                f"directory holding config.json and metrics.jsonl")
    config = _read_object(os.path.join(run_dir, "config.json"))
    metrics = _read_object(os.path.join(run_dir, "metrics.json"))
    records = read_records(os.path.join(run_dir, "metrics.jsonl"))
    genotype = _read_object(os.path.join(run_dir, "genotype.json"))
    export = _read_object(os.path.join(run_dir, "export.json"))

    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    lines = [f"# Run report: {_md(name)}", ""]
    if metrics is None:
        lines.append(f"**In progress**: no metrics.json yet; {len(records)} epoch(s) recorded.")
    else:
        lines.append("Finished run.")
    lines.append("")

    lines += ["## Summary", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _summary_rows(config, metrics, records)]
    lines.append("")

    lines += ["## Events", ""]
    timeline = [(e, ev) for rec, e in zip(records, _epochs(records)) for ev in _events(rec)]
    if timeline:
        lines += [f"- epoch {int(e)}: {_md(ev)}" for e, ev in timeline]
    else:
        lines.append("No deadhead or growth events recorded.")
    lines.append("")

    lines += ["## Training curves", ""]
    if not records:
        lines += ["No epochs recorded yet.", ""]
    else:
        for p in plot_metrics(records, run_dir, (config or {}).get("memory_budget_mb"),
                              (config or {}).get("bayes_threshold")
                              if (config or {}).get("strategy") == "bayes" else None):
            stem = os.path.splitext(os.path.basename(p))[0]
            lines += [f"![{stem}]({os.path.basename(p)})", ""]
        lines += ["Vertical lines mark epochs with events, one colour and line style per "
                  "kind (see the legends); the shaded band is the final (fixed "
                  "architecture) phase.", ""]

    lines += _given_lines(metrics, records)
    lines += _spider_lines(metrics, records)
    lines += _latency_lines(metrics, records)

    lines += ["## Cells", ""]
    cells = genotype.get("cells") if genotype else None
    if not isinstance(cells, list) or not cells:
        lines += ["No genotype.json yet." if genotype is None else "The genotype lists no cells.",
                  ""]
    else:
        facts = []
        for key in ("space", "nodes", "scale"):
            if genotype.get(key) is not None:
                facts.append(f"{key} {_md(genotype[key])}")
        if isinstance(genotype.get("patterns"), list):
            facts.append("patterns " + _md(json.dumps(genotype["patterns"])))
        lines += [f"{len(cells)} cells" + (": " + ", ".join(facts) if facts else "") + ".", ""]
        for c, cell in enumerate(cells):
            if not isinstance(cell, dict):
                lines += [f"### Cell {c}", "", "Malformed cell entry.", ""]
                continue
            kind = str(cell.get("kind", "?"))
            title = f"Cell {c}: {kind}" + (" (stride 2)" if kind == "reduction" else "")
            if cell.get("channels") is not None:
                title += f", {cell['channels']} channels"
            draw_cell(cell, os.path.join(run_dir, f"cell_{c:02d}.png"), title)
            lines += _cell_listing(cell, c)

    if export is not None:
        lines += ["## Export", ""] + _export_lines(export)

    if config:
        lines += ["<details><summary>Configuration</summary>", "", "```json",
                  json.dumps(config, indent=1, sort_keys=True, default=str), "```", "",
                  "</details>", ""]

    path = os.path.join(run_dir, REPORT_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    # Atomic so a viewer polling a running search never sees half a report.
    os.replace(tmp, path)
    return path
