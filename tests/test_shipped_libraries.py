"""The shipped JSON libraries are up to date with their sources: handwritten.json with the
text rules in substitutions/*.rules, default.json with the generator and the registry."""
import json
from pathlib import Path

from graphopt.enumerate import DEFAULT_OPS, default_inputs
from graphopt.generate import GenerateSettings
from graphopt.rules import load_rules
from graphopt.schedule import SHIPPED, compile_hand_written, hand_written_sources, stale_sources


def test_handwritten_json_is_compiled_from_the_rules_files():
    """`graphopt rules compile` would write exactly the committed file (an edit to a .rules file
    without recompiling fails here; an edit to the JSON by hand fails here too)."""
    lib = compile_hand_written()
    assert SHIPPED["handwritten"].read_text() == lib.dumps(), "run: graphopt rules compile"
    shipped = load_rules(SHIPPED["handwritten"])
    assert not stale_sources(shipped)
    assert sorted(shipped.meta["sources"]) == sorted(f"substitutions/{p.name}" for p in hand_written_sources())
    for r in shipped:
        prov = r.provenance
        assert prov["source"] == "hand-written" and prov["file"].endswith(".rules") and prov["line"] > 0
        assert prov["ruleset"] in ("attention", "canonical", "fusion") and r.layers()


def test_an_edited_rules_file_makes_the_compiled_library_stale(tmp_path, monkeypatch):
    import graphopt.schedule as sch
    lib = load_rules(SHIPPED["handwritten"])
    root = tmp_path / "repo"
    (root / "substitutions").mkdir(parents=True)
    for rel in lib.meta["sources"]:
        (root / rel).write_text((Path(sch.SUBSTITUTIONS.parent) / rel).read_text())
    monkeypatch.setattr(sch, "SUBSTITUTIONS", root / "substitutions")
    assert not sch.stale_sources(lib)
    f = root / "substitutions" / "fusion.rules"
    f.write_text(f.read_text() + "\n# an edit\n")
    assert sch.stale_sources(lib) == ["substitutions/fusion.rules"]


def test_shipped_libraries_were_made_with_this_op_registry():
    """A change of an operator's signature (its arity, attributes, algebraic flag) can change
    what a stored rule means: the shipped libraries must be regenerated (``graphopt generate``,
    ``graphopt rules compile``) whenever the registry version moves."""
    from graphopt.ops import registry_version
    for name in ("default", "handwritten"):
        assert json.loads(SHIPPED[name].read_text())["registry_version"] == registry_version(), name


def test_default_json_is_the_generator_output_for_its_settings(fresh_library):
    """default.json records the generator's default settings (its op set is the registry's
    enumerable ops), and what the generator makes now at depth 3 is in it, rule for rule."""
    shipped = json.loads(SHIPPED["default"].read_text())
    settings = shipped["generator"]
    defaults = GenerateSettings()
    assert settings["ops"] == list(DEFAULT_OPS) == list(defaults.ops)
    assert settings["inputs"] == [i.to_json() for i in default_inputs()]
    assert settings["max_ops"] == 4 and settings["seed"] == defaults.seed == 0
    assert settings["max_rule_ops"] == defaults.max_rule_ops
    by_id = {r["id"]: r for r in shipped["rules"]}
    fresh = [r.to_json() for r in fresh_library]
    assert len(fresh) > 100
    missing = [r["id"] for r in fresh if r["id"] not in by_id]
    assert not missing, f"{len(missing)} rules the generator makes now are not in default.json"
    for r in fresh:
        assert {k: r[k] for k in ("inputs", "src", "dst", "evidence")} == \
               {k: by_id[r["id"]][k] for k in ("inputs", "src", "dst", "evidence")}
