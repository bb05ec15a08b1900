"""Symbolic dimensions (graphopt.dims): parsing, arithmetic, evaluation, unify."""
import pytest

from graphopt.dims import Dim, evaluate_shape, shape_of, shape_str, shape_symbols, unify

a, b, c = Dim.sym("a"), Dim.sym("b"), Dim.sym("c")


# -- parse / str -----------------------------------------------------------------------

@pytest.mark.parametrize("text, terms, const", [
    ("a", (("a", 1),), 0),
    ("2c", (("c", 2),), 0),
    ("b+d", (("b", 1), ("d", 1)), 0),
    ("a+2c+3", (("a", 1), ("c", 2)), 3),
    ("c + a + c", (("a", 1), ("c", 2)), 0),   # spaces ignored, repeated symbols merge
    ("7", (), 7),
    ("x_1", (("x_1", 1),), 0),
])
def test_parse(text, terms, const):
    """parse() builds the sorted linear form."""
    d = Dim.parse(text)
    assert d.terms == terms
    assert d.const == const


@pytest.mark.parametrize("text", ["", "a-b", "2*a", "+a", "a+", "a.b", "-3", "1.5", "a++b"])
def test_parse_rejects_garbage(text):
    """Malformed dimension strings raise ValueError."""
    with pytest.raises(ValueError):
        Dim.parse(text)


@pytest.mark.parametrize("text, shown", [
    ("a", "a"), ("2c", "2c"), ("c+a", "a+c"), ("a+2c+3", "a+2c+3"), ("5", "5"), ("0", "0"),
])
def test_str_is_canonical(text, shown):
    """str() is canonical (sorted symbols, constant last) and parses back to the same Dim."""
    d = Dim.parse(text)
    assert str(d) == shown
    assert repr(d) == shown
    assert Dim.parse(str(d)) == d


def test_of_coerces_and_rejects():
    """Dim.of accepts Dim, int and str; rejects bool, float and negatives."""
    assert Dim.of(a) is a
    assert Dim.of(4) == Dim((), 4)
    assert Dim.of("a+1") == a + 1
    for bad in (True, 1.5, None, [1]):
        with pytest.raises(ValueError):
            Dim.of(bad)
    with pytest.raises(ValueError):
        Dim.of(-1)
    with pytest.raises(ValueError):
        Dim((("a", -1),))


def test_is_const_and_symbols():
    d = Dim.parse("b+2a+1")
    assert not d.is_const and d.symbols == ("a", "b")
    assert Dim.of(3).is_const and Dim.of(3).symbols == ()


# -- arithmetic ------------------------------------------------------------------------

def test_add():
    """Addition merges coefficients and constants; ints work on either side."""
    assert str(a + c + c) == "a+2c"
    assert a + Dim.parse("2a+1") == Dim.parse("3a+1")
    assert str(a + 2) == "a+2"
    assert str(2 + a) == "a+2"
    assert a + "b" == Dim.parse("a+b")
    assert Dim.of(2) + 3 == 5


@pytest.mark.parametrize("x, y, expected", [
    ("a+c", "a", "c"),
    ("2c", "c", "c"),
    ("a+2c+3", "c+1", "a+c+2"),
    ("5", "2", "3"),
    ("a+1", "1", "a"),
])
def test_minus_valid(x, y, expected):
    """minus() returns the difference when it is a positive dimension for all sizes."""
    assert Dim.parse(x).minus(Dim.parse(y)) == Dim.parse(expected)
    assert Dim.parse(x) - y == Dim.parse(expected)


@pytest.mark.parametrize("x, y", [
    ("a", "a"),        # zero
    ("a", "b"),        # symbol not present
    ("a", "1"),        # a - 1 may be zero
    ("c", "2c"),       # negative coefficient
    ("2", "3"),        # negative constant
    ("3", "3"),        # zero constant
    ("a+b", "a+b+1"),
])
def test_minus_invalid_returns_none(x, y):
    """minus() returns None (and ``-`` raises) when the result may be <= 0."""
    assert Dim.parse(x).minus(y) is None
    with pytest.raises(ValueError, match="not a positive dimension"):
        Dim.parse(x) - y


def test_evaluate():
    assert (a + c).evaluate({"a": 3, "c": 4}) == 7
    assert Dim.parse("a+2c+3").evaluate({"a": 1, "c": 5}) == 14
    assert Dim.of(6).evaluate({}) == 6


