"""Symbolic tensor dimensions.

A rule must hold for every size, so the generator works with *symbolic*
dimensions: each is a linear form over size symbols with a non-negative
integer constant, e.g. ``a``, ``2c``, ``b+d`` or ``1``.  Concatenating two
tensors adds their dimensions; splitting subtracts.  A term may also be a
product of symbols, ``b*h`` (the batch and head axes merged into one by a
reshape, as 3-D attention code does).  Concrete graphs (a real model) use
constant dimensions only, so one type serves both.

Example:
    >>> a, c = Dim.sym("a"), Dim.sym("c")
    >>> str(a + c + c)
    'a+2c'
    >>> ((a + c) - a) == c
    True
    >>> (a + c).evaluate({"a": 3, "c": 4})
    7
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Mapping

_TERM = re.compile(r"^(\d*)([A-Za-z_][A-Za-z_0-9]*(?:\*[A-Za-z_][A-Za-z_0-9]*)*)$")


def factors(term: str) -> list:
    """The symbols a term multiplies: ``"b*h"`` -> ``["b", "h"]``."""
    return term.split("*")


def _monomial(names) -> str:
    return "*".join(sorted(names))


class Dim:
    """A dimension: ``sum(coeff * symbol) + const`` with non-negative integers."""

    __slots__ = ("terms", "const", "_hash")

    def __init__(self, terms: tuple = (), const: int = 0):
        self.terms = tuple(sorted((s, c) for s, c in terms if c))
        self.const = int(const)
        if self.const < 0 or any(c < 0 for _, c in self.terms):
            raise ValueError(f"negative dimension {self}")
        # a constant dim equals its int, so it must hash like it
        self._hash = hash(self.const) if not self.terms else hash((self.terms, self.const))

    @staticmethod
    def sym(name: str) -> "Dim":
        return Dim(((name, 1),))

    @staticmethod
    def of(value) -> "Dim":
        """Coerce an int, a Dim or a string such as ``"a+2c"`` into a Dim."""
        if isinstance(value, Dim):
            return value
        if isinstance(value, bool):
            raise ValueError(f"not a dimension: {value!r}")
        if isinstance(value, int):
            return Dim((), value)
        if isinstance(value, str):
            return Dim.parse(value)
        raise ValueError(f"not a dimension: {value!r}")

    @staticmethod
    def parse(text: str) -> "Dim":
        terms: dict[str, int] = {}
        const = 0
        for part in text.replace(" ", "").split("+"):
            if part.isdigit():
                const += int(part)
                continue
            m = _TERM.match(part)
            if not m:
                raise ValueError(f"invalid dimension {text!r}")
            name = _monomial(factors(m.group(2)))
            terms[name] = terms.get(name, 0) + int(m.group(1) or 1)
        return Dim(tuple(terms.items()), const)

    @property
    def is_const(self) -> bool:
        return not self.terms

    @property
    def symbols(self) -> tuple:
        """The size symbols this dimension depends on (the factors of a product too)."""
        out: list = []
        for s, _ in self.terms:
            for f in factors(s):
                if f not in out:
                    out.append(f)
        return tuple(out)

    def monomial(self):
        """``(coefficient, sorted symbols)`` when the dimension is one product (``2b*h``, ``a``,
        ``3``), else None."""
        if not self.terms:
            return self.const, ()
        if len(self.terms) == 1 and not self.const:
            s, c = self.terms[0]
            return c, tuple(factors(s))
        return None

    def __add__(self, other) -> "Dim":
        other = Dim.of(other)
        merged = dict(self.terms)
        for s, c in other.terms:
            merged[s] = merged.get(s, 0) + c
        return Dim(tuple(merged.items()), self.const + other.const)

    __radd__ = __add__

    def minus(self, other) -> "Dim | None":
        """``self - other`` when it is a valid dimension (> 0 for every size), else None."""
        other = Dim.of(other)
        merged = dict(self.terms)
        for s, c in other.terms:
            left = merged.get(s, 0) - c
            if left < 0:
                return None
            merged[s] = left
        const = self.const - other.const
        result_terms = tuple((s, c) for s, c in merged.items() if c)
        if const < 0 or (not result_terms and const == 0):
            return None
        return Dim(result_terms, const)

    def __sub__(self, other) -> "Dim":
        result = self.minus(other)
        if result is None:
            raise ValueError(f"{self} - {Dim.of(other)} is not a positive dimension")
        return result

    def __mul__(self, other) -> "Dim":
        """The product of two dimensions (a polynomial with non-negative coefficients)."""
        other = Dim.of(other)
        merged: dict[str, int] = {}
        mine = list(self.terms) + ([("", self.const)] if self.const else [])
        theirs = list(other.terms) + ([("", other.const)] if other.const else [])
        const = 0
        for s, c in mine:
            for t, k in theirs:
                names = [f for f in (factors(s) if s else []) + (factors(t) if t else [])]
                if not names:
                    const += c * k
                    continue
                m = _monomial(names)
                merged[m] = merged.get(m, 0) + c * k
        return Dim(tuple(merged.items()), const)

    __rmul__ = __mul__

    def divide(self, factor) -> "Dim | None":
        """``self / factor`` when the division is exact for every size (``12s / 4 = 3s``,
        ``2a*b / a = 2b``), else None."""
        factor = Dim.of(factor)
        m = factor.monomial()
        if m is None or m[0] == 0:
            return None
        coeff, names = m
        if self.const and names or self.const % coeff:
            return None
        terms = []
        for s, c in self.terms:
            rest = list(factors(s))
            for f in names:
                if f not in rest:
                    return None
                rest.remove(f)
            if c % coeff:
                return None
            if not rest:
                return None if self.terms and len(self.terms) > 1 or self.const else Dim((), c // coeff)
            terms.append((_monomial(rest), c // coeff))
        return Dim(tuple(terms), self.const // coeff)

    def substitute(self, binding: Mapping) -> "Dim":
        """The dimension with each bound symbol replaced by its size, a number or a Dim
        (a rule's symbols bound to a graph's symbolic sizes); raises ValueError for an
        unbound symbol."""
        out = Dim((), self.const)
        for s, c in self.terms:
            term = Dim((), c)
            for f in factors(s):
                if f not in binding:
                    raise ValueError(f"no size given for symbol {f!r} in dimension {self}")
                term = term * binding[f]
            out = out + term
        return out

    def symbol(self) -> str | None:
        """The symbol's name when the dimension is exactly one symbol (``s0``), else None."""
        if len(self.terms) == 1 and not self.const and self.terms[0][1] == 1 and "*" not in self.terms[0][0]:
            return self.terms[0][0]
        return None

    def compose(self, symbol, mul, add, number):
        """The dimension built with the given operations (fx nodes, ONNX values): ``symbol(name)``
        for a symbol, ``number(k)`` for a constant, ``mul``/``add`` to combine two parts."""
        total = None
        for term, coeff in self.terms:
            value = None
            for f in factors(term):
                s = symbol(f)
                value = s if value is None else mul(value, s)
            if coeff != 1:
                value = mul(value, number(coeff))
            total = value if total is None else add(total, value)
        if self.const or total is None:
            total = number(self.const) if total is None else add(total, number(self.const))
        return total

    def hint(self) -> int:
        """The size this dimension has in the example being optimised (:func:`size_hints`)."""
        if not self.terms:
            return self.const
        return self.evaluate(_HINTS.get())

    def evaluate(self, binding: Mapping[str, int]) -> int:
        try:
            return self.const + sum(c * _product(binding[f] for f in factors(s)) for s, c in self.terms)
        except KeyError as e:
            raise ValueError(f"no size given for symbol {e.args[0]!r} in dimension {self}") from None

    def rename(self, mapping: Mapping[str, str]) -> "Dim":
        merged: dict[str, int] = {}
        for s, c in self.terms:
            t = _monomial(mapping.get(f, f) for f in factors(s))
            merged[t] = merged.get(t, 0) + c
        return Dim(tuple(merged.items()), self.const)

    def __eq__(self, other) -> bool:
        if isinstance(other, int) and not isinstance(other, bool):
            return not self.terms and self.const == other
        return isinstance(other, Dim) and self.terms == other.terms and self.const == other.const

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: "Dim") -> bool:
        """An arbitrary total order of Dims (for sorting), not a comparison of sizes: a
        symbolic size compared with a number is a TypeError."""
        if not isinstance(other, Dim):
            return NotImplemented
        return (self.terms, self.const) < (other.terms, other.const)

    def __str__(self) -> str:
        parts = [(f"{c}{s}" if c != 1 else s) for s, c in self.terms]
        if self.const or not parts:
            parts.append(str(self.const))
        return "+".join(parts)

    __repr__ = __str__


