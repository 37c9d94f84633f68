"""Bad command-line input gives exit code 2 and one line naming the bad value, before any work (tiny model)."""

import json
import shutil

import pytest

from buddy.cli import main


@pytest.fixture
def router_dir(tmp_path, tiny_ckpt):
    """A valid router directory for the tiny model, to corrupt in the tests."""
    import torch

    from buddy.backbone import load_backbone
    from buddy.router import DecisionModule, RouterConfig, RouterMeta, save_router

    checksum = load_backbone(str(tiny_ckpt), "cpu", "float32").checksum
    cfg = RouterConfig(n_layers=6, kv_dim=64, hidden_dim=64, width=8)
    meta = RouterMeta(model="tiny", checksum=checksum, n_layers=6, kv_policy="fill", budgets=(0.5, 0.9), prior="static-greedy",
                      prior_order=[1, 2, 3, 4], config=vars(cfg))
    torch.manual_seed(0)
    save_router(DecisionModule(cfg), meta, tmp_path / "router")
    return tmp_path / "router"


def _cases(ckpt, tmp):
    gen = ["generate", "--model", str(ckpt), "--planner", "random", "--dtype", "float32"]
    (tmp / "file.txt").write_text("x")
    (tmp / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "choices": ["a"], "gold": 0}\n')
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    return [
        (gen + [""], "prompt is empty"),
        (gen + ["--trace", str(tmp / "missing" / "t.jsonl"), "w1"], "does not exist"),
        (gen + ["--trace", str(tmp), "w1"], "is a directory"),
        (["eval", "zeroshot", "--model", str(ckpt), "--mc-file", str(tmp / "latin1.jsonl")], "not UTF-8"),
        (["eval", "zeroshot", "--model", str(ckpt), "--mc-file", str(tmp / "nope.jsonl")], "not found"),
        (["sweep", "--model", str(ckpt), "--tasks", "piqa", "--out", str(tmp)], "is a directory"),
        (["plot", "pareto", str(tmp / "file.txt"), "--out", str(tmp / "p.xyz")], ".png"),
        (["export", "--model", str(ckpt), "--layers", "4", "--out", str(tmp / "file.txt")], "is a file"),
        (["export", "--model", str(ckpt), "--layers", "4", "--out", str(tmp / "full")], "not empty"),
        (["train", "router", "--model", str(ckpt), "--out", str(tmp / "file.txt")], "is a file"),
        (["train", "router", "--model", str(ckpt), "--val-layers", "abc"], "val_layers 'abc'"),
        (["calibrate", "--model", str(ckpt), "--data", "wiki"], "invalid data 'wiki'"),
        (["calibrate", "--model", str(ckpt), "--windows", "0"], "invalid windows 0"),
        (["export", "--model", str(ckpt), "--layers", "4", "--format", "onnx", "--out", str(tmp / "x")], "invalid format"),
        (gen + ["--budget", "2", "w1"], "layers=2"),
    ]


def test_bad_cli_values_one_line_exit_2(tiny_ckpt, tmp_path, capsys):
    for argv, fragment in _cases(tiny_ckpt, tmp_path):
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and fragment in err[0], (argv, err)


def test_corrupt_router_files_are_named(tiny_ckpt, router_dir, capsys):
    cases = {"unknown config key": lambda m: m["config"].update(colour="blue"),
             "short prior_order": lambda m: m.update(prior_order=[1, 2]),
             "out-of-range prior_order": lambda m: m.update(prior_order=[1, 2, 3, 9])}
    assert main(["generate", "--model", str(tiny_ckpt), "--router", str(router_dir), "--planner", "router",
                 "--budget", "0.5", "--max-new-tokens", "1", "w1"]) == 0  # the uncorrupted router works
    capsys.readouterr()
    for name, corrupt in cases.items():
        d = router_dir.parent / name.replace(" ", "-")
        shutil.copytree(router_dir, d)
        meta = json.loads((d / "router.json").read_text())
        corrupt(meta)
        (d / "router.json").write_text(json.dumps(meta))
        rc = main(["generate", "--model", str(tiny_ckpt), "--router", str(d), "--planner", "router", "--budget", "0.5",
                   "w1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "router.json is corrupt (" in err[0], (name, err)


def test_resume_from_a_truncated_state_is_one_line(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from buddy.backbone import load_backbone
    from buddy.calibration import calibration_path, save_calibration

    monkeypatch.setenv("BUDDY_CACHE", str(tmp_path / "cache"))
    import os

    from buddy.config import cache_dir

    real = os.path.expanduser("~/.cache/buddy/data")
    if os.path.isdir(real):  # the SOTU corpus already fetched
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "data").symlink_to(real)
    bb = load_backbone(str(tiny_ckpt), "cpu", "float32")
    save_calibration({"model": bb.name, "checksum": bb.checksum, "n_layers": 6,
                      "orders": {"static-greedy": [3, 1, 4, 2], "static-bi": [1, 2, 3, 4]}}, calibration_path(bb))
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_bytes(b"PK\x03\x04truncated")
    rc = main(["train", "router", "--model", str(tiny_ckpt), "--dtype", "float32", "--data", "sotu", "--seq-len", "16",
               "--out", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "state.pt is unreadable" in err[-1] and "Traceback" not in "\n".join(err), err
    assert cache_dir() == tmp_path / "cache"


def test_a_missing_extra_names_the_pip_command(monkeypatch, capsys):
    import importlib.util

    from buddy.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("fastapi", "matplotlib")
                        else real(name, *a))
    assert main(["serve", "--model", "smollm2"]) == 2
    assert "pip install 'buddy[serve]'" in capsys.readouterr().err
    assert main(["plot", "pareto", "x.jsonl", "--out", "x.png"]) == 2
    assert "pip install 'buddy[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--reroute-every", "--predictor"])
def test_train_predictor_refuses_flags_it_would_ignore(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "predictor", flag, "2"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
