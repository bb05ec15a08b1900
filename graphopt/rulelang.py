"""The text language of hand-written rules (``substitutions/*.rules``).

A rule is an equation between two expressions in the syntax that
:meth:`graphopt.rules.Rule.summary` and :meth:`graphopt.ir.Graph.expression` print,
over inputs declared with their symbolic shapes.  A file is compiled into the
same :class:`~graphopt.rules.Rule` objects as the generated library and checked
by the same verifier (:func:`graphopt.verify.verify_rule`).

Example (``substitutions/attention.rules``, shortened)::

    # comment to the end of the line
    ruleset attention                    # optional, first; default: the file's stem

    # a family: one rule per variant line, each binding names a sub-expression
    variants SCALE:
        scale-mul:    scores = smul(matmul(Q, transpose(K)), s);   sc = s
        scale-div:    scores = sdiv(matmul(Q, transpose(K)), s);   sc = recip(s)

    rule attention-{SCALE}:              # one rule per variant: attention-scale-mul, ...
        inputs Q:(t,d) K:(n,d) V:(n,e) s:()
        matmul(softmax(scores), V)  ==  sdpa(Q, K, V, sc)
        reason "fused attention: softmax(Q K^T * s) V, the T x T scores never materialised"

    rule causal-mask:
        inputs Q:(t,d) K:(n,d) V:(n,e) M:(t,n) s:()
        sdpa_masked(Q, K, V, M, s)  ==  sdpa(Q, K, V, s, is_causal=True)  if M causal
        reason "the mask is the causal mask (guard checked on its value): "
               "SDPA's is_causal, which the flash kernels accept"

Statements (a statement starts in column 1; the lines of its block are indented):

``ruleset NAME``
    Optional, and only as the first statement.  The default is the file's stem
    (``"default"`` for text that has no file name).
``variants VAR:``
    A family of variants; each indented line is ``LABEL: NAME = EXPR; NAME = EXPR ...``
    and every line binds the same names.  A family must be defined before the rules
    that use it.
``rule NAME:``
    ``NAME`` may contain ``{VAR}``: the rule is then written once per variant of
    ``VAR`` (several variables: their product, the first varying slowest), the
    label replacing ``{VAR}``, and each name the variant binds is replaced, as a
    whole sub-expression, wherever it appears in the equation (a binding may use
    names that other families bind, not itself).  The block holds:

    * ``inputs NAME:(DIMS)[:DTYPE] ...`` (may be repeated): the inputs in order.
      ``()`` is a scalar; a dim is a symbol or a sum such as ``c+d``, ``2c``, ``1``, whose
      terms may be products of symbols (``b*h``: two axes merged by a reshape);
      the dtype defaults to ``float32`` (``X:(a,b):bfloat16``).
    * exactly one equation ``LEFT == RIGHT [if NAME GUARD, NAME GUARD ...]``; each side
      is one expression or several, comma-separated (a rule with several mapped
      outputs: ``a, b == c, d``).  Guards (:func:`graphopt.guards.get_guard`:
      ``causal``, ``zeros``, ``eq:<number>``) apply to inputs.
    * at most one ``reason "TEXT"``; string lines right after it continue it.

Expressions: ``op(arg, ..., key=value, ...)`` (tensor arguments first, then
attributes), an input name, or ``expr[i]`` for output ``i`` of a multi-output op
(``split(X, axis=1, left=c)[1]``).  An attribute value is ``True``/``False``, an
integer, a number, a dim (``h``, ``c+d``) or a parenthesised tuple of those.
Identical sub-expressions of one side are one node.  A line continues onto further
indented lines while a parenthesis is open, and an equation onto an indented line that
starts with ``==``.  ``inputs``, ``reason``, ``if``, ``True`` and ``False`` are
reserved (they cannot name an input or a binding).  Within a file, rule names are
unique, and so are rules (two names for one rule, by id, is an error).

Every problem is a :class:`RuleSyntaxError` (or, for a rule that does not hold,
:class:`RuleVerificationError`) whose message is one line ``FILE:LINE:COL: problem``;
nothing is returned from a file that has an error.

API:
    :func:`parse_rules` (text -> rules, type-checked, not verified),
    :func:`load_rule_file` (file -> verified :class:`~graphopt.rules.RuleLibrary`),
    :func:`format_rule` / :func:`format_rules` (rules -> text that parses back to the same
    rule ids, names, reasons and rulesets; families are written out, a rule without a
    name is named by its id).
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from .dims import Dim, shape_str
from .errors import GraphoptError, RuleFormatError, UnknownOpError
from .guards import get_guard
from .ir import Graph
from .ops import get_op
from .ops.base import FLOAT_DTYPES
from .rules import MAX_COEFF, MAX_CONST_DIM, Rule, RuleLibrary

__all__ = ["RuleSyntaxError", "RuleVerificationError", "parse_rules", "load_rule_file",
           "format_rule", "format_rules", "REPO_ROOT"]

# the folder that holds ``graphopt/`` and ``substitutions/``: provenance names files under it
# relative to it, so compiling the shipped files gives the same library on every machine
REPO_ROOT = Path(__file__).resolve().parents[1]

RESERVED = frozenset({"inputs", "reason", "if", "True", "False"})


class RuleSyntaxError(RuleFormatError):
    """A rule file that cannot be compiled; the message is ``FILE:LINE:COL: problem``."""

    def __init__(self, path: str, line: int, col: int, problem: str):
        self.path, self.line, self.col = str(path), line, col
        self.problem = " ".join(str(problem).split())  # one line
        super().__init__(f"{self.path}:{line}:{col}: {self.problem}")

    def __reduce__(self):
        return type(self), (self.path, self.line, self.col, self.problem)


class RuleVerificationError(RuleFormatError):
    """A rule of a file that the verifier refutes; the message names FILE:LINE:COL, the rule
    and the counterexample."""

    def __init__(self, path: str, line: int, col: int, name: str, counterexample: str | None):
        self.path, self.line, self.col, self.name = str(path), line, col, name
        self.counterexample = counterexample
        why = " ".join(str(counterexample or "the two sides differ").split())
        super().__init__(f"{self.path}:{line}:{col}: rule {name} does not hold: {why}")

    def __reduce__(self):
        return type(self), (self.path, self.line, self.col, self.name, self.counterexample)


# -- logical lines ----------------------------------------------------------------------------

@dataclass
class _Line:
    text: str       # comments removed, continuation lines joined by a space
    pos: list       # (line, col) of every character, and one more for the end of the line
    indented: bool  # the first physical line starts with whitespace


_CLOSE = {")": "(", "]": "["}


def _blank(raw: str) -> bool:
    s = raw.strip()
    return not s or s.startswith("#")


def _logical_lines(text: str, path: str) -> list:
    phys = [ln.rstrip("\r") for ln in text.split("\n")]
    out = []
    k = 0
    while k < len(phys):
        if _blank(phys[k]):
            k += 1
            continue
        chars, pos, stack = [], [], []
        indented = phys[k][:1] in (" ", "\t")
        while True:
            raw, lineno = phys[k], k + 1
            string_at = None
            col = 0
            last = 0   # column of the last character kept (comments are not)
            while col < len(raw):
                ch = raw[col]
                here = (lineno, col + 1)
                if string_at is not None:
                    if ch == "\\" and col + 1 < len(raw):
                        chars += [ch, raw[col + 1]]
                        pos += [here, (lineno, col + 2)]
                        col += 2
                        last = col
                        continue
                    if ch == '"':
                        string_at = None
                elif ch == "#":
                    break
                elif ch == '"':
                    string_at = here
                elif ch in "([":
                    stack.append((ch, here))
                elif ch in ")]":
                    if not stack:
                        raise RuleSyntaxError(path, *here, f"unmatched {ch!r}")
                    if stack[-1][0] != _CLOSE[ch]:
                        opener, (ol, oc) = stack[-1]
                        raise RuleSyntaxError(path, *here, f"{ch!r} does not close the {opener!r} "
                                                           f"opened at line {ol}, column {oc}")
                    stack.pop()
                chars.append(ch)
                pos.append(here)
                col += 1
                if not ch.isspace():
                    last = col
            end = (lineno, last + 1)
            if string_at is not None:
                raise RuleSyntaxError(path, *string_at, "unterminated string")
            # continue on the next indented line (blank lines skipped) while a parenthesis
            # is open, or when that line starts with '==' (the right side of an equation)
            nxt = k + 1
            while nxt < len(phys) and _blank(phys[nxt]):
                nxt += 1
            if not stack:
                if nxt < len(phys) and phys[nxt][:1] in (" ", "\t") and phys[nxt].lstrip().startswith("=="):
                    chars.append(" ")
                    pos.append(end)
                    k = nxt
                    continue
                break
            if nxt >= len(phys) or phys[nxt][:1] not in (" ", "\t"):
                opener, where = stack[-1]
                raise RuleSyntaxError(path, *where, f"{opener!r} is never closed")
            chars.append(" ")
            pos.append(end)
            k = nxt
        pos.append(end)
        k += 1
        out.append(_Line("".join(chars), pos, indented))
    return out


# -- a cursor over one logical line ---------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KWARG = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)")
_INT = re.compile(r"-?\d+")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_RULE_NAME = re.compile(r"[A-Za-z0-9_.{}-]+")
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_GUARD = re.compile(r"[^\s,]+")
_DIM_TERM = r"(\d*[A-Za-z_][A-Za-z0-9_]*(\*[A-Za-z_][A-Za-z0-9_]*)*|\d+)"
_DIM_TEXT = re.compile(rf"{_DIM_TERM}(\s*\+\s*{_DIM_TERM})*$")
_TOKEN = re.compile(r"==|[A-Za-z0-9_.:-]+|\S")


class _Cursor:
    def __init__(self, line: _Line, path: str):
        self.t, self.pos, self.path, self.i = line.text, line.pos, path, 0

    def ws(self) -> None:
        while self.i < len(self.t) and self.t[self.i] in " \t":
            self.i += 1

    def at(self, i: int | None = None) -> tuple:
        return self.pos[min(self.i if i is None else i, len(self.pos) - 1)]

    def here(self) -> tuple:
        self.ws()
        return self.at()

    def eol(self) -> bool:
        self.ws()
        return self.i >= len(self.t)

    def peek(self) -> str:
        self.ws()
        return self.t[self.i] if self.i < len(self.t) else ""

    def take(self, regex):
        self.ws()
        m = regex.match(self.t, self.i)
        if m:
            self.i = m.end()
        return m

    def word(self, w: str) -> bool:
        """Consume the keyword ``w`` if it is next (as a whole word)."""
        self.ws()
        m = _NAME.match(self.t, self.i)
        if m and m.group() == w:
            self.i = m.end()
            return True
        return False

    def next_is_word(self, w: str) -> bool:
        self.ws()
        m = _NAME.match(self.t, self.i)
        return bool(m and m.group() == w)

    def found(self) -> str:
        self.ws()
        if self.i >= len(self.t):
            return "end of line"
        return repr(_TOKEN.match(self.t, self.i).group())

    def fail(self, problem: str, at: tuple | None = None):
        raise RuleSyntaxError(self.path, *(at or self.here()), problem)

    def expect(self, ch: str, what: str) -> None:
        if self.peek() != ch:
            self.fail(f"expected {ch!r} {what}, found {self.found()}")
        self.i += 1

    def expect_eol(self, what: str) -> None:
        if not self.eol():
            self.fail(f"unexpected {self.found()} {what}")


# -- syntax trees ---------------------------------------------------------------------------------

@dataclass
class _Name:
    name: str
    at: tuple


@dataclass
class _Value:
    raw: object      # str (a scalar's text) or list of _Value (a tuple)
    at: tuple


@dataclass
class _Call:
    op: str
    at: tuple
    args: list
    attrs: list      # (key, _Value, at)
    index: int | None = None
    index_at: tuple | None = None


@dataclass
class _Equation:
    left: list
    right: list
    eq_at: tuple
    guards: list     # (input name, guard name, name at, guard at)


@dataclass
class _InputDecl:
    name: str
    shape: tuple
    dtype: str
    at: tuple


@dataclass
class _Family:
    var: str
    at: tuple
    variants: list = field(default_factory=list)   # (label, {name: expr}, at)


@dataclass
class _RuleStmt:
    name: str
    at: tuple        # of the name
    line: int
    inputs: list = field(default_factory=list)
    equation: _Equation | None = None
    reason: str | None = None


def _parse_expr(cur: _Cursor):
    start = cur.here()
    m = cur.take(_NAME)
    if not m:
        cur.fail(f"expected an expression, found {cur.found()}")
    if cur.peek() == "(":
        cur.i += 1
        node = _Call(m.group(), start, [], [])
        if cur.peek() != ")":
            while True:
                key_at = cur.here()
                km = cur.take(_KWARG)
                if km:
                    node.attrs.append((km.group(1), _parse_value(cur), key_at))
                else:
                    if node.attrs:
                        cur.fail("a tensor argument cannot follow an attribute (write attributes last)")
                    node.args.append(_parse_expr(cur))
                if cur.peek() == ",":
                    cur.i += 1
                    continue
                if cur.peek() == ")":
                    break
                cur.fail(f"expected ',' or ')' in the arguments of {m.group()}, found {cur.found()}")
        cur.i += 1
    else:
        node = _Name(m.group(), start)
    if cur.peek() == "[":
        cur.i += 1
        idx_at = cur.here()
        im = cur.take(re.compile(r"\d+"))
        if not im:
            cur.fail(f"expected an output index, found {cur.found()}")
        cur.expect("]", "after the output index")
        if isinstance(node, _Name):
            cur.fail(f"{node.name} is not a multi-output op: only op(...)[i] can be indexed", idx_at)
        node.index, node.index_at = int(im.group()), idx_at
    return node


def _parse_value(cur: _Cursor) -> _Value:
    at = cur.here()
    if cur.peek() == "(":
        cur.i += 1
        items = []
        while cur.peek() != ")":
            items.append(_parse_value(cur))
            if cur.peek() == ",":
                cur.i += 1
            elif cur.peek() != ")":
                cur.fail(f"expected ',' or ')' in a tuple, found {cur.found()}")
        cur.i += 1
        return _Value(items, at)
    m = cur.take(re.compile(r"[^,()\[\]=\s]+(?:\s*\+\s*[^,()\[\]=\s]+)*"))
    if not m:
        cur.fail(f"expected an attribute value, found {cur.found()}")
    return _Value(m.group(), at)


def _parse_exprs(cur: _Cursor) -> list:
    out = [_parse_expr(cur)]
    while cur.peek() == ",":
        cur.i += 1
        out.append(_parse_expr(cur))
    return out


def _parse_equation(cur: _Cursor) -> _Equation:
    left = _parse_exprs(cur)
    eq_at = cur.here()
    if not cur.t.startswith("==", cur.i):
        if cur.eol():
            cur.fail("missing '==': an equation is LEFT == RIGHT")
        cur.fail(f"expected '==' or ',' after the left side, found {cur.found()}")
    cur.i += 2
    if cur.eol():
        cur.fail("expected the right side after '=='")
    right = _parse_exprs(cur)
    guards = []
    if cur.word("if"):
        while True:
            name_at = cur.here()
            nm = cur.take(_NAME)
            if not nm:
                cur.fail(f"expected an input name in the guard clause, found {cur.found()}")
            guard_at = cur.here()
            gm = cur.take(_GUARD)
            if not gm:
                cur.fail(f"expected a guard after {nm.group()} (causal, zeros, eq:<number>), "
                         f"found {cur.found()}")
            guards.append((nm.group(), gm.group(), name_at, guard_at))
            if cur.peek() != ",":
                break
            cur.i += 1
    if not cur.eol():
        cur.fail(f"expected ',', 'if' or the end of the equation, found {cur.found()}")
    return _Equation(left, right, eq_at, guards)


def _parse_dims(cur: _Cursor, name: str) -> tuple:
    if cur.peek() != "(":
        cur.fail(f"bad inputs declaration: expected the shape of input {name}, e.g. {name}:(a,b) "
                 f"(a scalar is {name}:()), found {cur.found()}")
    cur.i += 1
    dims = []
    while cur.peek() != ")":
        at = cur.here()
        m = cur.take(re.compile(r"[^,()\s]+(?:\s*\+\s*[^,()\s]+)*"))
        if not m or not _DIM_TEXT.match(m.group()):
            cur.fail(f"bad inputs declaration: invalid dimension {m.group() if m else cur.found()} "
                     f"in the shape of {name} (a dim is a symbol, a number, a product like b*h or a sum like c+d)", at)
        dim = Dim.parse(m.group())
        if dim == 0 or dim.const > MAX_CONST_DIM or any(c > MAX_COEFF for _, c in dim.terms):
            cur.fail(f"bad inputs declaration: dimension {m.group()!r} of {name} is zero or too large", at)
        dims.append(dim)
        if cur.peek() == ",":
            cur.i += 1
        elif cur.peek() != ")":
            cur.fail(f"bad inputs declaration: expected ',' or ')' in the shape of {name}, "
                     f"found {cur.found()}")
    cur.i += 1
    return tuple(dims)


def _parse_inputs(cur: _Cursor) -> list:
    out = []
    while not cur.eol():
        if out and cur.peek() == ",":
            cur.i += 1
        at = cur.here()
        m = cur.take(_NAME)
        if not m:
            cur.fail(f"bad inputs declaration: expected NAME:(dims), found {cur.found()}")
        name = m.group()
        if name in RESERVED:
            cur.fail(f"bad inputs declaration: {name!r} is reserved and cannot name an input", at)
        if cur.peek() != ":":
            cur.fail(f"bad inputs declaration: expected ':' after input {name} (inputs are declared "
                     f"NAME:(dims), e.g. {name}:(a,b)), found {cur.found()}")
        cur.i += 1
        shape = _parse_dims(cur, name)
        dtype = "float32"
        if cur.peek() == ":":
            cur.i += 1
            dt_at = cur.here()
            dm = cur.take(_NAME)
            if not dm or dm.group() not in FLOAT_DTYPES:
                cur.fail(f"bad inputs declaration: unsupported dtype "
                         f"{dm.group() if dm else cur.found()} for {name} "
                         f"(one of {', '.join(FLOAT_DTYPES)})", dt_at)
            dtype = dm.group()
        out.append(_InputDecl(name, shape, dtype, at))
    if not out:
        cur.fail("bad inputs declaration: no inputs after 'inputs'")
    return out


def _parse_string(cur: _Cursor, what: str) -> str:
    m = cur.take(_STRING)
    if not m:
        cur.fail(f"expected a quoted string {what}, found {cur.found()}")
    return re.sub(r"\\(.)", r"\1", m.group(1))


def _parse_strings(cur: _Cursor, what: str) -> str:
    parts = [_parse_string(cur, what)]
    while cur.peek() == '"':
        parts.append(_parse_string(cur, what))
    cur.expect_eol(f"after the {what}")
    return "".join(parts)


# -- statements -------------------------------------------------------------------------------------

def _parse_file(text: str, path: str):
    """(ruleset name or None, [(_Family | _RuleStmt), ...] in file order)."""
    lines = _logical_lines(text, path)
    ruleset = None
    stmts: list = []
    block = None          # the _Family or _RuleStmt whose block we are in
    last_reason = False   # the previous line of this block was a reason (strings may continue it)
    for ln in lines:
        cur = _Cursor(ln, path)
        if ln.indented:
            if block is None:
                cur.fail("indented line outside a 'rule' or 'variants' block")
            if isinstance(block, _Family):
                _parse_variant(cur, block)
            else:
                last_reason = _parse_rule_line(cur, block, last_reason)
            continue
        block, last_reason = None, False
        kw_at = cur.here()
        if cur.word("ruleset"):
            if ruleset is not None or stmts:
                cur.fail("'ruleset' must be the first statement of a file (and appear once)", kw_at)
            at = cur.here()
            m = cur.take(re.compile(r"\S+"))
            if not m or not _SET_NAME.match(m.group()):
                cur.fail(f"expected a ruleset name (letters, digits, '_', '-', '.'), found {cur.found()}", at)
            ruleset = m.group()
            cur.expect_eol("after the ruleset name")
        elif cur.word("variants"):
            at = cur.here()
            m = cur.take(_NAME)
            if not m:
                cur.fail(f"expected a variant variable name after 'variants', found {cur.found()}")
            if any(isinstance(s, _Family) and s.var == m.group() for s in stmts):
                cur.fail(f"variant variable {m.group()} is defined twice", at)
            cur.expect(":", f"after 'variants {m.group()}'")
            cur.expect_eol(f"after 'variants {m.group()}:' (its variants go on the indented lines below)")
            block = _Family(m.group(), at)
            stmts.append(block)
        elif cur.word("rule"):
            at = cur.here()
            m = cur.take(_RULE_NAME)
            if not m:
                cur.fail(f"expected a rule name after 'rule', found {cur.found()}")
            cur.expect(":", f"after 'rule {m.group()}'")
            cur.expect_eol(f"after 'rule {m.group()}:' (the rule goes on the indented lines below)")
            block = _RuleStmt(m.group(), at, at[0])
            stmts.append(block)
        else:
            cur.fail(f"expected 'rule', 'variants' or 'ruleset' at the start of a statement, "
                     f"found {cur.found()}")
    for s in stmts:
        if isinstance(s, _Family) and not s.variants:
            raise RuleSyntaxError(path, *s.at, f"variants {s.var} has no variant lines")
        if isinstance(s, _RuleStmt):
            if not s.inputs:
                raise RuleSyntaxError(path, *s.at, f"rule {s.name} has no 'inputs' line")
            if s.equation is None:
                raise RuleSyntaxError(path, *s.at, f"rule {s.name} has no equation (LEFT == RIGHT)")
    return ruleset, stmts


def _parse_variant(cur: _Cursor, fam: _Family) -> None:
    at = cur.here()
    m = cur.take(_LABEL)
    if not m:
        cur.fail(f"expected a variant label (LABEL: NAME = EXPR; ...), found {cur.found()}")
    label = m.group()
    if any(v[0] == label for v in fam.variants):
        cur.fail(f"variant {label} of {fam.var} is defined twice", at)
    cur.expect(":", f"after the variant label {label}")
    binds: dict = {}
    while not cur.eol():
        b_at = cur.here()
        bm = cur.take(_NAME)
        if not bm:
            cur.fail(f"expected a binding NAME = EXPR, found {cur.found()}")
        if bm.group() in RESERVED:
            cur.fail(f"{bm.group()!r} is reserved and cannot be bound", b_at)
        if bm.group() in binds:
            cur.fail(f"{bm.group()} is bound twice in variant {label}", b_at)
        cur.expect("=", f"after {bm.group()} (a binding is NAME = EXPR)")
        binds[bm.group()] = (_parse_expr(cur), b_at)
        if cur.peek() == ";":
            cur.i += 1
        elif not cur.eol():
            cur.fail(f"expected ';' between bindings, found {cur.found()}")
    if not binds:
        cur.fail(f"variant {label} binds nothing (LABEL: NAME = EXPR; ...)")
    if fam.variants:
        want = list(fam.variants[0][1])
        if sorted(binds) != sorted(want):
            cur.fail(f"variant {label} binds {', '.join(binds)}, but the first variant of {fam.var} "
                     f"binds {', '.join(want)}", at)
    fam.variants.append((label, binds, at))


def _parse_rule_line(cur: _Cursor, rule: _RuleStmt, last_reason: bool) -> bool:
    """One line of a rule block; returns whether it was (a part of) the reason."""
    at = cur.here()
    if cur.peek() == '"':
        if not last_reason:
            cur.fail("a string here must continue a 'reason' line")
        rule.reason += _parse_strings(cur, "reason")
        return True
    if cur.word("inputs"):
        decls = _parse_inputs(cur)
        seen = {d.name for d in rule.inputs}
        for d in decls:
            if d.name in seen:
                cur.fail(f"bad inputs declaration: input {d.name} is declared twice", d.at)
            seen.add(d.name)
        if len(seen) > 8:
            cur.fail("bad inputs declaration: a rule takes at most 8 inputs", decls[-1].at)
        rule.inputs.extend(decls)
        return False
    if cur.word("reason"):
        if rule.reason is not None:
            cur.fail(f"rule {rule.name} has two 'reason' lines", at)
        rule.reason = _parse_strings(cur, "reason")
        return True
    if rule.equation is not None:
        cur.fail(f"rule {rule.name} has a second equation (a rule has one; several outputs are "
                 "written a, b == c, d)", at)
    rule.equation = _parse_equation(cur)
    return False


# -- building rules ------------------------------------------------------------------------------------

def _attr_value(op: str, key: str, kind: str, v: _Value, err):
    """The python value of an attribute written ``v`` for an attribute of this kind."""
    if isinstance(v.raw, list):
        if kind not in ("dims", None):
            err(v.at, f"{op}: attribute {key!r} takes one value, not a tuple")
        return tuple(_attr_value(op, key, "dim" if kind == "dims" else None, x, err) for x in v.raw)
    text = v.raw.strip()
    if kind == "dims":
        err(v.at, f"{op}: attribute {key!r} takes a tuple of dims, e.g. (a, b)")
    if kind == "bool" or (kind is None and text in ("True", "False")):
        if text not in ("True", "False"):
            err(v.at, f"{op}: attribute {key!r} takes True or False, not {text!r}")
        return text == "True"
    if kind == "int" or (kind is None and _INT.fullmatch(text)):
        if not _INT.fullmatch(text):
            err(v.at, f"{op}: attribute {key!r} takes an integer, not {text!r}")
        return int(text)
    if kind == "dim" or (kind is None and _DIM_TEXT.match(text)):
        if not _DIM_TEXT.match(text):
            err(v.at, f"{op}: attribute {key!r} takes a dim (a symbol, a number or a sum like c+d), "
                      f"not {text!r}")
        return int(text) if text.isdigit() else Dim.parse(text)
    try:
        return float(text)
    except ValueError:
        err(v.at, f"{op}: attribute {key!r} has invalid value {text!r}")


class _Builder:
    """Builds one side of one rule, hash-consing identical sub-expressions into one node."""

    def __init__(self, graph: Graph, inputs: dict, bindings: dict, err, rule_name: str, elsewhere: dict):
        self.g, self.inputs, self.bindings, self.err, self.rule = graph, inputs, bindings, err, rule_name
        self.elsewhere = elsewhere   # names bound by families this rule's name does not use -> VAR
        self.memo: dict = {}

    def single(self, expr, expanding: tuple = ()) -> str:
        ref = self.build(expr, expanding)
        if isinstance(ref, tuple):
            self.err(expr.at, f"rule {self.rule}: {expr.op} has {len(ref)} outputs: pick one with "
                              f"{expr.op}(...)[i]")
        return ref

    def build(self, expr, expanding: tuple = ()):
        """``expanding``: the bindings being substituted (a binding may use other bindings,
        not itself)."""
        if isinstance(expr, _Name):
            if expr.name in self.bindings:
                if expr.name in expanding:
                    self.err(expr.at, f"rule {self.rule}: binding {expr.name} refers to itself "
                                      f"(through {' -> '.join(expanding)})")
                return self.build(self.bindings[expr.name], expanding + (expr.name,))
            if expr.name in self.inputs:
                return expr.name
            var = self.elsewhere.get(expr.name)
            hint = f"; {expr.name} is bound by variants {var}: put {{{var}}} in the rule name" if var else ""
            self.err(expr.at, f"rule {self.rule}: undefined input {expr.name!r} "
                              f"(inputs: {', '.join(self.inputs)}){hint}")
        try:
            opdef = get_op(expr.op)
        except UnknownOpError as e:
            self.err(expr.at, f"rule {self.rule}: {e}")
        refs = tuple(self.single(a, expanding) for a in expr.args)
        attrs = {}
        for key, value, key_at in expr.attrs:
            if key in attrs:
                self.err(key_at, f"rule {self.rule}: attribute {key!r} given twice")
            if key not in opdef.attrs:
                known = ", ".join(opdef.attrs) or "none"
                self.err(key_at, f"rule {self.rule}: {expr.op} has no attribute {key!r} "
                                 f"(its attributes: {known})")
            attrs[key] = _attr_value(expr.op, key, opdef.attrs[key].kind, value,
                                     lambda at, msg: self.err(at, f"rule {self.rule}: {msg}"))
        try:
            full = opdef.full_attrs(attrs)
            key = (expr.op, refs, tuple(sorted(full.items())))
            out = self.memo.get(key)
            if out is None:
                out = self.memo[key] = self.g.add(expr.op, *refs, **full)
        except GraphoptError as e:
            self.err(expr.at, f"rule {self.rule}: {e}")
        if expr.index is not None:
            n = len(out) if isinstance(out, tuple) else 1
            if not isinstance(out, tuple) or not 0 <= expr.index < n:
                what = f"has {n} outputs" if n > 1 else "has one output: drop the [i]"
                self.err(expr.index_at, f"rule {self.rule}: output index {expr.index} of {expr.op}: "
                                        f"{expr.op} {what}")
            return out[expr.index]
        return out


def _name_vars(stmt: _RuleStmt, path: str) -> list:
    """The variant variables in a rule name, in order, with their columns."""
    out = []
    line, col = stmt.at
    pos = 0
    name = stmt.name
    while pos < len(name):
        ch = name[pos]
        if ch == "{":
            m = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}").match(name, pos)
            if not m:
                raise RuleSyntaxError(path, line, col + pos, f"malformed variant reference in rule name "
                                                             f"{name!r} (write {{VAR}})")
            out.append((m.group(1), (line, col + pos)))
            pos = m.end()
        elif ch == "}":
            raise RuleSyntaxError(path, line, col + pos, f"unmatched '}}' in rule name {name!r}")
        else:
            pos += 1
    return out


def _compile(text: str, path: str, file: str, default_ruleset: str) -> tuple:
    """(ruleset name, rules) of a file's text."""
    ruleset, stmts = _parse_file(text, path)
    ruleset = ruleset or default_ruleset
    families: dict = {}
    rules: list = []
    names: dict = {}   # rule name -> line
    ids: dict = {}     # rule id -> (name, line)

    def err(at, msg):
        raise RuleSyntaxError(path, *at, msg)

    for stmt in stmts:
        if isinstance(stmt, _Family):
            families[stmt.var] = stmt
            continue
        refs = _name_vars(stmt, path)
        vars_, seen = [], set()
        for var, at in refs:
            if var not in families:
                err(at, f"undefined variant variable {{{var}}} in rule name {stmt.name} "
                        f"(define it with 'variants {var}:' before this rule)")
            if var not in seen:
                seen.add(var)
                vars_.append(var)
        declared = dict.fromkeys(d.name for d in stmt.inputs)   # in order
        guards: dict = {}
        for inp, guard, name_at, guard_at in stmt.equation.guards:
            if inp not in declared:
                err(name_at, f"rule {stmt.name}: guard on {inp!r}, which is not an input "
                             f"(inputs: {', '.join(declared)})")
            if inp in guards:
                err(name_at, f"rule {stmt.name}: input {inp} has two guards")
            try:
                guards[inp] = get_guard(guard).name
            except GraphoptError as e:
                err(guard_at, f"rule {stmt.name}: {e}")
        for combo in itertools.product(*(families[v].variants for v in vars_)):
            name = stmt.name
            bindings: dict = {}
            for var, (label, binds, _) in zip(vars_, combo):
                name = name.replace("{" + var + "}", label)
                for b, (expr, b_at) in binds.items():
                    if b in bindings:
                        err(stmt.at, f"rule {stmt.name}: {b} is bound by both {bindings[b][1]} and {var}")
                    if b in declared:
                        err(b_at, f"rule {name}: variant binding {b} of {var} has the name of an input")
                    bindings[b] = (expr, var)
            if name in names:
                err(stmt.at, f"duplicate rule name {name} (also at line {names[name]})")
            bound = {b: e for b, (e, _) in bindings.items()}
            elsewhere = {b: f.var for f in families.values() for b in f.variants[0][1] if b not in bound}
            sides = []
            for exprs in (stmt.equation.left, stmt.equation.right):
                g = Graph()
                for d in stmt.inputs:
                    g.add_input(d.name, d.shape, d.dtype, guards.get(d.name))
                builder = _Builder(g, declared, bound, err, name, elsewhere)
                g.outputs = [builder.single(e) for e in exprs]
                sides.append(g)
            src, dst = sides
            eq_at = stmt.equation.eq_at
            if len(src.outputs) != len(dst.outputs):
                err(eq_at, f"rule {name}: the left side has {len(src.outputs)} outputs, the right side "
                           f"{len(dst.outputs)}")
            for k, (left, right) in enumerate(zip(src.outputs, dst.outputs)):
                (sa, ta), (sb, tb) = src.type_of(left), dst.type_of(right)
                if (sa, ta) != (sb, tb):
                    which = f"output {k}: " if len(src.outputs) > 1 else ""
                    err(eq_at, f"rule {name}: {which}the left side is {shape_str(sa)} {ta}, "
                               f"the right side {shape_str(sb)} {tb}")
            if src.body_to_json() == dst.body_to_json():
                err(eq_at, f"rule {name}: both sides are the same expression")
            prov = {"source": "hand-written", "file": file, "line": stmt.line, "ruleset": ruleset,
                    "reason": stmt.reason or ""}
            try:
                rule = Rule(src, dst, {}, prov, name=name)
            except GraphoptError as e:
                err(eq_at, f"rule {name}: {e}")
            if rule.id in ids:
                other, line = ids[rule.id]
                err(stmt.at, f"rule {name} is the same rule as {other} (line {line}; id {rule.id})")
            names[name] = stmt.line
            ids[rule.id] = (name, stmt.line)
            rules.append(rule)
    return ruleset, rules