def from_expression(expr):
    """A size written as a sympy expression or a string (``"s0"``, ``"12*s0 + 12"``,
    ONNX's ``dim_param``) as an int or a Dim, when it is a polynomial with non-negative
    integer coefficients in its symbols; None otherwise (``s0 - 1``, ``s0 // 2``)."""
    import sympy
    if isinstance(expr, str):
        if not re.fullmatch(r"[A-Za-z0-9_\s+*]+", expr):   # only sums and products are read (sympify evaluates)
            return None
        try:
            expr = sympy.sympify(expr, locals={n: sympy.Symbol(n) for n in re.findall(r"[A-Za-z_]\w*", expr)})
        except Exception:  # noqa: BLE001  (not an expression sympy reads: not a size)
            return None
    if expr.is_Integer:
        return int(expr)
    terms, const = {}, 0
    for mono, coeff in sympy.expand(expr).as_coefficients_dict().items():
        if not coeff.is_Integer or coeff < 0:
            return None
        if mono == 1:
            const += int(coeff)
            continue
        names = []
        for f in sympy.Mul.make_args(mono):
            base, exp = f.as_base_exp()
            if not (base.is_Symbol and exp.is_Integer and exp > 0) or not re.fullmatch(r"[A-Za-z_]\w*", str(base)):
                return None
            names += [str(base)] * int(exp)
        key = "*".join(sorted(names))
        terms[key] = terms.get(key, 0) + int(coeff)
    return plain(Dim(tuple(terms.items()), const))


