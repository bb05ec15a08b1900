"""The text language of hand-written rules (graphopt.rulelang) and the shipped .rules files."""
import hashlib
from pathlib import Path

import pytest

from graphopt.errors import RuleFormatError
from graphopt.rulelang import (RuleSyntaxError, RuleVerificationError, format_rule, format_rules,
                               load_rule_file, parse_rules)

SUBS = Path(__file__).resolve().parent.parent / "substitutions"
FILES = ("attention", "fusion", "canonical")

# the hand-written rules, by name and id: the first 32 as they were before the attention forms of
# PyTorch's pattern catalogue (unscaled, safe softmax, the scale split between Q and K, masks
# added in turn) were added; an edit that changes an old rule's id fails here
PINNED = {
    "attention": [
        ("attention-scale-mul", "rb8ca33bcb7"),
        ("attention-scale-div", "rbdd85eb014"),
        ("attention-q-scale-mul", "r29a70e2706"),
        ("attention-q-scale-div", "r1e0190a24c"),
        ("attention-k-scale-mul", "r0dd196f5fa"),
        ("attention-k-scale-div", "rc636039c97"),
        ("attention-masked-scale-mul", "rca2f700142"),
        ("attention-masked-scale-div", "r9b5107b6a0"),
        ("attention-masked-q-scale-mul", "r07dbc5e302"),
        ("attention-masked-q-scale-div", "r0c330a4550"),
        ("attention-masked-k-scale-mul", "r8d9ad056b0"),
        ("attention-masked-k-scale-div", "r39e792a35f"),
        ("attention-keymasked-scale-mul", "r8ee5b7eed8"),
        ("attention-keymasked-scale-div", "r4728b54f8d"),
        ("attention-keymasked-q-scale-mul", "r4822486c0e"),
        ("attention-keymasked-q-scale-div", "refa394653f"),
        ("attention-keymasked-k-scale-mul", "rd2c0b37e6a"),
        ("attention-keymasked-k-scale-div", "r951daa0a9f"),
        ("attention-sink-scale-mul", "r4e3a0fe80b"),
        ("attention-sink-scale-div", "r2a1b4dd2fd"),
        ("attention-sink-q-scale-mul", "r70c90fffe7"),
        ("attention-sink-q-scale-div", "r0b277f18c7"),
        ("attention-sink-k-scale-mul", "ra57d6a3a14"),
        ("attention-sink-k-scale-div", "r847d3acf24"),
        ("attention-sink-masked-scale-mul", "r137820ceba"),
        ("attention-sink-masked-scale-div", "r0e7f477408"),
        ("attention-sink-masked-q-scale-mul", "r86d8722c03"),
        ("attention-sink-masked-q-scale-div", "rc481e84fa7"),
        ("attention-sink-masked-k-scale-mul", "r65e3cc3f7a"),
        ("attention-sink-masked-k-scale-div", "rf538a80df5"),
        ("attention-sink-lse-masked-scale-mul", "r1b764965f9"),
        ("attention-sink-lse-masked-scale-div", "r4ec67d0112"),
        ("attention-sink-lse-masked-q-scale-mul", "r48073f3549"),
        ("attention-sink-lse-masked-q-scale-div", "r22944000d4"),
        ("attention-sink-lse-masked-k-scale-mul", "ra5a796e98a"),
        ("attention-sink-lse-masked-k-scale-div", "r279d09139c"),
        ("attention-safe-scale-mul", "rc04ca2e54d"),
        ("attention-safe-scale-div", "rf2ac60fc9b"),
        ("attention-safe-q-scale-mul", "rfff7d4e4ef"),
        ("attention-safe-q-scale-div", "r1d226918d0"),
        ("attention-safe-k-scale-mul", "rd7d8a3cf3f"),
        ("attention-safe-k-scale-div", "ree54a60609"),
        ("attention-masked-safe-scale-mul", "rdf35ebca0b"),
        ("attention-masked-safe-scale-div", "r2e48cc5ceb"),
        ("attention-masked-safe-q-scale-mul", "rd7ef0c33c6"),
        ("attention-masked-safe-q-scale-div", "r965c7e0ae1"),
        ("attention-masked-safe-k-scale-mul", "rbb1c899f83"),
        ("attention-masked-safe-k-scale-div", "r356791e3b1"),
        ("attention-keymasked-safe-scale-mul", "r12397184f2"),
        ("attention-keymasked-safe-scale-div", "r007c22e83f"),
        ("attention-keymasked-safe-q-scale-mul", "r84984112dc"),
        ("attention-keymasked-safe-q-scale-div", "r0bfe93137b"),
        ("attention-keymasked-safe-k-scale-mul", "rbc6b56c237"),
        ("attention-keymasked-safe-k-scale-div", "r9ca5f773af"),
        ("attention-qk-scale-mul", "r449490c084"),
        ("attention-qk-scale-mul-kt", "r0541db4b5e"),
        ("attention-masked-qk-scale-mul", "r3e3473aac8"),
        ("attention-masked-qk-scale-mul-kt", "rc65b2e5717"),
        ("attention-safe-qk-scale-mul", "re2073d1689"),
        ("attention-safe-qk-scale-mul-kt", "r3ac1c90cb4"),
        ("attention-masked-safe-qk-scale-mul", "r6ff01e85c0"),
        ("attention-masked-safe-qk-scale-mul-kt", "r58953bc018"),
        ("attention-unscaled", "r69be10b44a"),
        ("attention-masked-unscaled", "reaac4ba714"),
        ("attention-keymasked-unscaled", "rd199d9ccf4"),
        ("causal-mask", "r85998cf7bb"),
        ("sink-causal-mask", "r5c626702a6"),
        ("sink-per-head-causal-mask", "r5ad826f51f"),
        ("clamp-after-causal-mask", "rbc34a1b1a9"),
        ("zero-mask", "r7634fc81d9"),
        ("causal-mask-gqa", "rd3d2435b2b"),
        ("zero-mask-gqa", "re26eddfabb"),
        ("gqa", "r4104ba5768"),
        ("gqa-causal", "r21e068f9ac"),
        ("gqa-masked", "rab5b64e82b"),
    ],
    "canonical": [
        ("alias-is-its-input", "r2e3aa604fc"),
        ("sdiv-to-smul-recip", "ra97a80f377"),
        ("transpose-involution", "rd8925a11f3"),
        ("neg-involution", "rd1797f7588"),
        ("relu-idempotent", "r9bd4fcce57"),
        ("sdiv-smul-cancel", "rc2958be515"),
        ("add-as-badd-before-softmax", "rabc80ab560"),
        ("mask-sum-badd", "r257320ae6f"),
        ("mask-sum-add", "r33c5733fe4"),
        ("mask-sum-sink-badd", "raad00855a1"),
        ("mask-sum-sink-add", "r8dcbd5d3aa"),
        ("mask-sum-row", "r65f179e432"),
        ("mask-sum-then-row-badd", "rc6969e04aa"),
        ("mask-sum-then-row-add", "r9baa3d8a83"),
        ("mask-sum-rows", "r081da527c5"),
        ("softmax-shift", "r12d408ff2b"),
        ("repeat-heads-of-transpose", "rf428a30a97"),
        ("lift-scores-matmul", "r73f36f637d"),
        ("lift-scores-scale", "r319264f0aa"),
        ("lift-scores-bias", "rf14b84f224"),
        ("lift-softmax", "r75a6cd2de2"),
        ("lift-weights-matmul", "r9f84b94200"),
        ("unmerge-merge", "r3aa8982622"),
        ("merge-unmerge", "r7b7aed4fca"),
        ("addmm-batch-axes", "r4a80fe3908"),
        ("add-zeros", "r3204c07980"),
    ],
    "fusion": [
        ("gelu-tanh", "ra8b33fe68b"),
        ("gelu-tanh-epilogue", "r0dc596a9dd"),
    ],
}


