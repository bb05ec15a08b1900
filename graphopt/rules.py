"""Rules and rule libraries.

A rule says that two graphs over the same inputs compute the same outputs:
``src.outputs[i] == dst.outputs[i]`` for every i, for every size of the shape
symbols.  Rules are equivalences; the optimizer may apply them either way.
Generated and hand-written rules share this one format and pass the same
verifier; each records its *evidence* (which verification layers it passed) and
its *provenance* (who made it, how).

Library file format (``schema_version`` 1)::

    {"format": "graphopt-rules", "schema_version": 1,
     "registry_version": "...", "graphopt_version": "...",
     "generator": {...settings...}, "stats": {...stage statistics...},
     "rules": [{"id": "r0123456789", "name": null,
                "inputs": [{"name": "X", "shape": ["a", "b"], "dtype": "float32"}, ...],
                "src": {"nodes": [{"op": "matmul", "inputs": ["X", "Y"], "attrs": {}}, ...],
                        "outputs": ["%1"]},
                "dst": {...},
                "evidence": {"fingerprint": true, "float": {...}, "z3": "proved"},
                "provenance": {"source": "generator", ...}}, ...]}

Rule ids are a hash of the rule's canonical form (inputs and shape symbols
renamed by first use, sides in canonical order), so they are stable across
runs and identical for rules that are equal up to renaming.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .dims import Dim, evaluate_shape
from .errors import GraphoptError, RuleFormatError
from .ir import Graph, parse_ref
from .ops import get_op, registry_version

FORMAT = "graphopt-rules"
SCHEMA_VERSION = 1
DEFAULT_LIBRARY = Path(__file__).resolve().parent.parent / "substitutions" / "default.json"


@dataclass
class InputSpec:
    name: str
    shape: tuple      # concrete sizes
    dtype: object     # torch.dtype
    symbolic: tuple   # the rule's symbolic shape, e.g. ("a", "b")


@dataclass
class Rule:
    src: Graph
    dst: Graph
    evidence: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    name: str | None = None
    id: str = ""

    def __post_init__(self):
        if [i.name for i in self.src.inputs] != [i.name for i in self.dst.inputs]:
            raise RuleFormatError("rule sides must declare the same inputs")
        if len(self.src.outputs) != len(self.dst.outputs) or not self.src.outputs:
            raise RuleFormatError(
                f"rule sides map different numbers of outputs ({len(self.src.outputs)} vs {len(self.dst.outputs)})")
        for a, b in zip(self.src.outputs, self.dst.outputs):
            if self.src.type_of(a) != self.dst.type_of(b):
                raise RuleFormatError(
                    f"mapped outputs {a} and {b} have different types {self.src.type_of(a)} vs {self.dst.type_of(b)}")
        if not self.id:
            self.id = rule_id(self)

    @property
    def inputs(self):
        return self.src.inputs

    @property
    def ops(self) -> set:
        return set(self.src.op_names()) | set(self.dst.op_names())

    @property
    def size(self) -> tuple:
        return (self.src.num_ops(), self.dst.num_ops())

    def layers(self) -> list:
        """Verification layers this rule passed, e.g. ['fingerprint', 'float', 'z3']."""
        ev = self.evidence
        out = [k for k in ("fingerprint",) if ev.get(k)]
        if ev.get("float", {}).get("passed"):
            out.append("float")
        if ev.get("z3") == "proved":
            out.append("z3")
        return out

    def summary(self) -> str:
        guards = ", ".join(f"{i.name} {i.guard}" for i in self.inputs if i.guard)
        text = f"{self.src.expression()}  ==  {self.dst.expression()}"
        return f"{text}  if {guards}" if guards else text

    def as_torch(self, binding: dict | None = None):
        """Both sides as plain torch callables, and the inputs they take.

        Args:
            binding: sizes for the shape symbols; by default small distinct sizes.
        Returns:
            ``(src_fn, dst_fn, input_specs)``; each fn takes the inputs positionally
            and returns a tuple of outputs (mapped outputs at the same position).
            The fns accept other sizes too; sizes that input shapes leave open (the
            split point ``c`` of a ``c+d`` dimension) come from ``binding``.

        Example:
            >>> src_fn, dst_fn, specs = rule.as_torch()
            >>> xs = [torch.randn(s.shape, dtype=s.dtype) for s in specs]
            >>> torch.testing.assert_close(src_fn(*xs), dst_fn(*xs))
        """
        import torch
        from .verify import graph_symbols, instantiations
        binding = binding or instantiations(graph_symbols(self.src), 1)[0]
        specs = [InputSpec(i.name, evaluate_shape(i.shape, binding), getattr(torch, i.dtype),
                           tuple(str(d) for d in i.shape)) for i in self.inputs]
        return self.src.to_torch(binding), self.dst.to_torch(binding), specs

    # -- serialisation ---------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "inputs": [i.to_json() for i in self.inputs],
            "src": self.src.body_to_json(),
            "dst": self.dst.body_to_json(),
            "evidence": self.evidence,
            "provenance": self.provenance,
        }

    @staticmethod
    def from_json(obj: dict, where: str = "rule", check_id: bool = True) -> "Rule":
        if not isinstance(obj, dict):
            raise RuleFormatError(f"{where}: expected an object, got {type(obj).__name__}")
        missing = [k for k in ("inputs", "src", "dst") if k not in obj]
        if missing:
            raise RuleFormatError(f"{where}: missing field(s) {', '.join(missing)}")
        where = f"{where} {obj.get('id') or ''}".strip()
        _check_inputs(obj["inputs"], where)
        for key, kind in (("evidence", dict), ("provenance", dict), ("name", str)):
            if obj.get(key) is not None and not isinstance(obj[key], kind):
                raise RuleFormatError(f"{where}: \"{key}\" must be a{'n object' if kind is dict else ' string'}")
        if isinstance((obj.get("evidence") or {}).get("float"), (str, list, int, float)):
            raise RuleFormatError(f'{where}: "evidence.float" must be an object')
        src = Graph.from_json(obj["inputs"], obj["src"], f"{where}: src")
        dst = Graph.from_json(obj["inputs"], obj["dst"], f"{where}: dst")
        given = obj.get("id") if not check_id else None
        if src.body_to_json() == dst.body_to_json():
            raise RuleFormatError(f"{where}: both sides are the same graph")
        rule = Rule(src, dst, obj.get("evidence") or {}, obj.get("provenance") or {}, obj.get("name"),
                    id=given or "")
        if check_id and obj.get("id") and obj["id"] != rule.id:
            raise RuleFormatError(f"{where}: id does not match the rule's content (expected {rule.id})")
        return rule


MAX_CONST_DIM = 1 << 16
MAX_COEFF = 64


def _check_inputs(inputs, where: str) -> None:
    """Rule inputs: a list of {name, shape: [dims], dtype}; sizes sane (rules are
    verified by evaluating them, so absurd sizes would exhaust memory)."""
    from .dims import Dim
    if not isinstance(inputs, list):
        raise RuleFormatError(f'{where}: "inputs" must be a list')
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
            raise RuleFormatError(f'{where}: each input needs "name" and a "shape" list')
        for d in spec["shape"]:
            try:
                dim = Dim.of(d)
            except (ValueError, TypeError):
                raise RuleFormatError(f"{where}: input {spec.get('name')!r}: invalid dimension {d!r}") from None
            if dim == 0 or dim.const > MAX_CONST_DIM or any(c > MAX_COEFF for _, c in dim.terms):
                raise RuleFormatError(f"{where}: input {spec.get('name')!r}: dimension {d!r} is zero or too large")
    if len(inputs) > 8:
        raise RuleFormatError(f"{where}: more than 8 inputs")


# -- canonical form ------------------------------------------------------------------------

def _render(graph: Graph, ref: str, names: dict, syms: dict, memo: dict) -> str:
    if ref in memo:
        return memo[ref]
    key, out = parse_ref(ref)
    if out is None:
        return names[key]
    node = graph.nodes[key]
    parts = [_render(graph, r, names, syms, memo) for r in node.inputs]
    if get_op(node.op).commutative:
        parts.sort()
    for k, v in node.attrs:
        if get_op(node.op).attrs[k].default == v:
            continue
        if isinstance(v, Dim):
            v = v.rename(syms)
        parts.append(f"{k}={v}")
    text = f"{node.op}({','.join(parts)})" + (f"[{out}]" if len(node.outs) > 1 else "")
    memo[ref] = text
    return text


def canonical_key(rule: Rule) -> str:
    """The same string for rules equal up to renaming inputs / shape symbols, swapping the
    operands of commutative ops, reordering mapped outputs and swapping sides."""
    inputs = rule.inputs
    groups: dict = {}
    for i in inputs:
        groups.setdefault((len(i.shape), i.dtype, i.guard or ""), []).append(i)
    best = None
    group_list = list(groups.values())
    for perm in itertools.product(*(itertools.permutations(g) for g in group_list)):
        order = [i for g in perm for i in g]
        names = {i.name: f"i{k}" for k, i in enumerate(order)}
        syms: dict = {}
        for i in order:
            for d in i.shape:
                for s in d.symbols:
                    syms.setdefault(s, f"s{len(syms)}")
        head = ";".join(f"{names[i.name]}:{','.join(str(d.rename(syms)) for d in i.shape)}:{i.dtype}"
                        + (f":{i.guard}" if i.guard else "") for i in order)
        sides = []
        for g in (rule.src, rule.dst):
            memo: dict = {}
            sides.append(tuple(_render(g, r, names, syms, memo) for r in g.outputs))
        # mapped outputs are an unordered set of pairs and the sides may be swapped:
        # sort the pairs for both orientations and keep the smaller
        pairs = min(sorted(zip(sides[0], sides[1])), sorted(zip(sides[1], sides[0])))
        key = head + "|" + " ; ".join(f"{x} == {y}" for x, y in pairs)
        if best is None or key < best:
            best = key
    return best


def rule_id(rule: Rule) -> str:
    return "r" + hashlib.sha1(canonical_key(rule).encode()).hexdigest()[:10]


# -- libraries -------------------------------------------------------------------------

class RuleLibrary:
    """An ordered collection of rules with the metadata of how they were made."""

    def __init__(self, rules: Iterable[Rule] = (), meta: dict | None = None):
        self.rules: list = []
        self._by_id: dict = {}
        self.meta = dict(meta or {})
        for r in rules:
            self.add(r)

    def add(self, rule: Rule) -> bool:
        """Add a rule unless one equal to it (same id) is present; returns whether added."""
        if rule.id in self._by_id:
            return False
        self._by_id[rule.id] = rule
        self.rules.append(rule)
        return True

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __contains__(self, rule_or_id) -> bool:
        key = rule_or_id if isinstance(rule_or_id, str) else rule_or_id.id
        return key in self._by_id

    def __getitem__(self, rule_id: str) -> Rule:
        if rule_id in self._by_id:
            return self._by_id[rule_id]
        matches = [r for r in self.rules if r.id.startswith(rule_id) or r.name == rule_id]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise KeyError(f"no rule with id {rule_id!r}")
        raise KeyError(f"rule id {rule_id!r} is ambiguous ({len(matches)} rules)")

    def with_op(self, op: str) -> list:
        get_op(op)  # unknown op -> UnknownOpError
        return [r for r in self.rules if op in r.ops]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "registry_version": registry_version(),
            **{k: v for k, v in self.meta.items() if k not in ("format", "schema_version", "registry_version")},
            "rules": [r.to_json() for r in self.rules],
        }

    def dumps(self) -> str:
        """JSON text with one rule per line: compact, yet diffs show which rules changed."""
        obj = self.to_json()
        rules = obj.pop("rules")
        head = json.dumps(obj, indent=1)[:-2]
        body = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in rules)
        return head + ',\n "rules": [\n' + body + "\n ]\n}\n"

    def save(self, path) -> None:
        """Write atomically: a reader sees the old file or the complete new one, never a part."""
        write_atomic(path, self.dumps())

    @staticmethod
    def load(path=None, check_ids: bool = True) -> "RuleLibrary":
        """Read a library file.  ``check_ids=False`` skips recomputing every rule's
        canonical id (seconds for the default library); rules are still validated."""
        path = Path(path) if path is not None else DEFAULT_LIBRARY
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RuleFormatError(f"{path}: no such rule library") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
            raise RuleFormatError(f"{path}: cannot read rule library ({type(e).__name__})") from None
        try:
            obj = json.loads(text)
        except RecursionError:
            raise RuleFormatError(f"{path}: JSON nested too deeply") from None
        except json.JSONDecodeError as e:
            raise RuleFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                                  "the file may be truncated") from None
        return RuleLibrary.from_json(obj, str(path), check_ids)

    @staticmethod
    def from_json(obj, where: str = "library", check_ids: bool = True) -> "RuleLibrary":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise RuleFormatError(f"{where}: not a graphopt rule library (missing \"format\": \"{FORMAT}\")")
        version = obj.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise RuleFormatError(f"{where}: unsupported schema version {version!r} "
                                  f"(this graphopt reads version {SCHEMA_VERSION})")
        rules = obj.get("rules")
        if not isinstance(rules, list):
            raise RuleFormatError(f"{where}: \"rules\" must be a list")
        meta = {k: v for k, v in obj.items() if k != "rules"}
        lib = RuleLibrary(meta=meta)
        for k, r in enumerate(rules):
            rule = Rule.from_json(r, f"{where}: rule #{k}", check_id=check_ids)
            if not lib.add(rule):
                raise RuleFormatError(f"{where}: rule #{k} duplicates rule {rule.id}")
        return lib


def write_atomic(path, data) -> None:
    """Write ``data`` (str or bytes) to ``path`` via a temporary file and a rename."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise GraphoptError(f"{path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_rules(path=None, check_ids: bool = True) -> RuleLibrary:
    """Load a rule library; by default the shipped ``substitutions/default.json``.

    Example:
        >>> lib = graphopt.load_rules()
        >>> rule = lib[lib.rules[0].id]
    """
    return RuleLibrary.load(path, check_ids)