def plain(d):
    """A dimension as the IR's working graphs store it: an int when it is one, else the Dim."""
    d = Dim.of(d)
    return d.const if not d.terms else d


def hint_of(d) -> int:
    """An int, or a symbolic Dim's size in the example being optimised."""
    return d.hint() if isinstance(d, Dim) else int(d)


_HINTS: ContextVar = ContextVar("graphopt_size_hints", default={})
_REFUSED: ContextVar = ContextVar("graphopt_refused_sizes", default=None)


def refused() -> set:
    """Within :func:`size_hints`: the size equations of rules that held at the example's sizes
    but not for every size (``"a+64 = s0"``), so the rule was not applied there."""
    out = _REFUSED.get()
    return set() if out is None else out


def _note_refused(d, v, known, factor) -> None:
    """Record an equation that failed symbolically but holds at the hints (a rule whose side
    condition depends on a symbolic size, refused)."""
    seen = _REFUSED.get()
    if seen is None:
        return
    try:
        v_hint = Dim.of(v).hint()
        if factor is None:
            holds = Dim.of(known).hint() == v_hint
        else:
            left, f = v_hint - Dim.of(known).hint(), Dim.of(factor).hint()
            holds = left > 0 and f > 0 and left % f == 0
    except ValueError:
        return
    if holds:
        seen.add(f"{d} = {v}")


@contextmanager
def size_hints(hints: Mapping[str, int]):
    """Within the block, symbolic sizes have these example values (cost models read them).

    Example:
        >>> with size_hints({"s0": 40}):
        ...     (Dim.sym("s0") * 12).hint()
        480
    """
    token = _HINTS.set({**_HINTS.get(), **hints})
    refused_token = _REFUSED.set(set())
    try:
        yield
    finally:
        _HINTS.reset(token)
        _REFUSED.reset(refused_token)


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def same_size(a, b) -> bool:
    """Whether two shapes hold the same number of elements for every size: each dimension
    a product of symbols (or a number), and the products agree (``(b*h, t, n)`` and
    ``(b, h, t, n)``)."""
    from collections import Counter
    out = []
    for shape in (a, b):
        coeff, syms = 1, Counter()
        for d in shape:
            m = Dim.of(d).monomial()
            if m is None:
                return False
            coeff *= m[0]
            syms.update(m[1])
        out.append((coeff, syms))
    return out[0] == out[1]