def _read(stem):
    path = SUBS / f"{stem}.rules"
    return path, path.read_text()


def _key(rules):
    return [(r.id, r.name, r.provenance["reason"], r.provenance["ruleset"]) for r in rules]


# -- the shipped files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    """Each shipped file compiled and verified (float tests and Z3): about a second."""
    return {stem: load_rule_file(SUBS / f"{stem}.rules") for stem in FILES}


def test_shipped_files_pin_every_rule(shipped):
    for stem in FILES:
        assert [(r.name, r.id) for r in shipped[stem]] == PINNED[stem], stem
    assert sum(len(v) for v in PINNED.values()) == 103


def test_shipped_rules_pass_the_verifier(shipped):
    for stem, lib in shipped.items():
        for r in lib:
            assert r.evidence["float"]["passed"] and r.evidence["float"]["cases"] > 0, r.name
            assert r.evidence["z3"] in ("proved", "not-algebraic"), r.name
        _, text = _read(stem)
        assert lib.meta["sources"] == {f"substitutions/{stem}.rules": hashlib.sha256(text.encode()).hexdigest()}
        assert lib.meta["float_plan"]["seeds"] == [1, 2, 3] and lib.meta["float_plan"]["shapes"] == 2
        assert lib.meta["description"]
    # the ones Z3 can prove, it proves
    assert shipped["canonical"]["sdiv-smul-cancel"].evidence["z3"] == "proved"


