"""The optimizer's report as one self-contained HTML page (``graphopt optimize --html``).

The page holds the summary (cost, latency, fused attention, verification), each applied rule
with its picture (:func:`graphopt.render.rule_png`, embedded as a data URI), the sites it
rewrote per graph, the torch op counts before and after, and what was left alone and why.
It loads nothing from elsewhere and runs no script.
"""
from __future__ import annotations

import base64
from html import escape

from .report import Report

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f3f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.big { font-size: 1.6em; font-weight: bold; color: #1a5e20; }
.rule { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; margin: 1em 0; }
.rule img { max-width: 100%; } code { background: #f5f5f5; padding: 0 0.2em; }
.warn { color: #8a1f11; } .more { color: #1a5e20; } .less { color: #555; }
"""


def report_html(result: dict, report: Report, title: str, rule_sources=("default", "handwritten")) -> str:
    """The page for one ``graphopt optimize`` run.

    Args:
        result: the CLI's JSON result (the report's ``to_json`` plus latency, inputs, dtype).
        report: the :class:`~graphopt.report.Report` (per-graph rules and op counts).
        title: what was optimized.
        rule_sources: where the applied rules come from (``Options.rules``), for their pictures.
    Returns:
        the page as text.
    """
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>graphopt: {escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>graphopt: {escape(title)}</h1>"]
    parts += _summary(result)
    parts += _rules(result, report, rule_sources)
    parts += _op_counts(report)
    parts += _left_alone(result, report)
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(rows, head=None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(
            f"<td class=num>{escape(str(c))}</td>" if isinstance(c, (int, float)) else f"<td>{c}</td>"
            for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _summary(j: dict) -> list:
    lat, att = j.get("latency_ms"), j["attention"]
    out = ["<h2>Summary</h2>"]
    if lat:
        out.append(f"<p class=big>{lat['speedup']:.2f}x</p><p>measured: original {lat['original']:.2f} ms, "
                   f"optimized {lat['optimized']:.2f} ms (median of {lat['runs']})</p>")
    rows = [("inputs", escape(", ".join(str(tuple(s)) for s in j.get("inputs", [])))),
            ("dtype, device", escape(f"{j.get('dtype', '?')}, {j.get('device', '?')}")),
            ("cost (model)", f"{j['cost_before_s'] * 1e3:.4f} ms &rarr; {j['cost_after_s'] * 1e3:.4f} ms"),
            ("attention", f"{att['fused']} of {att['blocks']} blocks fused into SDPA ({att['causal']} is_causal, "
                          f"{att['masked']} with an explicit mask, {att['gqa']} grouped-query)"),
            ("graphs", f"{j['graphs']} captured; {j['ops']} ops modelled, {j['opaque']} carried through"),
            ("rules applied", f"{sum(j['rules_applied'].values())} sites, {len(j['rules_applied'])} rules; "
                              f"{j['folded_constants']} constants folded"),
            ("verified", f"max |diff| {j['max_abs_diff']:.3g} against the original"),
            ("time", f"{j.get('optimize_seconds', 0):.1f} s to capture, search and verify")]
    if j.get("saved"):
        rows.append(("artifact", f"<code>{escape(j['saved'])}</code> (torch.export program)"))
    out.append(_table(rows))
    if j.get("phases"):
        out.append(_table([(escape(n), escape(p["engine"]), escape(", ".join(p["rulesets"])), p["applied"],
                            round(p["seconds"], 3)) for n, p in j["phases"].items()],
                          head=("phase", "engine", "rulesets", "sites rewritten", "seconds")))
    return out


def _rules(j: dict, report: Report, sources) -> list:
    out = ["<h2>Rules applied</h2>"]
    if not j["rules_applied"]:
        return out + ["<p>none</p>"]
    known = _rule_index(sources)
    for key, total in j["rules_applied"].items():
        rule_id, direction = key[:-1], ("forward" if key.endswith("+") else "backward")
        ruleset, rule = known.get(rule_id, (None, None))
        sites = [f"graph {k}: {g.applied[key]}" for k, g in enumerate(report.graphs)
                 if g.applied.get(key) and not g.fallback]
        name = f" ({escape(rule.name)})" if rule is not None and rule.name else ""
        out.append(f"<div class=rule><h3><code>{escape(rule_id)}</code>{name}, {direction}, "
                   f"{total} site(s)</h3><p><code>{escape(j['rewrites'].get(key, ''))}</code></p>")
        out.append(f"<p>sites: {escape('; '.join(sites))}"
                   + (f"; ruleset <code>{escape(ruleset)}</code>" if ruleset else "")
                   + (f"; verified by {escape(', '.join(rule.layers()))}" if rule is not None else "") + "</p>")
        picture = _picture(rule)
        if picture:
            out.append(f'<img alt="rule {escape(rule_id)}" src="data:image/png;base64,{picture}">')
        out.append("</div>")
    return out


def _rule_index(sources) -> dict:
    from .schedule import load_source
    index = {}
    for src in sources:
        try:
            for ruleset, rule in load_source(src):
                index.setdefault(rule.id, (ruleset, rule))
        except Exception:  # noqa: BLE001  (a picture is a nicety: the page is written without it)
            continue
    return index


def _picture(rule) -> str | None:
    if rule is None:
        return None
    from .render import rule_png
    try:
        data, _ = rule_png(rule)
    except Exception:  # noqa: BLE001  (no renderer installed)
        return None
    return base64.b64encode(data).decode()


def _op_counts(report: Report) -> list:
    out = ["<h2>Torch ops before and after</h2>"]
    for k, g in enumerate(report.graphs):
        before, after = g.op_counts.get("before", {}), g.op_counts.get("after", {})
        if not before and not after:
            continue
        rows = []
        for name in sorted(set(before) | set(after), key=lambda n: (-before.get(n, 0), n)):
            b, a = before.get(name, 0), after.get(name, 0)
            cls = "more" if a > b else "less" if a < b else ""
            rows.append((f"<code>{escape(name)}</code>", b, a, f"<span class={cls}>{a - b:+d}</span>" if a != b else ""))
        out.append(f"<h3>graph {k}: {sum(before.values())} calls &rarr; {sum(after.values())}</h3>")
        out.append(_table(rows, head=("op", "before", "after", "change")))
    return out


def _left_alone(j: dict, report: Report) -> list:
    reasons = [f"<li class=warn>{escape(f)}</li>" for f in j["fallbacks"]]
    att = j["attention"]
    if att["blocks"] > att["fused"]:
        reasons.append(f"<li>{att['blocks'] - att['fused']} of {att['blocks']} attention blocks not fused "
                       "(their form matched no attention rule)</li>")
    if j["opaque"]:
        reasons.append(f"<li>{j['opaque']} ops the op registry does not model were carried through unchanged</li>")
    reasons += [f"<li>{escape(n)}</li>" for n in j["notes"]]
    return ["<h2>Left alone, and why</h2>", "<ul>" + "".join(reasons) + "</ul>" if reasons else "<p>nothing</p>"]


__all__ = ["report_html"]
