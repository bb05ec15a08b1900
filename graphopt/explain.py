"""Why an attention block was left alone: one reason per softmax that the rewrite left in
the graph, for the report (``attention 0 of 2 fused: soft-capping (tanh) on the scores is
not expressible in SDPA``).

The reasons are read off the optimised graph around each remaining softmax: what the
scores went through between ``Q K^T`` and the softmax, and what the weights go through
before ``@ V``.  A block SDPA could compute exactly but no rule matched is said to be so
(a form to add as a rule), never hidden.

Example:
    >>> reasons = unfused_attention(mg)      # an MGraph after the rewrite phases
    >>> reasons
    ['soft-capping (tanh) on the scores is not expressible in SDPA']
"""
from __future__ import annotations

from .ir import OPAQUE
from .ops.base import ITEMSIZE

# ops a score passes through on its way from Q K^T to the softmax (scale, masks, casts)
_ON_SCORES = {"smul", "sdiv", "sadd", "badd", "add", "mul", "bmul", "alias", "neg", "tanh", "reshape",
              "transpose", "fill_masked", "smax", "bsub"}
SOFT_CAP = "soft-capping (tanh) on the scores is not expressible in SDPA"
SINKS = ("attention sinks (an extra logit per query row, dropped after the softmax) in a form no sink rule "
         "covers (sdpa_sink could compute it: a rule to add)")
LOWER_CAST = "the weights are cast to a lower precision between the matmuls, which SDPA does not do"
NO_V = "the softmax's output does not feed a matmul with V (not an attention form)"
TENSOR_SCALE = "the scale is a tensor (per head or per query), and SDPA takes one number"
SCORES_TIMES_TENSOR = ("the scores are multiplied by a tensor entry by entry (openai-gpt's 0/1 mask in "
                       "w * b - 1e4 * (1 - b), which leaves masked scores at -1e4, not a masking fill); "
                       "SDPA scales the scores by one number")
OTHER_AXIS = "the softmax is not over the keys (the last axis)"
SHARED = ("Q K^T is shared with another block (differential attention), so no rule can rewrite one "
          "block alone")
RETURNED = ("the attention weights are an output of the captured graph (returned at a graph break, "
            "or asked for), so they must be computed anyway")


def _opaque_name(node) -> str:
    fx_node = getattr(node.payload, "node", None)
    if fx_node is None:
        return "an op graphopt does not model"
    if hasattr(fx_node, "op_type"):     # an ONNX NodeProto
        return fx_node.op_type
    target = fx_node.target
    return f".{target}()" if fx_node.op == "call_method" else getattr(target, "__name__", str(target))


def _writes_in_place(name: str) -> bool:
    """An opaque call that writes its first operand: ``x.masked_fill_()``, ``aten.div_``, ``x /= s``."""
    base = name.strip(".()").split(".")[0]          # "masked_fill_", "div_" of aten.div_.Tensor
    return (base.endswith("_") and not base.startswith("__")) or base in ("iadd", "isub", "imul", "itruediv")


def _consumers(mg, nid) -> list:
    node = mg.nodes[nid]
    return [mg.nodes[c] for j in range(len(node.outs)) for c, _ in mg.consumers.get((nid, j), ())]


def _scores_path(mg, value, limit: int = 12) -> list:
    """The node ids from the softmax's input back to the matmul that made the scores (or as
    far as the ops on the way are ones a score passes through)."""
    path = []
    for _ in range(limit):
        nid = value[0]
        node = mg.nodes[nid]
        path.append(nid)
        if node.op in ("matmul", "input") or node.op == OPAQUE or node.op not in _ON_SCORES:
            break
        # follow the operand that carries the scores (the full-size one)
        value = max(node.inputs, key=lambda v: len(mg.nodes[v[0]].outs[v[1]][0]) if mg.nodes[v[0]].op != "input"
                    or not mg.nodes[v[0]].const else -1)
    return path


