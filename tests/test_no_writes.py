"""No command writes into the checkout or the installed package: after running each command from the
repository root, `git status` is what it was (outputs go where the user says, or to the user cache)."""

import subprocess
from pathlib import Path

import pytest

from buddy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_commands_leave_the_checkout_as_it_was(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BUDDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    m = ["--model", str(tiny_ckpt), "--dtype", "float32"]
    from buddy.backbone import load_backbone
    from buddy.calibration import save_calibration

    bb = load_backbone(str(tiny_ckpt), "cpu", "float32")
    cal = tmp_path / "cal.json"
    save_calibration({"model": bb.name, "checksum": bb.checksum, "n_layers": 6,
                      "orders": {"static-greedy": [3, 1, 4, 2], "static-bi": [1, 2, 3, 4]}}, cal)
    before = git_status()
    commands = [
        ["generate", *m, "--planner", "random", "--budget", "0.5", "--max-new-tokens", "3",
         "--trace", str(tmp_path / "trace.jsonl"), "w1 w2"],
        ["eval", "ppl", *m, "--planner", "random", "--layers", "4", "--text-file", str(text), "--window", "32",
         "--max-windows", "2", "--json"],
        ["export", *m, "--planner", "static-greedy", "--calibration", str(cal), "--layers", "4",
         "--out", str(tmp_path / "export")],
        ["plot", "trace", str(tmp_path / "trace.jsonl"), "--out", str(tmp_path / "trace.png")],
        ["eval", "code", *m, "--planner", "random", "--layers", "4", "--limit", "1", "--max-new-tokens", "2",
         "--samples-out", str(tmp_path / "samples.jsonl"), "--json"],
    ]
    for argv in commands:
        assert main(argv) == 0, (argv, capsys.readouterr().err[-500:])
        assert git_status() == before, f"`buddy {' '.join(argv[:2])}` changed the checkout"
