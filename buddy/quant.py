"""Weight-only quantized linear layers for CPU decode, on PyTorch's own CPU kernels.

Batch-1 decode reads every executed layer's weights once per token, so its speed is set by weight bytes.
Two modes replace the `nn.Linear` modules inside transformers' own decoder layers, so
every planner, KV policy and entry point (generate, serve, eval, bench) runs on them unchanged:

- `gguf`: the checkpoint's own quantized blocks. Q4_0, Q4_1 and Q4_K are group-32 4-bit codes with a scale
  and a minimum per group, which is exactly the layout of `aten._weight_int4pack_mm_for_cpu`
  (w = (q - 8) * scale + zero): the codes repack losslessly, with zero = minimum + 8 * scale. Tensors in
  other formats (Q5_K, Q6_K, Q8_0, F16, F32) become 8-bit per output row, requantized from the dequantized
  weights (`aten._weight_int8pack_mm`): the nearest form these kernels offer.
- `int8`: any Hugging Face checkpoint, every linear layer in 8 bits per output row (symmetric,
  scale = max |w| / 127).

The LM head keeps the model's dtype in both modes: the kernels return bfloat16, and bfloat16 logits flip
greedy choices between near-tied tokens (measured in benchmarks/quant_quality.py).

The kernels take bfloat16 activations, scales and zeros: each quantized linear casts its input to bfloat16
and its output back to the model's dtype. Rounding the scales to bfloat16 costs about 0.3% relative error
per product, so "lossless" holds for the codes, not for the arithmetic; docs/performance.md reports the
measured perplexity and greedy-token agreement against the dequantized model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import QUANT_MODES, ConfigError
from .errors import BuddyError

GROUP = 32  # the group size of GGUF's 4-bit formats, and the one the int4 kernel is given
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_GGUF_NAMES = dict(zip(_LINEARS, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")))


class QuantError(BuddyError):
    """A quantized mode cannot be applied: wrong device, an unknown tensor layout, or a repack mismatch."""


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as group-32 4-bit codes q in [0, 15]: W = (q - 8) * scale + zero."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        n, k = codes.shape
        if k % GROUP or n % 16 or scale.shape != (n, k // GROUP) or zero.shape != scale.shape:
            raise QuantError(f"int4 repack needs [N, K] codes with K a multiple of {GROUP}, N of 16, and [N, K/{GROUP}] "
                             f"scales and zeros (got {tuple(codes.shape)}, {tuple(scale.shape)}, {tuple(zero.shape)})")
        self.in_features, self.out_features = k, n
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K/G, N, 2]
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, GROUP, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 with one scale per output row: W = q * scale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight_bytes(self) -> int:
        return self.weight_int8.numel() + self.scales.numel() * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight_int8, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Q8AsInt4Linear(nn.Module):
    """An 8-bit group-32 weight (GGUF Q8_0: w = q * d, q in [-128, 127]) as two exact 4-bit halves,
    q = 16 * hi + lo with hi in [-8, 7] and lo in [0, 15]: y = x hi^T * 16d + x lo^T * d, two int4 kernel
    calls with the block scales kept (an 8-bit row-wise requantization of the LM head moved greedy tokens)."""

    def __init__(self, q: np.ndarray, d: np.ndarray, bias: torch.Tensor | None = None):
        super().__init__()
        q = q.astype(np.int16)
        hi, lo = q >> 4, q & 15  # arithmetic shift: hi in [-8, 7]
        zeros = np.zeros_like(d)
        self.hi = Int4Linear(torch.from_numpy((hi + 8).astype(np.uint8)), torch.from_numpy(16 * d),
                             torch.from_numpy(zeros), None)
        self.lo = Int4Linear(torch.from_numpy(lo.astype(np.uint8)), torch.from_numpy(d), torch.from_numpy(8 * d), bias)
        self.in_features, self.out_features = self.hi.in_features, self.hi.out_features

    @property
    def weight_bytes(self) -> int:
        return self.hi.weight_bytes + self.lo.weight_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hi(x) + self.lo(x)


def gguf_q8_0(raw: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's raw bytes [n, bytes per row] -> int8 codes [n, k] and scales [n, k/32] (w = q * d)."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GROUP, 34)
    return b[..., 2:].view(np.int8).reshape(n, k), _f16(b[..., 0:2]).squeeze(-1)


# --- GGUF 4-bit blocks -> (codes, scale, zero) per group of 32 ---------------------------------------------

def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: the low nibbles are elements 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def gguf_4bit_groups(raw: np.ndarray, qtype: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpack a GGUF tensor's raw bytes ([n, bytes per row]) in Q4_0, Q4_1 or Q4_K into codes [n, k] (uint8,
    0..15), scale and zero [n, k/32] (float32) with w = (q - 8) * scale + zero, exactly as GGUF dequantizes."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1)
    if qtype in ("Q4_0", "Q4_1"):
        size = 18 if qtype == "Q4_0" else 20
        b = raw.reshape(n, k // GROUP, size)
        d = _f16(b[..., 0:2]).squeeze(-1)
        if qtype == "Q4_0":  # w = d * (q - 8)
            codes, zero = _nibbles(b[..., 2:]), np.zeros_like(d)
        else:  # w = d * q + m
            codes, zero = _nibbles(b[..., 4:]), _f16(b[..., 2:4]).squeeze(-1) + 8 * d
        return codes.reshape(n, k), d, zero
    if qtype == "Q4_K":  # super-blocks of 256: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of codes
        from gguf.quants import Q4_K

        b = raw.reshape(n * (k // 256), 144)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = Q4_K.get_scale_min(b[:, 4:16])
        scale = d * sc.astype(np.float32)  # [blocks, 8]
        minimum = -dmin * m.astype(np.float32)  # w = scale * q + minimum
        qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks: low nibbles = sub-block 2c, high = 2c + 1
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
        return codes.reshape(n, k), scale.reshape(n, -1), (minimum + 8 * scale).reshape(n, -1)
    raise QuantError(f"not a 4-bit GGUF type: {qtype}")


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes


def gguf_tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    """{tensor name: (GGML type name, raw bytes [rows, bytes per row])} of a GGUF file, memory-mapped. Reads the
    header directly: gguf.GGUFReader decodes every metadata string (the whole vocabulary) into Python objects,
    about 10 s for SmolLM2, where this needs well under one."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, mv, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(mv[pos - n:pos]).decode("utf-8", "replace")

    def skip_value(vtype):
        nonlocal pos
        if vtype == 8:
            n = take("Q")  # (not `pos += take(...)`: that reads pos before take moves it)
            pos += n
        elif vtype == 9:
            itype, count = take("IQ")
            if itype in _SCALAR:
                pos += _SCALAR[itype] * count
            else:
                for _ in range(count):
                    skip_value(itype)
        else:
            pos += _SCALAR[vtype]

    if bytes(mv[:4]) != b"GGUF":
        raise QuantError(f"{path} is not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("IQQ")
    if version < 2:
        raise QuantError(f"{path}: GGUF version {version} is too old (2 or later)")
    alignment = 32
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key == "general.alignment" and vtype == 4:
            alignment = take("I")
        else:
            skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        dims = [take("Q") for _ in range(n_dims)]
        infos.append((name, dims, take("I"), take("Q")))
    start = -(-pos // alignment) * alignment
    out = {}
    for name, dims, qtype, offset in infos:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        per_row = dims[0] // block * size
        out[name] = (GGMLQuantizationType(qtype).name,
                     buf[start + offset:start + offset + rows * per_row].reshape(rows, per_row))
    return out


def _llama_rows(n: int, n_head: int) -> np.ndarray:
    """The row order transformers applies to a llama GGUF's attn_q/attn_k (undoing llama.cpp's rotary
    permutation): row r of the checkpoint is row order[r] of the GGUF tensor."""
    idx = np.arange(n)
    return idx.reshape(n_head, n // n_head // 2, 2).swapaxes(2, 1).reshape(n)


def _check_repack(deq: torch.Tensor, weight: torch.Tensor, tolerance: float, what: str) -> None:
    """Raise QuantError unless the repacked weights `deq` equal the loaded `weight` (relative to its largest
    entry; a bfloat16 model holds rounded weights, so its own precision is allowed)."""
    ref = weight.detach().float()
    err = (deq - ref).abs().max().item()
    if not err <= max(tolerance, torch.finfo(weight.dtype).eps) * max(ref.abs().max().item(), 1e-12):
        raise QuantError(f"{what} differ from the loaded weights by {err:.3g}: is this the GGUF the checkpoint "
                         "was built from?")


def _dequant(codes, scale, zero) -> torch.Tensor:
    n, k = codes.shape
    w = (codes.reshape(n, k // GROUP, GROUP).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    return torch.from_numpy(w.reshape(n, k))


# --- applying a mode to a backbone -------------------------------------------------------------------------

def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _head_int8(bb) -> None:
    bb.replace_head(Int8Linear(bb.lm_head.weight, getattr(bb.lm_head, "bias", None)))


def quantize_int8(bb, head: str = "float") -> None:
    """Every linear layer of every decoder layer in 8 bits per output row; the LM head too with head="int8"
    (by default it keeps the model's dtype: see quantize_gguf)."""
    for layer in bb.layers:
        for name in _LINEARS:
            lin = layer.get_submodule(name)
            _set(layer, name, Int8Linear(lin.weight, lin.bias))
    if head != "float":
        _head_int8(bb)


_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


class _Group:
    """Projections of one input computed by one kernel call (q/k/v, gate/up): fewer, larger calls."""

    def __init__(self, module: nn.Module, sizes: list[int]):
        self.module, self.sizes, self.last = module, sizes, None


class FusedPart(nn.Module):
    """One projection of a fused group. The first part (q, gate) runs the fused kernel for all parts and
    keeps their outputs for the others, which transformers' layers call next on the same input tensor;
    called on another input (the `fill` policy's K/V-only path calls k and v alone), a part runs its own
    kernel, so skipped layers still read only the K/V weights."""

    def __init__(self, group: _Group, index: int, own: nn.Module | None):
        super().__init__()
        self.group, self.index = group, index
        if index == 0:
            self.fused = group.module
        self._own = own and (own,)  # not a registered submodule: weight_bytes counts the fused weights once

    @property
    def weight_bytes(self) -> int:
        return 0  # the fused module (registered on the first part) holds the bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if self.index == 0:
            outs = g.module(x).split(g.sizes, dim=-1)
            g.last = (x, outs)
            return outs[0]
        if g.last is not None and g.last[0] is x:
            out = g.last[1][self.index]
            if self.index == len(g.sizes) - 1:
                g.last = None
            return out
        if self._own:
            return self._own[0](x)
        return g.module(x).split(g.sizes, dim=-1)[self.index]  # a part nothing calls alone (up) has no own


def _install(layer: nn.Module, parts: dict[str, tuple], fuse: bool) -> None:
    """Set each linear of `layer` from its parts: ("int4", codes, scale, zero, bias) or ("module", m)."""
    done = set()
    if fuse:
        for names in _GROUPS:
            if not all(parts[n][0] == "int4" for n in names):
                continue
            cat = [np.concatenate([parts[n][j] for n in names]) for j in (1, 2, 3)]
            biases = [parts[n][4] for n in names]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else torch.zeros(parts[n][1].shape[0]) for b, n in zip(biases, names)])
            group = _Group(Int4Linear(*(torch.from_numpy(a) for a in cat), bias),
                           [parts[n][1].shape[0] for n in names])
            for j, n in enumerate(names):
                alone = n in ("self_attn.k_proj", "self_attn.v_proj")  # Backbone.kv calls them without q
                own = Int4Linear(*(torch.from_numpy(a) for a in parts[n][1:4]), parts[n][4]) if alone else None
                _set(layer, n, FusedPart(group, j, own))
                done.add(n)
    for n, part in parts.items():
        if n not in done:
            _set(layer, n, part[1] if part[0] == "module" else
                 Int4Linear(*(torch.from_numpy(a) for a in part[1:4]), part[4]))


def quantize_gguf(bb, gguf_path, tolerance: float = 1e-4, fuse: bool = True, head: str = "float") -> dict[str, int]:
    """Replace the backbone's linear layers with the GGUF file's own blocks. Each repacked tensor is checked
    against the backbone's (dequantized) weight: a mismatch above `tolerance` (relative to the tensor's
    largest weight) raises QuantError instead of serving wrong weights. `fuse`: q/k/v and gate/up each run
    as one kernel call. `head`: `float` keeps the LM head in the model's dtype (the default: the kernels
    return bfloat16, whose 8-bit mantissa flips greedy choices between near-tied logits), `int4` runs a
    Q8_0 head as two exact int4 halves (Q8AsInt4Linear; else 8 bits per row). Returns {format: count}."""
    tensors = gguf_tensors(gguf_path)
    cfg = bb.config
    permute = cfg.model_type in ("llama", "mistral")  # llama.cpp permutes q/k rows of these families only
    counts: dict[str, int] = {}
    for i, layer in enumerate(bb.layers):
        parts = {}
        for name in _LINEARS:
            lin = layer.get_submodule(name)
            t = tensors.get(f"blk.{i}.{_GGUF_NAMES[name]}.weight")
            if t is None:
                raise QuantError(f"{gguf_path}: no tensor blk.{i}.{_GGUF_NAMES[name]}.weight for layer {i} {name}")
            n, k = lin.weight.shape
            qtype, raw = t
            if qtype in ("Q4_0", "Q4_1", "Q4_K") and k % (256 if qtype == "Q4_K" else GROUP) == 0 and n % 16 == 0:
                codes, scale, zero = gguf_4bit_groups(raw, qtype, n, k)
                if permute and name in ("self_attn.q_proj", "self_attn.k_proj"):
                    heads = cfg.num_attention_heads if name == "self_attn.q_proj" else cfg.num_key_value_heads
                    order = _llama_rows(n, heads)
                    codes, scale, zero = codes[order], scale[order], zero[order]
                _check_repack(_dequant(codes, scale, zero), lin.weight, tolerance,
                              f"{gguf_path}: the repacked {qtype} blocks of layer {i} {name}")
                bias = None if lin.bias is None else lin.bias.detach().float()
                parts[name] = ("int4", codes, scale, zero, bias)
                kind = f"{qtype} as int4"
            else:
                parts[name], kind = ("module", Int8Linear(lin.weight, lin.bias)), f"{qtype} as int8"
            counts[kind] = counts.get(kind, 0) + 1
        _install(layer, parts, fuse)
    if head == "float":
        counts["LM head in the model's dtype"] = 1
        return counts
    raw_head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    n, k = bb.lm_head.weight.shape
    if raw_head is not None and raw_head[0] == "Q8_0" and k % GROUP == 0 and n % 16 == 0:
        q, d = gguf_q8_0(raw_head[1], n, k)
        _check_repack(torch.from_numpy((q.reshape(n, -1, GROUP) * d[..., None]).reshape(n, k)), bb.lm_head.weight,
                      tolerance, f"{gguf_path}: the Q8_0 LM head's blocks")
        bb.replace_head(Q8AsInt4Linear(q, d, getattr(bb.lm_head, "bias", None)))
        counts["LM head Q8_0 as two int4"] = 1
    else:
        _head_int8(bb)
        counts["LM head as int8"] = 1
    return counts


def apply_quant(bb, mode: str, gguf_path=None, fuse: bool = True, head: str = "float") -> dict[str, int]:
    """Apply a quantized weight mode (`none`, `int8`, `gguf`) to a loaded backbone, in place (`fuse`: see
    quantize_gguf)."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"invalid quant mode {mode!r}: must be one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return {}
    if bb.device.type != "cpu":
        raise QuantError(f"--quant {mode} runs on PyTorch's CPU kernels; on {bb.device.type} use --quant none")
    with torch.no_grad():
        if mode == "int8":
            quantize_int8(bb, head)
            return {"int8": len(bb.layers) * len(_LINEARS) + (head != "float")}
        if gguf_path is None:
            raise QuantError("--quant gguf needs a model loaded from a GGUF file (the registry models are); "
                             "for a Hugging Face checkpoint directory use --quant int8")
        return quantize_gguf(bb, gguf_path, fuse=fuse, head=head)


def weight_bytes(bb) -> dict[str, int]:
    """Bytes one decode step reads from weights: {"layer": per decoder layer (mean), "head": LM head}."""
    def size(m: nn.Module) -> int:
        if hasattr(m, "weight_bytes"):
            return m.weight_bytes
        return sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))  # norms, float linears

    per_layer = [sum(size(m) for m in layer.modules()) for layer in bb.layers]
    return {"layer": sum(per_layer) // len(per_layer), "head": size(bb.lm_head)}