@pytest.mark.parametrize("stem", FILES)
def test_shipped_file_round_trips_through_the_printer(stem):
    path, text = _read(stem)
    rules = parse_rules(text, str(path))
    printed = format_rules(rules)
    again = parse_rules(printed)
    assert _key(again) == _key(rules)
    assert format_rules(again) == printed          # the printer is a fixed point
    for r in rules:                                # each rule printed alone parses back too
        (one,) = parse_rules(format_rule(r))
        assert (one.id, one.name) == (r.id, r.name)
        assert format_rule(r).splitlines()[2].strip() == r.summary()


def test_provenance_names_file_line_and_ruleset(shipped):
    _, text = _read("attention")
    lines = text.splitlines()
    family_line = lines.index("rule attention-{SCALE}:") + 1
    causal_line = lines.index("rule causal-mask:") + 1
    lib = shipped["attention"]
    assert lib["attention-q-scale-div"].provenance == {
        "source": "hand-written", "file": "substitutions/attention.rules", "line": family_line,
        "ruleset": "attention",
        "reason": "fused attention: softmax(Q K^T * s) V, the T x T scores never materialised"}
    causal = lib["causal-mask"]
    assert causal.provenance["line"] == causal_line
    assert causal.provenance["reason"] == ("the mask is the causal mask (guard checked on its value): "
                                           "SDPA's is_causal, which the flash kernels accept")
    assert [i.guard for i in causal.inputs] == [None, None, None, "causal", None]
    assert shipped["canonical"]["neg-involution"].provenance["ruleset"] == "canonical"


def test_provenance_outside_the_repository(tmp_path):
    path = tmp_path / "mine.rules"
    path.write_text("rule double-neg:\n    inputs X:(a,b)\n    neg(neg(X))  ==  X\n")
    (rule,) = load_rule_file(path, verify=False)
    assert rule.provenance == {"source": "hand-written", "file": str(path), "line": 1,
                               "ruleset": "mine", "reason": ""}
    assert rule.evidence == {}


# -- the language ------------------------------------------------------------------------------

def test_families_guards_continuations_and_dtypes():
    text = '''
# two families: their product, the first varying slowest
ruleset demo
variants OP:
    neg:  f = neg(X)
    relu: f = relu(X)
variants W:
    plain: g = f
    twice: g = add(f, f)     # identical sub-expressions are one node

rule sum-{OP}-{W}:
    inputs X:(a,b):float64
    inputs Y:(a,
              b):float64
    add(g,
        Y)
        ==  add(Y, g)
    reason "addition "
           "commutes"

rule split-{W}:
    inputs X:(a,b) V:(a,c+d) s:()
    split(V, axis=-1, left=c)[0], smul(split(V, axis=-1, left=c)[1], s), g
        ==  split(V, axis=-1, left=c)[0], split(V, axis=-1, left=c)[1], g  if s eq:1
'''
    with pytest.raises(RuleSyntaxError, match=r"<string>:8:16: rule split-plain: undefined input 'f' "
                                              r".*f is bound by variants OP: put \{OP\} in the rule name"):
        parse_rules(text)
    text = text.replace("split-{W}", "split-{W}-{OP}")
    rules = parse_rules(text)
    assert [r.name for r in rules] == [
        "sum-neg-plain", "sum-neg-twice", "sum-relu-plain", "sum-relu-twice",
        "split-plain-neg", "split-plain-relu", "split-twice-neg", "split-twice-relu"]
    r = rules[1]
    assert r.summary() == "add(add(neg(X), neg(X)), Y)  ==  add(Y, add(neg(X), neg(X)))"
    assert r.src.op_names() == ["neg", "add", "add"]              # one neg node
    assert [i.dtype for i in r.inputs] == ["float64", "float64"]
    assert r.provenance["reason"] == "addition commutes" and r.provenance["ruleset"] == "demo"
    assert r.provenance["line"] == 11
    s = rules[6]
    assert s.src.op_names() == ["split", "smul", "neg", "add"]    # one split node
    assert len(s.src.outputs) == 3
    assert s.inputs[2].guard == "eq:1.0"                          # normalised
    again = parse_rules(format_rules(rules))
    assert _key(again) == _key(rules)
    assert "X:(a,b):float64 Y:(a,b):float64" in format_rule(r)
    assert format_rules(again) == format_rules(rules)