def test_evaluate_missing_symbol():
    """A missing symbol is reported by name."""
    with pytest.raises(ValueError, match="'c'"):
        Dim.parse("a+c").evaluate({"a": 1})


def test_rename():
    """rename() maps symbols and merges ones that collide."""
    assert Dim.parse("a+2c").rename({"a": "x"}) == Dim.parse("x+2c")
    assert Dim.parse("a+b+1").rename({"a": "b"}) == Dim.parse("2b+1")
    assert Dim.parse("a").rename({}) == a


# -- equality / hashing ----------------------------------------------------------------

def test_equality():
    """Dims compare by value; constant dims equal the int; never equal bools or strings."""
    assert Dim.parse("a+c") == Dim.parse("c+a")
    assert Dim.parse("a") != Dim.parse("b")
    assert Dim.parse("a+1") != Dim.parse("a")
    assert Dim.of(3) == 3 and 3 == Dim.of(3)
    assert Dim.of(3) != 4
    assert a != 1
    assert Dim.of(1) != True  # noqa: E712  (bool is not a dimension)
    assert a != "a"


def test_hash_consistent_with_equality():
    """Equal Dims hash equally, so they can be dict keys and set members."""
    x, y = Dim.parse("a+2c"), Dim.parse("c+a+c")
    assert x is not y and hash(x) == hash(y)
    assert len({x, y, Dim.parse("2c+a"), a}) == 2
    table = {x: "found"}
    assert table[y] == "found"


def test_const_dim_hash_matches_int():
    """Objects that compare equal must hash equally (Python data model)."""
    assert hash(Dim.of(3)) == hash(3)
    assert 3 in {Dim.of(3)}


def test_ordering_is_total_on_dims():
    dims = [Dim.parse(t) for t in ("c", "a+1", "a", "2", "b")]
    assert [str(d) for d in sorted(dims)] == ["2", "a", "a+1", "b", "c"]


# -- shapes ----------------------------------------------------------------------------

def test_shape_helpers():
    shape = shape_of(["a", 2, "b+c", a])
    assert shape == (a, Dim.of(2), b + c, a)
    assert shape_str(shape) == "(a, 2, b+c, a)"
    assert shape_symbols(shape) == ["a", "b", "c"]
    assert evaluate_shape(shape, {"a": 2, "b": 3, "c": 4}) == (2, 2, 7, 2)
    assert shape_str(()) == "()"


# -- unify -----------------------------------------------------------------------------

def test_unify_solves():
    """unify solves dims one unknown at a time, in whatever order that takes."""
    assert unify([(Dim.parse("a"), 3), (Dim.parse("a+2c"), 11)]) == {"a": 3, "c": 4}
    # the combined dim comes first: it is solved once 'a' is known
    assert unify([(Dim.parse("a+2c"), 11), (Dim.parse("a"), 3)]) == {"a": 3, "c": 4}
    assert unify([(Dim.parse("2c"), 6), (Dim.of(5), 5)]) == {"c": 3}
    assert unify([]) == {}


def test_unify_uses_binding_and_does_not_mutate_it():
    known = {"a": 2}
    assert unify([(Dim.parse("a+b"), 7)], known) == {"a": 2, "b": 5}
    assert known == {"a": 2}


@pytest.mark.parametrize("pairs, binding", [
    ([(Dim.parse("a"), 3), (Dim.parse("a"), 4)], None),     # contradicting sizes
    ([(Dim.of(5), 6)], None),                               # constant mismatch
    ([(Dim.parse("2c"), 7)], None),                         # not divisible
    ([(Dim.parse("a+b"), 2)], {"a": 2}),                    # b would be 0
    ([(Dim.parse("a+1"), 1)], None),                        # a would be 0
    ([(Dim.parse("a"), 3)], {"a": 2}),                      # contradicts the binding
])
def test_unify_inconsistent(pairs, binding):
    """Inconsistent sizes give None."""
    assert unify(pairs, binding) is None


def test_unify_unsolved_symbol():
    """A symbol that stays unsolved (only seen in a sum) gives None."""
    assert unify([(Dim.parse("a+b"), 5)]) is None
    assert unify([(Dim.parse("a"), 2), (Dim.parse("b+c"), 5)]) is None
