"""Rule objects, the library format, loading errors and atomic writes."""
import json

import pytest
import torch

from graphopt.errors import RuleFormatError
from graphopt.rules import RuleLibrary, load_rules


def test_as_torch_runs_both_sides(fresh_library):
    for rule in list(fresh_library)[:50]:
        src_fn, dst_fn, specs = rule.as_torch()
        torch.manual_seed(0)
        xs = [torch.randn(s.shape, dtype=torch.float64) if s.shape else torch.tensor(1.7, dtype=torch.float64)
              for s in specs]
        a, b = src_fn(*xs), dst_fn(*xs)
        assert len(a) == len(b) == len(rule.src.outputs)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9)


def test_as_torch_specs_follow_the_binding(fresh_library):
    rule = next(r for r in fresh_library if "matmul" in r.ops)
    syms = sorted({s for i in rule.inputs for d in i.shape for s in d.symbols})
    _, _, specs = rule.as_torch({s: 10 + k for k, s in enumerate(syms)})
    for spec, inp in zip(specs, rule.inputs):
        assert spec.dtype == torch.float32
        assert len(spec.shape) == len(inp.shape) and all(n >= 10 for n in spec.shape)


def test_round_trip(tmp_path, fresh_library):
    path = tmp_path / "lib.json"
    fresh_library.save(path)
    again = RuleLibrary.load(path)
    assert [r.id for r in again] == [r.id for r in fresh_library]
    assert again.meta["stats"] == fresh_library.meta["stats"]
    assert oct(path.stat().st_mode & 0o777) != "0o600"


def test_lookup_by_prefix(fresh_library):
    rule = fresh_library.rules[0]
    assert fresh_library[rule.id[:9]] is rule
    with pytest.raises(KeyError):
        fresh_library["r-no-such"]


def _write(tmp_path, obj_or_text):
    p = tmp_path / "bad.json"
    p.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text))
    return p


def _minimal_rule():
    return {"inputs": [{"name": "X", "shape": ["a", "b"]}],
            "src": {"nodes": [{"op": "neg", "inputs": ["X"]}, {"op": "neg", "inputs": ["%0"]},
                              {"op": "relu", "inputs": ["%1"]}], "outputs": ["%2"]},
            "dst": {"nodes": [{"op": "relu", "inputs": ["X"]}], "outputs": ["%0"]}}


def _lib(**over):
    obj = {"format": "graphopt-rules", "schema_version": 1, "rules": [_minimal_rule()]}
    obj.update(over)
    return obj


def test_minimal_library_loads(tmp_path):
    lib = load_rules(_write(tmp_path, _lib()))
    assert len(lib) == 1


@pytest.mark.parametrize("content, message", [
    ('{"format": "graphopt-rules", "schema_ver', "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "not a graphopt rule library"),
    (_lib(schema_version=99), "unsupported schema version 99"),
    (_lib(rules={}), "must be a list"),
    (_lib(rules=[{"inputs": []}]), "missing field"),
    (_lib(rules=[dict(_minimal_rule(), src={"nodes": [{"op": "frobnicate", "inputs": ["X"]}],
                                            "outputs": ["%0"]})]), "unknown op 'frobnicate'"),
    (_lib(rules=[dict(_minimal_rule(), src={"nodes": [{"op": "neg", "inputs": ["Q"]}],
                                            "outputs": ["%0"]})]), "unknown tensor 'Q'"),
    (_lib(rules=[dict(_minimal_rule(), src={"nodes": [{"op": "matmul", "inputs": ["X", "X"]}],
                                            "outputs": ["%0"]})]), "inner dimensions"),
    (_lib(rules=[dict(_minimal_rule(), id="r0000000000")]), "id does not match"),
    (_lib(rules=[_minimal_rule(), _minimal_rule()]), "duplicates"),
])
def test_bad_library_files(tmp_path, content, message):
    with pytest.raises(RuleFormatError, match=message) as info:
        load_rules(_write(tmp_path, content))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(RuleFormatError, match="no such rule library"):
        load_rules(tmp_path / "nope.json")


def test_failed_write_leaves_old_file(tmp_path, fresh_library, monkeypatch):
    path = tmp_path / "lib.json"
    path.write_text("old")

    import graphopt.rules as rules_mod

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(rules_mod.os, "replace", boom)
    with pytest.raises(OSError):
        fresh_library.save(path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["lib.json"]


def test_shipped_library_metadata(default_library):
    meta = default_library.meta
    assert meta["generator"]["max_ops"] == 4
    assert meta["generator"]["seed"] == 0
    assert meta["stats"]["rules"] == len(default_library) > 743
    assert meta["registry_version"]


def test_every_rule_holds_on_fresh_seeds_and_shapes(fresh_library):
    """Property: rules hold both ways on seeds and sizes they were not generated with."""
    from hypothesis import given, settings, strategies as st

    from graphopt.check import check_rule
    rules = list(fresh_library)

    @settings(max_examples=60, deadline=None, database=None)
    @given(st.integers(0, len(rules) - 1), st.integers(1000, 10 ** 6))
    def prop(index, seed):
        assert check_rule(rules[index], seed=seed, dtypes=("float64",)) is None

    prop()


def test_check_rule_rejects_a_false_rule():
    from graphopt.check import check_rule
    from graphopt.rules import Rule
    lib = RuleLibrary.from_json({"format": "graphopt-rules", "schema_version": 1, "rules": [{
        "inputs": [{"name": "X", "shape": ["a", "b"]}, {"name": "Y", "shape": ["b", "c"]}],
        "src": {"nodes": [{"op": "matmul", "inputs": ["X", "Y"]}, {"op": "relu", "inputs": ["%0"]}],
                "outputs": ["%1"]},
        "dst": {"nodes": [{"op": "relu", "inputs": ["X"]}, {"op": "matmul", "inputs": ["%0", "Y"]}],
                "outputs": ["%1"]}}]})
    rule = lib.rules[0]
    assert isinstance(rule, Rule)
    assert "differ" in check_rule(rule)


def test_hand_written_rules_share_the_format_and_verifier():
    from pathlib import Path

    from graphopt.check import check_rule
    path = Path(__file__).resolve().parent.parent / "substitutions" / "handwritten.json"
    lib = load_rules(path)
    names = {r.name for r in lib}
    assert {"transpose-involution", "relu-idempotent"} <= names
    for rule in lib:
        assert rule.provenance["source"] == "hand-written"
        assert "float" in rule.layers()
        assert check_rule(rule, dtypes=("float32", "float64"), z3=True) is None
    assert lib["relu-idempotent"].dst.expression() == "relu(X)"
    assert lib["transpose-involution"].dst.outputs == ["X"]
