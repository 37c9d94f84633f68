"""Top-k teachers for router training (buddy/train/teacher.py): the coarsened KL, and the per-window disk cache
that lets a second run skip the dense forward."""

import pytest
import torch
from conftest import tiny_backbone

from buddy.config import ConfigError
from buddy.train.router import RouterTrainer, TrainConfig
from buddy.train.teacher import Teacher, TeacherCache


def logps(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(*shape, generator=g), dim=-1)


def test_top_k_kl_is_the_coarsened_kl():
    p, q = logps(2, 5, 40, seed=0), logps(2, 5, 40, seed=1)
    exact = Teacher(logp=p).kl(q)
    assert torch.allclose(exact, (p.exp() * (p - q)).sum(-1))
    assert torch.allclose(Teacher.top_k(p, 40).kl(q), exact, atol=1e-5)  # K = V: the exact KL
    small = Teacher.top_k(p, 4).kl(q)
    assert (small >= -1e-6).all() and (small <= exact + 1e-5).all()  # coarsening never adds divergence
    # by hand, one token: top-4 terms plus the rest bucket
    v, i = p[0, 0].topk(4)
    rest = torch.ones(40, dtype=torch.bool)
    rest[i] = False
    r, qr = p[0, 0, rest].exp().sum(), q[0, 0, rest].exp().sum()
    want = (v.exp() * (v - q[0, 0, i])).sum() + r * (r.log() - qr.log())
    assert torch.allclose(small[0, 0], want, atol=1e-5)
    assert float(Teacher.top_k(p, 8).kl(p).abs().max()) < 1e-5  # the teacher against itself


def test_sharp_teachers_through_the_cache_stay_below_the_exact_kl(tmp_path):
    """A confident teacher leaves a tiny rest mass: it must survive the cache's round trip (no 1 - sum)."""
    p = logps(3, 6, 4000, seed=2, scale=12.0)
    q = torch.log_softmax(p + 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)), dim=-1)
    exact = Teacher(logp=p).kl(q)
    cache = TeacherCache(tmp_path, "c", "float32", 64)
    ids = torch.arange(18).view(3, 6)
    cache.teacher(ids, lambda x: p)
    read = cache.teacher(ids, lambda x: pytest.fail("recomputed"))
    kk = read.kl(q)
    assert (kk <= exact * (1 + 1e-5) + 1e-7).all() and (kk >= 0).all()
    assert (kk > 0.5 * exact).all()  # and the rest bucket still carries its part
    assert torch.allclose(kk, Teacher.top_k(p, 64).kl(q))


def test_teacher_needs_one_form():
    with pytest.raises(ValueError):
        Teacher()
    with pytest.raises(ValueError):
        TeacherCache(None, "abc", "float32", 0)


def test_cache_computes_once_then_reads(tmp_path):
    calls = []

    def dense(x):
        calls.append(x.shape[0])
        return logps(*x.shape, 30, seed=int(x.sum()))

    cache = TeacherCache(tmp_path, "checksum", "float32", 5)
    ids = torch.randint(0, 30, (3, 7), generator=torch.Generator().manual_seed(0))
    first = cache.teacher(ids, dense)
    assert calls == [3] and (cache.hits, cache.misses) == (0, 3)
    again = cache.teacher(ids, dense)
    assert calls == [3] and cache.hits == 3  # read, not recomputed
    assert torch.equal(first.top_idx, again.top_idx) and torch.equal(first.top_logp, again.top_logp)
    # a batch mixing a cached window and a new one runs the dense model on the new row only
    new = torch.randint(0, 30, (1, 7), generator=torch.Generator().manual_seed(1))
    cache.teacher(torch.cat([ids[:1], new]), dense)
    assert calls == [3, 1]
    # a damaged file is recomputed, not trusted
    files = sorted(cache.dir.glob("*.safetensors"))
    assert len(files) == 4 and not list(cache.dir.glob("*.tmp"))
    for f in files:
        f.write_bytes(b"not a safetensors file")
    cache.teacher(ids, dense)
    assert calls == [3, 1, 3]
    # another model or dtype never reads these files
    assert TeacherCache(tmp_path, "other", "float32", 5).dir != cache.dir
    assert TeacherCache(tmp_path, "checksum", "bfloat16", 5).dir != cache.dir


def make(bb, out, cache, topk=8):
    cfg = TrainConfig(steps=2, batch=2, seq_len=12, val_every=2, val_windows=2, width=16, lr=1e-2, budgets="0.5:1.0",
                      teacher_topk=topk, teacher_cache=str(cache))
    g = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, 97, (8, 12), generator=g), torch.randint(0, 97, (2, 12), generator=g)
    return RouterTrainer(bb, cfg, list(range(1, 7)), train, val, out, command="test", data="random")


def test_a_second_run_reads_the_teacher_from_the_cache(tmp_path, monkeypatch):
    bb = tiny_backbone("llama", n_layers=8)
    first = make(bb, tmp_path / "a", tmp_path / "cache")
    first.run(progress=False)
    assert (first.teacher_cache.hits, first.teacher_cache.misses) == (0, 4)
    second = make(bb, tmp_path / "b", tmp_path / "cache")
    monkeypatch.setattr(bb, "dense_logits", lambda ids: pytest.fail("the dense model ran despite the cache"))
    second.run(progress=False)
    assert (second.teacher_cache.hits, second.teacher_cache.misses) == (4, 0)
    for a, b in zip(first.history, second.history):  # same windows, same teacher: the same run
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # the cache location is not a setting of the run, the top-k is
    settings = second.settings()
    assert "teacher_cache" not in settings and settings["teacher_topk"] == 8


def test_bad_teacher_topk():
    with pytest.raises(ConfigError, match="teacher_topk"):
        TrainConfig(teacher_topk=-1)