def _default_ruleset(path: str) -> str:
    stem = Path(str(path)).stem
    return stem if _SET_NAME.match(stem) else "default"


def parse_rules(text: str, path: str = "<string>") -> list:
    """Parse, build and type-check the rules of a rule file's text, without verifying them.

    Args:
        text: the file's text.
        path: named in error messages and recorded as the rules' ``provenance["file"]``;
            its stem is the default ruleset name.
    Returns:
        the rules, families expanded, in file order; each has ``name``, ``evidence={}`` and
        ``provenance={"source": "hand-written", "file", "line", "ruleset", "reason"}``.
    Raises:
        RuleSyntaxError: ``"{path}:{line}:{col}: problem"`` for the first problem found.

    Example:
        >>> [r.summary() for r in parse_rules('''
        ... rule neg-involution:
        ...     inputs X:(a,b)
        ...     neg(neg(X))  ==  X
        ... ''')]
        ['neg(neg(X))  ==  X']
    """
    return _compile(text, str(path), str(path), _default_ruleset(path))[1]


def _provenance_file(path) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def load_rule_file(path, verify: bool = True, plan=None) -> RuleLibrary:
    """Compile a ``.rules`` file into a rule library, verifying every rule.

    Args:
        path: the file.  Inside the repository, provenance and ``meta["sources"]`` name it
            relative to the repository root (so the compiled library is the same everywhere).
        verify: run :func:`graphopt.verify.verify_rule` (float tests and Z3) on every rule and
            store its evidence; with False, rules carry ``evidence={}``.
        plan: the float test (default ``FloatPlan(seeds=(1, 2, 3), shapes=2)``).
    Returns:
        a :class:`RuleLibrary` whose meta has ``description``, ``sources`` ({file: sha256 of
        its text}) and, when verified, ``float_plan``.
    Raises:
        RuleSyntaxError: the file does not compile (nothing is returned).
        RuleVerificationError: a rule does not hold: ``file:line:col: rule NAME does not hold:
            <counterexample>``.
        RuleFormatError: the file cannot be read.
    """
    from .verify import TOLERANCES, FloatPlan, verify_rule
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleFormatError(f"{path}: no such rule file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise RuleFormatError(f"{path}: cannot read rule file ({type(e).__name__})") from None
    file = _provenance_file(path)
    ruleset, rules = _compile(text, str(path), file, _default_ruleset(path))
    meta = {"description": f"hand-written rules (ruleset {ruleset}) compiled from {file}",
            "sources": {file: hashlib.sha256(text.encode("utf-8")).hexdigest()}}
    if verify:
        plan = plan or FloatPlan(seeds=(1, 2, 3), shapes=2)
        for rule in rules:
            verdict = verify_rule(rule.src, rule.dst, plan, z3=True)
            if not verdict.passed:
                line = rule.provenance["line"]
                raise RuleVerificationError(str(path), line, _name_col(text, line), rule.name,
                                            verdict.counterexample)
            rule.evidence = verdict.evidence
        meta["float_plan"] = {"dtype": "float64", "tolerance": list(TOLERANCES["float64"]),
                              "seeds": list(plan.seeds), "shapes": plan.shapes}
    return RuleLibrary(rules, meta=meta)


def _name_col(text: str, line: int) -> int:
    """Column of the rule name on the ``rule`` line ``line``."""
    raw = text.split("\n")[line - 1]
    m = re.match(r"\s*rule\s+", raw)
    return m.end() + 1 if m else 1


# -- printing ---------------------------------------------------------------------------------------

def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fmt_input(i) -> str:
    text = f"{i.name}:(" + ",".join(str(d) for d in i.shape) + ")"
    return text if i.dtype == "float32" else f"{text}:{i.dtype}"


def format_rule(rule: Rule) -> str:
    """One rule as a ``rule`` block of the text language (a rule without a name is named by
    its id); the equation is printed as :meth:`Rule.summary` prints it.

    Example:
        >>> print(format_rule(rule), end="")
        rule neg-involution:
            inputs X:(a,b)
            neg(neg(X))  ==  X
            reason "a target without operators cannot be enumerated"
    """
    name = rule.name or rule.id
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"rule name {name!r} cannot be written in a rule file "
                         "(letters, digits, '_', '-', '.')")
    guards = ", ".join(f"{i.name} {i.guard}" for i in rule.inputs if i.guard)
    equation = f"{rule.src.expression()}  ==  {rule.dst.expression()}"
    lines = [f"rule {name}:",
             "    inputs " + " ".join(_fmt_input(i) for i in rule.inputs),
             f"    {equation}  if {guards}" if guards else f"    {equation}"]
    reason = (rule.provenance or {}).get("reason")
    if reason:
        lines.append(f"    reason {_quote(reason)}")
    return "\n".join(lines) + "\n"


def format_rules(rules, ruleset: str | None = None) -> str:
    """Rules as the text of a rule file (families written out one rule each).

    Args:
        rules: rules (or a RuleLibrary).
        ruleset: the ``ruleset`` statement to write; by default the ruleset the rules'
            provenance names (none if they name none; ValueError if they name several).
    """
    rules = list(rules)
    if ruleset is None:
        sets = {(r.provenance or {}).get("ruleset") for r in rules} - {None}
        if len(sets) > 1:
            raise ValueError(f"the rules come from several rulesets ({', '.join(sorted(sets))}): "
                             "pass ruleset=, or format each ruleset separately")
        ruleset = next(iter(sets), None)
    if ruleset is not None and not _SET_NAME.match(ruleset):
        raise ValueError(f"invalid ruleset name {ruleset!r}")
    parts = [f"ruleset {ruleset}\n"] if ruleset else []
    parts += [format_rule(r) for r in rules]
    return "\n".join(parts)