def test_a_binding_cannot_refer_to_itself():
    text = "variants S:\n    one: y = neg(y)\n\nrule r-{S}:\n    inputs X:(a,b)\n    y  ==  X\n"
    with pytest.raises(RuleSyntaxError, match=r"<string>:2:18: rule r-one: binding y refers to itself"):
        parse_rules(text)


def test_a_false_rule_is_refused_with_its_counterexample(tmp_path):
    path = tmp_path / "false.rules"
    path.write_text("# relu is not the identity\nrule relu-identity:\n    inputs X:(a,b)\n    relu(X)  ==  X\n")
    with pytest.raises(RuleVerificationError) as e:
        load_rule_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2:6: rule relu-identity does not hold: ")
    assert e.value.counterexample and e.value.counterexample in msg
    assert "left" in msg and "\n" not in msg
    lib = load_rule_file(path, verify=False)                      # it parses and type-checks
    assert len(lib) == 1


def test_z3_refutation_is_refused(tmp_path):
    path = tmp_path / "false.rules"
    path.write_text("rule wrong:\n    inputs X:(a,b) s:()\n    smul(X, s)  ==  sdiv(X, s)\n")
    with pytest.raises(RuleVerificationError, match=r"false.rules:1:6: rule wrong does not hold: "):
        load_rule_file(path)


def test_nothing_is_half_loaded(tmp_path):
    good = "rule one:\n    inputs X:(a,b)\n    neg(neg(X))  ==  X\n\n"
    path = tmp_path / "two.rules"
    path.write_text(good + "rule two:\n    inputs X:(a,b)\n    relu(relu(X)  ==  relu(X)\n")
    with pytest.raises(RuleSyntaxError, match=r"two.rules:7:9: '\(' is never closed"):
        load_rule_file(path)
    with pytest.raises(RuleSyntaxError):
        load_rule_file(path, verify=False)
    path.write_text(good + "rule two:\n    inputs X:(a,b)\n    relu(relu(X))  ==  X\n")
    with pytest.raises(RuleVerificationError, match="rule two does not hold"):
        load_rule_file(path)


def test_unreadable_file():
    with pytest.raises(RuleFormatError, match="no such rule file"):
        load_rule_file("/nonexistent/x.rules")


R = "rule r:\n    inputs X:(a,b)\n"     # a rule whose 3rd line is the equation