def why_not_fused(mg, nid) -> str:
    """The reason the softmax node ``nid`` is still in the graph."""
    sm = mg.nodes[nid]
    attrs = dict(sm.attrs)
    rank = len(sm.outs[0][0])
    if attrs.get("axis", -1) % max(rank, 1) != rank - 1:
        return OTHER_AXIS
    if any((nid, j) in mg.outputs for j in range(len(sm.outs))):
        return RETURNED
    ids = _scores_path(mg, sm.inputs[0])
    path = [mg.nodes[k] for k in ids]
    if any(n.op == "tanh" for n in path):
        return SOFT_CAP
    if any(n.op == "concat" for n in path[:1]):
        return SINKS
    users = _consumers(mg, nid)
    if users and all(u.op == "split" or (u.op == OPAQUE and _opaque_name(u) in ("getitem", "narrow", ".narrow()"))
                     for u in users):
        return SINKS     # the weights are sliced: the softmax ran over more logits than keys
    dtype = sm.outs[0][1]
    for u in users:
        if u.op == OPAQUE and u.outs and u.outs[0][1] in ITEMSIZE and ITEMSIZE[u.outs[0][1]] < ITEMSIZE.get(dtype, 0):
            return LOWER_CAST
    if not any(u.op == "matmul" and u.inputs[0] == (nid, 0) for u in users):
        opaque = [u for u in users if u.op == OPAQUE]
        if opaque:
            return f"{_opaque_name(opaque[0])} between the softmax and @ V is not modelled"
        if any(u.op == "reshape" for u in users):
            return ("the weights are reshaped between the softmax and @ V (a (batch*heads) view), which "
                    "no rule covers: SDPA could compute it")
        return NO_V
    for k in ids + [v[0] for v in mg.nodes[ids[-1]].inputs]:   # (and what the path stopped at)
        for c, _ in mg.consumers.get((k, 0), ()):
            name = _opaque_name(mg.nodes[c]) if mg.nodes[c].op == OPAQUE else ""
            if _writes_in_place(name):
                return f"the scores are written in place ({name.strip('.()')}), which graphopt keeps as it is"
    for n in path:
        if n.op == "mul":
            return TENSOR_SCALE
        if n.op == "bmul":
            return SCORES_TIMES_TENSOR
        if n.op == OPAQUE:
            return f"{_opaque_name(n)} on the scores is not modelled, so no attention rule can match"
    qk = [k for k in ids if mg.nodes[k].op == "matmul"]
    if qk and len(mg.consumers.get((qk[-1], 0), ())) > 1 and all(
            mg.nodes[c].op in _ON_SCORES or mg.nodes[c].op == "softmax" for c, _ in mg.consumers[(qk[-1], 0)]):
        return SHARED
    inside = set(ids) | {nid}
    for k in ids:
        if mg.nodes[k].op in ("input", OPAQUE):
            continue
        for c, _ in mg.consumers.get((k, 0), ()):
            if c not in inside:
                other = mg.nodes[c]
                name = _opaque_name(other) if other.op == OPAQUE else other.op
                why = " (attention sinks from the log-sum-exp)" if "logsumexp" in name else ""
                return (f"the scores are also read outside the attention, by {name}{why}, so the "
                        f"softmax cannot be fused away")
    if any(n.op == "reshape" for n in path):
        return ("the scores are reshaped between Q K^T and the softmax (a (batch*heads) view), which "
                "no rule covers: SDPA could compute it")
    return "no attention rule matches this form (SDPA could compute it: a rule to add)"


_PASS_WEIGHTS = {"alias", "reshape", "split", "transpose", OPAQUE}   # casts, dropout, views, slices


def _is_softmax(node) -> bool:
    return node.op == "softmax" or (node.op == OPAQUE and "softmax" in _opaque_name(node).lower())


def is_attention(mg, nid, hops: int = 4) -> bool:
    """Whether a softmax's weights are multiplied with values (``softmax(...) @ V``, through
    casts, dropout, views and slices): an attention block, not a router's gate."""
    frontier = [(nid, j) for j in range(len(mg.nodes[nid].outs))]
    for _ in range(hops):
        nxt = []
        for value in frontier:
            for c, pos in mg.consumers.get(value, ()):
                node = mg.nodes[c]
                if node.op in ("matmul", "matmul_heads") and pos == 0:
                    return True
                if node.op == OPAQUE and any(k in _opaque_name(node) for k in ("matmul", "bmm", "einsum", "MatMul")):
                    return True
                if node.op in _PASS_WEIGHTS:
                    nxt.extend((c, j) for j in range(len(node.outs)))
        frontier = nxt
    return False


def attention_softmaxes(mg) -> list:
    """The softmax nodes (modelled or opaque spellings) that are attention blocks."""
    return [nid for nid in mg.topo_order() if _is_softmax(mg.nodes[nid]) and is_attention(mg, nid)]


def attention_blocks(graph) -> int:
    """Attention blocks in an imported IR graph, fused or not (what the report counts)."""
    from .rewrite import MGraph
    mg, _ = MGraph.from_graph(graph)
    mg.remove_dead()   # e.g. the fp32 softmax whose cast back became one softmax
    return len(attention_softmaxes(mg))


def unfused_attention(mg) -> list:
    """One reason per attention softmax left in the graph (modelled, or an opaque spelling),
    in graph order."""
    out = []
    for nid in attention_softmaxes(mg):
        node = mg.nodes[nid]
        if node.op == "softmax":
            out.append(why_not_fused(mg, nid))
        else:
            out.append(f"the softmax is spelled in a way graphopt does not model ({_opaque_name(node)} "
                       f"with these arguments)")
    return out


__all__ = ["attention_blocks", "attention_softmaxes", "is_attention", "unfused_attention", "why_not_fused",
           "SOFT_CAP", "SINKS", "LOWER_CAST", "RETURNED", "SCORES_TIMES_TENSOR"]
