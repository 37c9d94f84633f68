"""Distributed router training: `torchrun --nproc_per_node 2 -m buddy train router` (DDP over gloo on CPU)
follows the same loss trajectory as one process with the same global batch and seed."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_checkpoint

from buddy.backbone import load_backbone
from buddy.calibration import calibration_path, save_calibration


@pytest.mark.parametrize("estimator", ["swap", "st"])
def test_two_processes_match_one(tmp_path, estimator, monkeypatch):
    monkeypatch.setenv("BUDDY_CACHE", str(tmp_path / "cache"))  # the calibration written below stays in the test
    text = tmp_path / "words.txt"  # the tiny checkpoint's word-level vocabulary; offline, no corpus to fetch
    g = torch.Generator().manual_seed(0)
    text.write_text("\n\n".join(" ".join(f"w{i}" for i in torch.randint(0, 95, (60,), generator=g).tolist())
                                  for _ in range(20)))
    ckpt = save_tiny_checkpoint(tmp_path / "tiny")
    bb = load_backbone(str(ckpt), "cpu", "float32")
    save_calibration({"model": bb.name, "checksum": bb.checksum, "n_layers": bb.n_layers,
                      "orders": {"static-greedy": [3, 1, 4, 2], "static-bi": [1, 2, 3, 4]}},
                     calibration_path(bb))
    common = ["train", "router", "--model", str(ckpt), "--dtype", "float32", "--device", "cpu", "--steps", "4",
              "--batch", "4", "--seq-len", "24", "--val-every", "100", "--val-windows", "2", "--val-layers", "4",
              "--estimator", estimator, "--budgets", "0.5:0.9", "--data", str(text)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "buddy", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "buddy", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    h1 = torch.load(tmp_path / "one" / "state.pt", weights_only=True)["history"]
    h2 = torch.load(tmp_path / "two" / "state.pt", weights_only=True)["history"]
    assert len(h1) == len(h2) == 4
    for a, b in zip(h1, h2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-6)
    assert (tmp_path / "two" / "router.json").is_file()
    assert "torchrun --nproc_per_node 2" in (tmp_path / "two" / "router.json").read_text()
