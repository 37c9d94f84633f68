"""Weight-only quantized linear layers (buddy/quant.py): the GGUF repack is exact for the codes, the kernels
match a dequantized reference, and a quantized backbone runs every planner and KV policy."""

import numpy as np
import pytest
import torch
from conftest import tiny_backbone

from buddy.backbone import load_backbone
from buddy.budget import Budget
from buddy.config import ConfigError, LoadConfig
from buddy.engine import Engine
from buddy.planner import FullPlanner, StaticPlanner
from buddy.quant import (
    GROUP,
    FusedPart,
    Int4Linear,
    Int8Linear,
    Q8AsInt4Linear,
    QuantError,
    _llama_rows,
    apply_quant,
    gguf_4bit_groups,
    gguf_q8_0,
    gguf_tensors,
    weight_bytes,
)

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _bf16(t):
    return t.to(torch.bfloat16).float()


def test_int4_linear_equals_its_dequantized_weights():
    g = torch.Generator().manual_seed(0)
    n, k = 48, 96
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(n, k // GROUP, generator=g) * 0.1, torch.randn(n, k // GROUP, generator=g) * 0.1
    bias = torch.randn(n, generator=g)
    lin = Int4Linear(codes, scale, zero, bias)
    # the kernel's arithmetic: bfloat16 activations, scales and zeros
    w = (codes.float().view(n, -1, GROUP) - 8) * _bf16(scale)[..., None] + _bf16(zero)[..., None]
    x = torch.randn(2, 3, k, generator=g)
    ref = _bf16(x) @ w.view(n, k).t() + bias
    out = lin(x)
    assert out.shape == (2, 3, n) and out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert not torch.allclose(lin(x + 1), out)  # it depends on its input


def test_q8_0_as_two_int4_halves_equals_the_q8_0_weights():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q.Q8_0)
    q, d = gguf_q8_0(raw, 48, 96)
    ref_w = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q8_0))
    np.testing.assert_allclose((q.reshape(48, -1, GROUP) * d[..., None]).reshape(48, 96), ref_w.numpy(), rtol=0,
                               atol=1e-7)  # the unpacking is exact
    lin = Q8AsInt4Linear(q, d)
    x = torch.randn(3, 96)
    d_bf16 = _bf16(torch.from_numpy(d))  # the kernel's arithmetic: bf16 scales and activations
    w_bf16 = (torch.from_numpy(q.astype(np.float32)).view(48, -1, GROUP) * d_bf16[..., None]).view(48, 96)
    ref = _bf16(x) @ w_bf16.t()
    assert torch.allclose(lin(x), ref, rtol=0, atol=1e-2 * ref.abs().max().item())  # bf16 outputs per half
    assert lin.weight_bytes == 2 * (48 * 96 // 2 + 48 * 3 * 2 * 2)  # two 4-bit halves, bf16 scales and zeros


def test_int4_linear_refuses_shapes_the_kernel_cannot_take():
    with pytest.raises(QuantError, match="multiple of 32"):
        Int4Linear(torch.zeros(16, 40, dtype=torch.uint8), torch.zeros(16, 1), torch.zeros(16, 1), None)
    with pytest.raises(QuantError, match="N of 16"):
        Int4Linear(torch.zeros(8, 64, dtype=torch.uint8), torch.zeros(8, 2), torch.zeros(8, 2), None)


def test_int8_linear_rounds_each_row_to_its_own_scale():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=g) * torch.logspace(-2, 1, 40)[:, None]  # rows of very different size
    lin = Int8Linear(w, None)
    x = torch.randn(5, 64, generator=g)
    ref = x @ w.t()
    err = (lin(x) - ref).abs() / (x.abs() @ w.abs().t())
    assert err.max() < 0.02  # 8-bit rows (and bf16 arithmetic), each at its own scale


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_unpack_to_what_gguf_dequantizes(qtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q[qtype])
    codes, scale, zero = gguf_4bit_groups(raw, qtype, 24, 128)
    ours = (codes.reshape(24, -1, GROUP).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    theirs = gguf.quants.dequantize(raw, Q[qtype])
    np.testing.assert_allclose(ours.reshape(24, 128), theirs, rtol=0, atol=1e-6)
    assert codes.min() >= 0 and codes.max() <= 15


def test_gguf_q4_k_blocks_unpack_to_what_gguf_dequantizes():
    rng = np.random.default_rng(1)
    n, k = 6, 512  # two super-blocks per row
    raw = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # d (any finite value)
    raw[..., 2:4] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)  # dmin
    raw = raw.reshape(n, -1)
    codes, scale, zero = gguf_4bit_groups(raw, "Q4_K", n, k)
    ours = (codes.reshape(n, -1, GROUP).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    np.testing.assert_allclose(ours.reshape(n, k), gguf.quants.dequantize(raw, Q.Q4_K), rtol=0, atol=1e-6)


def _write_gguf(path, bb, qtype="Q4_1", permute=True, perturb=False, head=False):
    """A GGUF holding the tiny backbone's linear layers in `qtype`; the backbone's weights are set to what the
    file dequantizes to (as transformers' GGUF loader would have loaded them)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    cfg = bb.config
    with torch.no_grad():
        for i, layer in enumerate(bb.layers):
            for name, short in names.items():
                lin = layer.get_submodule(name)
                w = lin.weight.detach().numpy().astype(np.float32)
                raw = gguf.quants.quantize(w, Q[qtype])
                deq = gguf.quants.dequantize(raw, Q[qtype])
                if permute and name in ("self_attn.q_proj", "self_attn.k_proj"):
                    heads = cfg.num_attention_heads if name == "self_attn.q_proj" else cfg.num_key_value_heads
                    order = _llama_rows(w.shape[0], heads)
                    inverse = np.argsort(order)
                    raw, deq = raw[inverse], deq  # the file keeps llama.cpp's row order
                lin.weight.copy_(torch.from_numpy(deq + (0.5 if perturb and i == 1 else 0)))
                writer.add_tensor(f"blk.{i}.{short}.weight", raw, raw_dtype=Q[qtype])
        if head:  # the LM head in Q8_0, as GGUF files keep it
            raw = gguf.quants.quantize(bb.lm_head.weight.detach().numpy(), Q.Q8_0)
            bb.lm_head.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, Q.Q8_0)))
            writer.add_tensor("output.weight", raw, raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_mode_repacks_a_files_blocks_and_matches_the_dequantized_model(tmp_path, qtype):
    bb = tiny_backbone("llama", n_layers=4)
    path = _write_gguf(tmp_path / "m.gguf", bb, qtype)
    assert set(gguf_tensors(path)) == {f"blk.{i}.{n}.weight" for i in range(4) for n in
                                       ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = bb.dense_logits(ids)
    dense_bytes = weight_bytes(bb)["layer"]
    counts = apply_quant(bb, "gguf", path)
    assert counts == {f"{qtype} as int4": 28, "LM head in the model's dtype": 1}
    assert isinstance(bb.layers[0].self_attn.o_proj, Int4Linear) and isinstance(bb.lm_head, torch.nn.Linear)
    assert isinstance(bb.layers[0].self_attn.q_proj, FusedPart)  # q/k/v and gate/up: one kernel call each
    assert weight_bytes(bb)["layer"] < dense_bytes / 4  # 4-bit codes + bf16 scales vs float32
    with torch.no_grad():
        out = bb.dense_logits(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.03, rel  # bf16 activations, scales and the 8-bit head


@pytest.mark.parametrize("kv_policy", ["fill", "zero"])
def test_fused_projections_equal_separate_ones(tmp_path, kv_policy, tiny_ckpt):
    """q/k/v and gate/up fused into one kernel call give the same tokens and logits as one call each, also
    on the fill policy's K/V-only path (k and v called without q)."""
    fused, separate = tiny_backbone("llama", n_layers=4), tiny_backbone("llama", n_layers=4)
    path = _write_gguf(tmp_path / "m.gguf", fused, "Q4_1")
    _write_gguf(tmp_path / "n.gguf", separate, "Q4_1")
    apply_quant(fused, "gguf", path)
    apply_quant(separate, "gguf", path, fuse=False)
    assert isinstance(separate.layers[0].self_attn.k_proj, Int4Linear)
    assert weight_bytes(fused) == weight_bytes(separate)
    fused.tokenizer = separate.tokenizer = load_backbone(str(tiny_ckpt), device="cpu", dtype="float32").tokenizer
    planner = StaticPlanner("static", [2, 1], 4)
    runs = [[(s[0].token, s[0].layers) for s in Engine(bb, planner, kv_policy).generate_batch(
        [[3, 9, 27, 81 % 97, 5]], [Budget(layers=3)], max_new_tokens=8, ignore_eos=True)] for bb in (fused, separate)]
    assert runs[0] == runs[1]
    ids = torch.tensor([[3, 9, 27, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(fused.dense_logits(ids), separate.dense_logits(ids), atol=1e-5)
        x = torch.randn(1, 5, 64)
        rope = fused.rope(x, torch.arange(5)[None])
        for a, b in zip(fused.kv(1, x, rope), separate.kv(1, x, rope)):
            assert torch.allclose(a, b, atol=1e-6)


def test_gguf_mode_takes_a_q8_0_head_as_two_int4_halves(tmp_path):
    bb = tiny_backbone("llama", n_layers=2)
    with torch.no_grad():  # the int4 kernel needs output rows in multiples of 16: a 112-token vocabulary
        bb.replace_head(torch.nn.Linear(64, 112, bias=False))
    path = _write_gguf(tmp_path / "m.gguf", bb, "Q4_0", head=True)
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = bb.dense_logits(ids)
    assert ref.shape[-1] == 112
    counts = apply_quant(bb, "gguf", path, head="int4")
    assert counts["LM head Q8_0 as two int4"] == 1 and isinstance(bb.lm_head, Q8AsInt4Linear)
    with torch.no_grad():
        assert (bb.dense_logits(ids) - ref).norm() / ref.norm() < 0.03


def test_gguf_mode_refuses_a_file_that_does_not_match_the_weights(tmp_path):
    bb = tiny_backbone("llama", n_layers=3)
    path = _write_gguf(tmp_path / "m.gguf", bb, "Q4_1", perturb=True)
    with pytest.raises(QuantError, match="layer 1 .* differ"):
        apply_quant(bb, "gguf", path)


def test_gguf_mode_refuses_a_file_with_the_wrong_row_order(tmp_path):
    bb = tiny_backbone("llama", n_layers=2)
    path = _write_gguf(tmp_path / "m.gguf", bb, "Q4_1", permute=False)
    with pytest.raises(QuantError, match="q_proj"):
        apply_quant(bb, "gguf", path)


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(QuantError, match="not a GGUF"):
        gguf_tensors(p)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_policy", ["fill", "mask", "zero"])
def test_int8_backbone_runs_routed_decode_close_to_the_float_model(arch, kv_policy, tiny_ckpt):
    ref, bb = tiny_backbone(arch, n_layers=6), tiny_backbone(arch, n_layers=6)
    ref.tokenizer = bb.tokenizer = load_backbone(str(tiny_ckpt), device="cpu", dtype="float32").tokenizer
    apply_quant(bb, "int8")
    assert all(isinstance(layer.mlp.down_proj, Int8Linear) for layer in bb.layers)
    prompt = [[5, 17, 33, 2, 60, 8]]
    for planner, k in ((FullPlanner(6), 6), (StaticPlanner("static", [2, 3, 1, 4], 6), 4)):
        outs = []
        for model in (ref, bb):
            steps = list(Engine(model, planner, kv_policy).generate_batch(
                prompt, [Budget(layers=k)], max_new_tokens=6, ignore_eos=True))
            outs.append([s[0].token for s in steps])
            assert all(len(s[0].layers) == k for s in steps)
    ids = torch.tensor(prompt)
    with torch.no_grad():
        a, b = ref.dense_logits(ids), bb.dense_logits(ids)
    assert (a - b).norm() / a.norm() < 0.03


def test_load_backbone_applies_the_mode(tiny_ckpt):
    bb = load_backbone(str(tiny_ckpt), device="cpu", dtype="float32", quant="int8")
    assert bb.quant == {"int8": 6 * 7} and isinstance(bb.layers[0].self_attn.o_proj, Int8Linear)
    with pytest.raises(QuantError, match="--quant int8"):
        load_backbone(str(tiny_ckpt), device="cpu", dtype="float32", quant="gguf")


def test_quant_mode_is_validated_and_cpu_only():
    with pytest.raises(ConfigError, match="quant"):
        LoadConfig(quant="int3")
    with pytest.raises(ConfigError, match="quant"):
        apply_quant(tiny_backbone(), "fp4")
    with pytest.raises(QuantError, match="GGUF"):
        apply_quant(tiny_backbone(), "gguf")  # a checkpoint directory has no GGUF blocks: --quant int8


def test_bench_latency_counts_quantized_weight_bytes(tiny_ckpt):
    from buddy.config import LatencyConfig
    from buddy.eval.latency import run_latency

    cfg = LatencyConfig(batch=(1,), prompt_len=(4,), new_tokens=3, budgets=(1.0,), planners=(), repeats=1)
    plain = run_latency(str(tiny_ckpt), "float32", "cpu", cfg, progress=lambda m: None)
    q = run_latency(str(tiny_ckpt), "float32", "cpu", cfg, progress=lambda m: None, quant="int8")
    assert q["quant"] == "int8" and plain["quant"] == "none"
    assert q["dense_weight_bytes"] < 0.8 * plain["dense_weight_bytes"]  # 8-bit layers (the head stays float32)


def test_llamacpp_timing_on_a_stand_in(monkeypatch, tmp_path):
    """The timing loop against a stand-in llama_cpp module (the real one is an optional, slow-to-build extra)."""
    import importlib.machinery
    import sys
    import types

    seen = {}

    class Llama:
        def __init__(self, model_path, n_ctx, n_threads, **kw):
            seen.update(path=model_path, n_ctx=n_ctx, threads=n_threads)

        def reset(self):
            pass

        def generate(self, tokens, top_k, temp, reset):
            seen["prompt"], seen["top_k"] = list(tokens), top_k
            while True:
                yield 7

        def close(self):
            pass

    fake = types.ModuleType("llama_cpp")
    fake.Llama, fake.__spec__ = Llama, importlib.machinery.ModuleSpec("llama_cpp", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    from buddy.eval.llamacpp import time_llamacpp

    ttft, ms = time_llamacpp(tmp_path / "m.gguf", [1, 2, 3], new_tokens=5, repeats=2, threads=2)
    assert ttft >= 0 and ms >= 0
    assert seen == {"path": str(tmp_path / "m.gguf"), "n_ctx": 3 + 5 + 8, "threads": 2, "prompt": [1, 2, 3],
                    "top_k": 1}


def test_compare_is_validated(tiny_ckpt):
    from buddy.config import LatencyConfig

    with pytest.raises(ConfigError, match="llama.cpp"):
        LatencyConfig(compare="ollama")
