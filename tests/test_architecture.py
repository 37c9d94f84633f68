"""Import direction: core modules never import training, evaluation, serving or the CLI (not even inside a
function), and the package has no import cycles."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "buddy"
CORE = ("config", "errors", "budget", "backbone", "kv_cache", "router", "planner", "engine", "sampling", "quant",
        "allocation")
OUTER = ("train", "eval", "serve", "cli", "harness", "api")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every buddy module `path` imports, at any depth of the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("buddy")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("buddy"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` names modules too
    return {m for m in out if _exists(m)}


def _exists(name: str) -> bool:
    p = PKG.parent / Path(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


GRAPH = {module_name(p): imports(p) for p in PKG.rglob("*.py")}


@pytest.mark.parametrize("core", CORE)
def test_core_modules_import_no_outer_layer(core):
    mods = [m for m in GRAPH if m == f"buddy.{core}" or m.startswith(f"buddy.{core}.")]
    assert mods
    for m in mods:
        bad = sorted(t for t in GRAPH[m] if any(t == f"buddy.{o}" or t.startswith(f"buddy.{o}.") for o in OUTER))
        assert not bad, f"{m} imports {bad}"


def test_no_import_cycles():
    def visit(node, stack, seen):
        for nxt in GRAPH.get(node, ()):
            if nxt == node:
                continue
            if nxt in stack:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, stack + [nxt], seen)

    for start in GRAPH:
        visit(start, [start], {start})


@pytest.mark.parametrize("middle", ("predictor", "data", "artifacts"))
def test_modules_around_the_core_import_no_outer_layer(middle):
    outer = (*OUTER, "calibration", "corpus", "prompt_mix", "export")
    bad = sorted(t for t in GRAPH[f"buddy.{middle}"] if any(t == f"buddy.{o}" or t.startswith(f"buddy.{o}.")
                                                           for o in outer))
    assert not bad, f"buddy.{middle} imports {bad}"


def test_the_default_kv_policy_is_named_once():
    import re
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "buddy"
    offenders = [f"{p.relative_to(pkg)}:{n}" for p in pkg.rglob("*.py") if p.name != "config.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"""policy\s*:\s*str\s*=\s*["']fill["']""", line)]
    assert not offenders, f"state the default as config.DEFAULT_KV_POLICY: {offenders}"


def test_only_the_backbone_reaches_into_the_transformers_model():
    import re

    offenders = [f"{p.relative_to(PKG)}:{n}" for p in PKG.rglob("*.py") if "backbone" not in p.parts
                 for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bbb\.model\b", line)]
    assert not offenders, f"use Backbone's accessors (config, eos_ids, dense_logits, ...): {offenders}"


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("buddy")):
                offenders += [f"{p.relative_to(PKG)}:{node.lineno} {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, f"make shared helpers public: {offenders}"
