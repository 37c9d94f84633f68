"""Damaged model files: a broken local checkpoint is one clear error; a damaged model cache is detected and rebuilt."""

import json
import shutil

import pytest
from conftest import save_tiny_checkpoint

from buddy.backbone import BrokenModelError, load_backbone, loading


@pytest.fixture
def ckpt(tmp_path):
    return save_tiny_checkpoint(tmp_path / "m")


def _damage(ckpt, how):
    if how == "config is not JSON":
        (ckpt / "config.json").write_text("{not json")
    elif how == "config lacks model_type":
        (ckpt / "config.json").write_text(json.dumps({"hidden_size": 8}))
    elif how == "weights missing":
        (ckpt / "model.safetensors").unlink()
    elif how == "weights truncated":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "weights header garbage":
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        data[8:40] = b"\xff" * 32
        (ckpt / "model.safetensors").write_bytes(bytes(data))
    elif how == "tokenizer truncated":
        t = (ckpt / "tokenizer.json").read_text()
        (ckpt / "tokenizer.json").write_text(t[: len(t) // 3])
    return how


CASES = ["config is not JSON", "config lacks model_type", "weights missing", "weights truncated",
         "weights header garbage", "tokenizer truncated"]


@pytest.mark.parametrize("how", CASES)
def test_a_broken_checkpoint_is_one_clear_error(ckpt, how):
    _damage(ckpt, how)
    with pytest.raises(BrokenModelError) as e:
        load_backbone(str(ckpt), "cpu", "float32")
    msg = str(e.value)
    assert str(ckpt) in msg and "\n" not in msg


@pytest.mark.parametrize("how", CASES[:3] + CASES[-1:])
def test_cli_reports_a_broken_checkpoint_in_one_line(ckpt, how, capsys):
    from buddy.cli import main

    _damage(ckpt, how)
    assert main(["generate", "--model", str(ckpt), "--dtype", "float32", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("buddy: error:") and len(err.splitlines()) == 1 and "Traceback" not in err


def _fake_cache(tmp_path, monkeypatch):
    """A registered model whose 'dequantization' copies a tiny checkpoint; counts the builds."""
    src = save_tiny_checkpoint(tmp_path / "src")
    builds = []

    def write_cache(name, packaged, target):
        builds.append(name)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src, target)
        meta = {"name": name, "source": [], "sha256": "0" * 64, "files": loading._file_digests(target)}
        (target / "buddy-source.json").write_text(json.dumps(meta))

    monkeypatch.setenv("BUDDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(loading.MODELS, "fake", loading.MODELS["smollm2"])
    monkeypatch.setattr(loading, "_write_cache", write_cache)
    return builds


@pytest.mark.parametrize("damage", ["bit flip", "truncate", "delete"])
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, damage, capsys):
    builds = _fake_cache(tmp_path, monkeypatch)
    _, target = loading.checkpoint_dir("fake")
    assert builds == ["fake"] and loading.verify_cache(target) is None
    _, target = loading.checkpoint_dir("fake")
    assert builds == ["fake"]  # an intact cache is not rebuilt
    w = target / "model.safetensors"
    if damage == "bit flip":
        data = bytearray(w.read_bytes())
        data[-100] ^= 0x01  # one bit of one weight: same size, still loadable, silently wrong without the check
        w.write_bytes(bytes(data))
        assert "sha256" in loading.verify_cache(target)
    elif damage == "truncate":
        w.write_bytes(w.read_bytes()[:1000])
        assert "bytes" in loading.verify_cache(target)
    else:
        w.unlink()
        assert "missing" in loading.verify_cache(target)
    loading.checkpoint_dir("fake")
    assert builds == ["fake", "fake"] and loading.verify_cache(target) is None
    assert "damaged" in capsys.readouterr().err


def test_an_old_cache_without_file_records_gets_them(tmp_path, monkeypatch):
    builds = _fake_cache(tmp_path, monkeypatch)
    _, target = loading.checkpoint_dir("fake")
    meta = json.loads((target / "buddy-source.json").read_text())
    del meta["files"]
    (target / "buddy-source.json").write_text(json.dumps(meta))
    assert loading.verify_cache(target) is None
    assert "model.safetensors" in json.loads((target / "buddy-source.json").read_text())["files"]
    assert builds == ["fake"]


def test_bfloat16_on_a_cpu_without_native_bfloat16_warns_and_auto_picks_float32(monkeypatch):
    import warnings

    import torch

    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated on this CPU"):
        assert loading.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loading.resolve_dtype("auto", cpu) == torch.float32
        assert loading.resolve_dtype("float32", cpu) == torch.float32
        monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)
        assert loading.resolve_dtype("bfloat16", cpu) == torch.bfloat16
        assert loading.resolve_dtype("auto", cpu) == torch.bfloat16