Shape = tuple  # tuple[Dim, ...]


def shape_of(dims) -> tuple:
    """Coerce a sequence of ints / strings / Dims to a Shape (tuple of Dim)."""
    return tuple(Dim.of(d) for d in dims)


def shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def evaluate_shape(shape, binding: Mapping[str, int]) -> tuple:
    return tuple(d.evaluate(binding) for d in shape)


def shape_symbols(shape) -> list:
    seen: list = []
    for d in shape:
        for s in d.symbols:
            if s not in seen:
                seen.append(s)
    return seen


def unify(pairs, binding: Mapping[str, int] | None = None) -> dict | None:
    """Solve symbolic dims against concrete sizes.

    Args:
        pairs: iterable of (Dim, int).
        binding: sizes already known.
    Returns:
        the completed binding, or None when the sizes are inconsistent (or a
        symbol is left unsolved).

    Example:
        >>> unify([(Dim.parse("a"), 3), (Dim.parse("a+2c"), 11)])
        {'a': 3, 'c': 4}
    """
    solved = solve(pairs, binding)
    if solved is None or solved[1]:
        return None
    return solved[0]


def solve(pairs, binding: Mapping | None = None):
    """Like :func:`unify`, but returns ``(binding, unsolved_symbols)``; None if inconsistent.

    A dimension such as ``c+d`` fixes neither symbol alone; those stay unsolved.  A size may
    itself be symbolic (a graph whose prompt length is a symbol ``s0``): a pattern symbol is
    then bound to a Dim, and only when the equation holds for every value of ``s0``
    (``a`` against ``12s0`` gives ``a = 12s0``; ``a+64`` against ``s0`` has no solution).
    """
    out = dict(binding or {})
    pending = [(Dim.of(d), v if isinstance(v, Dim) and v.terms else int(v)) for d, v in pairs]
    progress = True
    while pending and progress:
        progress, rest = False, []
        for d, v in pending:
            unknown = [(s, c) for s, c in d.terms if any(f not in out for f in factors(s))]
            symbolic = isinstance(v, Dim) or any(isinstance(out[f], Dim) for s, _ in d.terms
                                                 for f in factors(s) if f in out)
            if not unknown:
                if (plain(d.substitute(out)) if symbolic else d.evaluate(out)) != v:
                    if symbolic:
                        _note_refused(d, v, d.substitute(out), None)
                    return None
                progress = True
                continue
            missing = [f for s, _ in unknown for f in factors(s) if f not in out]
            if len(unknown) == 1 and len(missing) == 1:
                s, c = unknown[0]
                known_terms = tuple(t for t in d.terms if t != unknown[0])
                if symbolic:
                    factor = Dim((), c)
                    for f in factors(s):
                        if f in out:
                            factor = factor * out[f]
                    known = Dim(known_terms, d.const).substitute(out)
                    left = Dim.of(v) if known == 0 else Dim.of(v).minus(known)
                    value = None if left is None else left.divide(factor)
                    if value is None or value == 0:
                        _note_refused(d, v, known, factor)
                        return None
                    out[missing[0]] = plain(value)
                else:
                    c *= _product(out[f] for f in factors(s) if f in out)
                    known = d.const + sum(k * _product(out[f] for f in factors(t)) for t, k in known_terms)
                    if (v - known) <= 0 or (v - known) % c:
                        return None
                    out[missing[0]] = (v - known) // c
                progress = True
            else:
                rest.append((d, v))
        pending = rest
    unsolved = sorted({f for d, _ in pending for f in d.symbols if f not in out})
    return out, unsolved
