"""The kernel floor of a quantized decode step: PyTorch's CPU weight-only kernels alone, no model around them.

    .venv/bin/python benchmarks/quant_kernels.py --threads 2

Times, at batch 1 and with weights too large to stay in cache (one distinct set per layer), the matrix-vector
products of a whole decode step as `--quant gguf` runs them: per layer, q/k/v fused, o, gate/up fused and
down (SmolLM2-135M shapes by default), and the LM head in 8 and in 4 bits, against float32 dense. The
difference between these times and `buddy bench latency`'s ms/token is the per-token overhead of everything
else (norms, rotary, attention, cache writes, Python). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def bench(f, n: int = 20) -> float:
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--kv-dim", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=49152)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    H, inter = args.hidden, args.intermediate
    shapes = [(H + 2 * args.kv_dim, H), (H, H), (2 * inter, H), (H, inter)]  # qkv, o, gate/up, down
    xb, xib = torch.randn(1, H).bfloat16(), torch.randn(1, inter).bfloat16()

    def int4(n, k):
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), torch.rand(k // 32, n, 2).bfloat16()

    q4 = [[int4(n, k) for n, k in shapes] for _ in range(args.layers)]
    dense = [[torch.randn(n, k) for n, k in shapes] for _ in range(args.layers)]

    def run_int4():
        for layer in q4:
            for j, (w, sz) in enumerate(layer):
                torch.ops.aten._weight_int4pack_mm_for_cpu(xib if j == 3 else xb, w, 32, sz)

    def run_dense():
        for layer in dense:
            for j, w in enumerate(layer):
                torch.mm((xib if j == 3 else xb).float(), w.t())

    head8 = torch.randint(-127, 127, (args.vocab, H), dtype=torch.int8), torch.rand(args.vocab).bfloat16()
    head4 = int4(args.vocab, H)
    head32 = torch.randn(args.vocab, H)
    res = {"threads": args.threads, "layers": args.layers,
           "int4_layers_ms": bench(run_int4), "fp32_layers_ms": bench(run_dense),
           "int8_head_ms": bench(lambda: torch.ops.aten._weight_int8pack_mm(xb, *head8)),
           "int4_head_ms": bench(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, head4[0], 32, head4[1])),
           "fp32_head_ms": bench(lambda: xb.float() @ head32.t())}
    print(f"threads {args.threads}, {args.layers} layers of {shapes} + a {args.vocab} x {H} head, batch 1\n")
    print("| weights | all layers ms | LM head ms |")
    print("|---|---|---|")
    print(f"| int4 group 32 (bf16 scales) | {res['int4_layers_ms']:.2f} | {res['int4_head_ms']:.2f} |")
    print(f"| int8 per row | | {res['int8_head_ms']:.2f} |")
    print(f"| float32 dense | {res['fp32_layers_ms']:.2f} | {res['fp32_head_ms']:.2f} |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
