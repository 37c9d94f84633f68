"""The maintained benchmark scripts start and document their flags; research probes stay importable."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAINTAINED = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", MAINTAINED)
def test_maintained_benchmark_prints_help(script):
    r = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_research_probes_parse_and_are_documented():
    probes = sorted((ROOT / "research").glob("*.py"))
    readme = (ROOT / "research" / "README.md").read_text()
    assert probes
    for p in probes:
        ast.parse(p.read_text(), filename=str(p))
        assert p.name in readme, f"{p.name} is not listed in research/README.md"
    assert not set(MAINTAINED) & {p.name for p in probes}
