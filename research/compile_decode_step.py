"""Probe: does torch.compile of the per-layer decode step cut Buddy's per-token overhead on CPU?

    .venv/bin/python research/compile_decode_step.py gguf      # or none, int8

Times greedy decode at full depth (128-token prompt, 32 tokens, static-greedy planner) eagerly, then with
every single-token call of a decoder layer going through one `torch.compile`d function (inductor,
dynamic shapes, the layer module passed as an argument so that one graph serves all layers), and prints
the compile time and both ms/token. Found (docs/performance.md): 128 s to compile, about 7% faster.
"""

import sys
import time

import torch

from buddy.api import load
from buddy.budget import Budget
from buddy.eval.latency import time_engine

torch.set_num_threads(2)
m = load("smollm2", dtype="float32", quant=sys.argv[1] if len(sys.argv) > 1 else "gguf", planner="static-greedy")
bb = m.bb
p = [list(range(1000, 1128))]
print("eager %.2f ms/token" % time_engine(m, p, 30, 33, 2)[1], flush=True)
torch._dynamo.config.cache_size_limit = 64


def run_layer(layer, h, mask, rope, cache):
    return layer(h, attention_mask=mask, position_embeddings=rope, cache=cache)


compiled = torch.compile(run_layer, dynamic=True)
eager_layer = bb.layer


def layer(i, h, mask, rope, cache):
    if h.shape[1] == 1:
        return compiled(bb.layers[i], h, mask, rope, cache)
    return eager_layer(i, h, mask, rope, cache)


bb.layer = layer
t = time.time()
list(m.generate_batch(p, [Budget(layers=30)], max_new_tokens=3, ignore_eos=True))
print("compile and warm-up %.0f s" % (time.time() - t), flush=True)
print("compiled %.2f ms/token" % time_engine(m, p, 30, 33, 2)[1], flush=True)
