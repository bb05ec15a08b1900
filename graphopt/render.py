"""Pictures of rules: Graphviz DOT text, and PNG through Graphviz or matplotlib."""
from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

from .dims import shape_str
from .errors import GraphoptError
from .ir import Graph, parse_ref
from .rules import Rule, write_atomic


def _side_dot(g: Graph, prefix: str, label: str) -> list:
    lines = [f'  subgraph cluster_{prefix} {{', f'    label="{label}"; style=rounded; color=gray60;']
    for i in g.inputs:
        lines.append(f'    {prefix}_{i.name} [label="{i.name}\\n{shape_str(i.shape)}", shape=box, style=filled, fillcolor="#e8eef7"];')
    for k, n in enumerate(g.nodes):
        attrs = ", ".join(f"{a}={v}" for a, v in n.attrs)
        text = n.op + (f"\\n{attrs}" if attrs else "")
        lines.append(f'    {prefix}_n{k} [label="{text}", shape=ellipse];')
        for r in n.inputs:
            key, out = parse_ref(r)
            src = f"{prefix}_{key}" if out is None else f"{prefix}_n{key}"
            lines.append(f"    {src} -> {prefix}_n{k};")
    for j, r in enumerate(g.outputs):
        key, out = parse_ref(r)
        lines.append(f'    {prefix}_out{j} [label="out {j} = {r}\\n{shape_str(g.type_of(r)[0])}", shape=box, style=filled, fillcolor="#f7ede8"];')
        src = f"{prefix}_{key}" if out is None else f"{prefix}_n{key}"
        lines.append(f"    {src} -> {prefix}_out{j};")
    lines.append("  }")
    return lines


def rule_to_dot(rule: Rule) -> str:
    """The two sides of a rule, side by side, as a Graphviz digraph."""
    lines = [f'digraph "{rule.id}" {{', '  rankdir=TB; fontname="Helvetica";',
             f'  label="{rule.id}  ({", ".join(rule.layers())})"; labelloc=t;']
    lines += _side_dot(rule.src, "src", "source")
    lines += _side_dot(rule.dst, "dst", "target")
    lines.append("}")
    return "\n".join(lines) + "\n"


def rule_to_png(rule: Rule, path) -> str:
    """Write a PNG picture of the rule; returns the renderer used."""
    data, how = rule_png(rule)
    write_atomic(Path(path), data)
    return how


def rule_png(rule: Rule) -> tuple:
    """A PNG picture of the rule as bytes, through Graphviz when ``dot`` is on PATH, else
    matplotlib; returns ``(png bytes, renderer)``."""
    if shutil.which("dot"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rule.png"
            subprocess.run(["dot", "-Tpng", "-o", str(out)], input=rule_to_dot(rule).encode(), check=True)
            return out.read_bytes(), "graphviz"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import networkx as nx
    except ImportError:
        raise GraphoptError("drawing a PNG needs Graphviz ('dot' on PATH) or matplotlib "
                            "(pip install 'graphopt[viz]'); use --dot for DOT text") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (g, title) in zip(axes, ((rule.src, "source"), (rule.dst, "target"))):
        G, labels = _nx_graph(g, nx)
        pos = _layers(G, nx)
        colors = ["#e8eef7" if G.nodes[n]["kind"] == "input" else
                  "#f7ede8" if G.nodes[n]["kind"] == "output" else "#ffffff" for n in G]
        nx.draw_networkx(G, pos, ax=ax, labels=labels, node_color=colors, edgecolors="gray",
                         node_size=1600, font_size=8, arrows=True)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{rule.id}: {', '.join(rule.layers())}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue(), "matplotlib"


def _nx_graph(g: Graph, nx):
    G = nx.DiGraph()
    labels = {}
    for i in g.inputs:
        G.add_node(i.name, kind="input")
        labels[i.name] = f"{i.name}\n{shape_str(i.shape)}"
    for k, n in enumerate(g.nodes):
        G.add_node(f"n{k}", kind="op")
        labels[f"n{k}"] = n.op
        for r in n.inputs:
            key, out = parse_ref(r)
            G.add_edge(key if out is None else f"n{key}", f"n{k}")
    for j, r in enumerate(g.outputs):
        key, out = parse_ref(r)
        G.add_node(f"out{j}", kind="output")
        labels[f"out{j}"] = f"out {j}\n{r}"
        G.add_edge(key if out is None else f"n{key}", f"out{j}")
    return G, labels


def _layers(G, nx):
    for layer, nodes in enumerate(nx.topological_generations(G)):
        for n in nodes:
            G.nodes[n]["layer"] = layer
    return nx.multipartite_layout(G, subset_key="layer", align="horizontal", scale=1.0)