ERRORS = [
    # (text, line, col, part of the problem)
    (R + "    neg(neg(X)  ==  X\n", 3, 8, "'(' is never closed"),
    (R + "    neg(neg(X)))  ==  X\n", 3, 16, "unmatched ')'"),
    (R + "    neg(neg(X) X)  ==  X\n", 3, 16, "expected ',' or ')' in the arguments of neg, found 'X'"),
    (R + "    neg(X]  ==  X\n", 3, 10, "']' does not close the '('"),
    (R + "    neg(negate(X))  ==  X\n", 3, 9, "unknown op 'negate'"),
    (R + "    neg(matmul(X))  ==  X\n", 3, 9, "matmul takes 2 input(s), got 1"),
    ("rule r:\n    inputs X:(a,b) Y:(a,b)\n    matmul(X, Y)  ==  matmul(Y, X)\n", 3, 5,
     "inner dimensions differ"),
    (R + "    transpose(X)  ==  X\n", 3, 19, "the left side is (b, a) float32, the right side (a, b) float32"),
    (R + "    neg(neg(Y))  ==  X\n", 3, 13, "undefined input 'Y'"),
    (R + "    neg(neg(X))  ==  X  if X triangular\n", 3, 30, "unknown guard 'triangular'"),
    (R + "    neg(neg(X))  ==  X  if Z causal\n", 3, 28, "guard on 'Z', which is not an input"),
    (R + "    neg(neg(X))\n", 3, 16, "missing '=='"),
    (R + "    neg(neg(X))  X\n", 3, 18, "expected '==' or ','"),
    (R + "    neg(neg(X))  ==  X\n\n" + R + "    relu(relu(X))  ==  relu(X)\n", 5, 6, "duplicate rule name r"),
    ("rule r-{S}:\n    inputs X:(a,b)\n    neg(neg(X))  ==  X\n", 1, 8, "undefined variant variable {S}"),
    (R + "    neg(X)  ==  neg(X)\n", 3, 13, "both sides are the same"),
    ("rule r:\n    inputs X:(a,b) Y(a,b)\n    neg(neg(X))  ==  X\n", 2, 21, "bad inputs declaration"),
    ("rule r:\n    inputs X:(a,b):int8\n    neg(neg(X))  ==  X\n", 2, 20, "bad inputs declaration: unsupported dtype"),
    ("rule r:\n    inputs X:(a,-b)\n    neg(neg(X))  ==  X\n", 2, 17, "bad inputs declaration: invalid dimension"),
    ("rule r:\n    inputs X:(a,b) X:(a,b)\n    neg(neg(X))  ==  X\n", 2, 20, "bad inputs declaration: input X is declared twice"),
    ("rule r:\n    inputs X:(a,0)\n    neg(neg(X))  ==  X\n", 2, 17, "bad inputs declaration: dimension '0'"),
    ("rule r:\n    inputs\n    neg(neg(X))  ==  X\n", 2, 11, "bad inputs declaration: no inputs"),
    (R + "    neg(X)[1]  ==  X\n", 3, 12, "neg has one output"),
    ("rule r:\n    inputs V:(a,c+d)\n    split(V, axis=-1, left=c)  ==  V\n", 3, 5, "split has 2 outputs"),
    (R + "    transpose(transpose(X, dim0=x))  ==  X\n", 3, 33, "takes an integer, not 'x'"),
    (R + "    transpose(transpose(X, axis=1))  ==  X\n", 3, 28, "transpose has no attribute 'axis'"),
    ("rule r:\n    neg(neg(X))  ==  X\n", 1, 6, "rule r has no 'inputs' line"),
    (R + "    reason \"nothing\"\n", 1, 6, "rule r has no equation"),
    (R + "    neg(neg(X))  ==  X\n    relu(relu(X))  ==  relu(X)\n", 4, 5, "second equation"),
    ("variants S:\n    one: y = neg(X)\n\n" + R + "    neg(y)  ==  X\n", 6, 9, "put {S} in the rule name"),
    ("  rule r:\n", 1, 3, "indented line outside"),
    ("rules r:\n", 1, 1, "expected 'rule', 'variants' or 'ruleset'"),
    (R + "    neg(neg(X))  ==  X\n    reason \"unterminated\n", 4, 12, "unterminated string"),
    (R + "    neg(neg(X))  ==  X\nruleset late\n", 4, 1, "'ruleset' must be the first statement"),
    ("variants S:\n    one: y = neg(X)\n    two: z = relu(X)\n", 3, 5, "binds z, but the first variant"),
    (R + "    neg(neg(X))  ==  X\n\nrule q:\n    inputs Y:(c,d)\n    neg(neg(Y))  ==  Y\n", 5, 6,
     "rule q is the same rule as r"),
]


@pytest.mark.parametrize("text, line, col, problem", ERRORS, ids=[e[3][:40] for e in ERRORS])
def test_errors_name_line_and_column(text, line, col, problem):
    with pytest.raises(RuleSyntaxError) as e:
        parse_rules(text, "bad.rules")
    msg = str(e.value)
    assert msg.startswith(f"bad.rules:{line}:{col}: "), msg
    assert problem in msg, msg
    assert "\n" not in msg
    assert (e.value.line, e.value.col) == (line, col)
    assert isinstance(e.value, RuleFormatError)


def test_the_documented_example_compiles():
    import textwrap

    import graphopt.rulelang as rl
    doc = rl.__doc__
    example = textwrap.dedent(doc[doc.index("::\n") + 3:doc.index("\nStatements")])
    rules = parse_rules(example)
    assert [r.name for r in rules] == ["attention-scale-mul", "attention-scale-div", "causal-mask"]
    assert {r.id for r in rules} <= {i for pairs in PINNED.values() for _, i in pairs}
    assert rules[0].provenance["ruleset"] == "attention"
