"""How close is a top-k teacher to the exact one, and what does caching it save per router training step?

On training-mix windows (the batches `buddy train router` draws), for the swap estimator's plan pairs (the
router's top-k plan and one swap near the threshold, per token):
- tail: the teacher's probability mass outside its top K tokens;
- KL error: |KL_K - KL| / KL of the plan's per-token KL to the dense model (mean over tokens);
- sign agreement: the share of the loss weight (|gain|, as the swap loss weights tokens) whose gain sign
  (which of the two plans is better) the top-k teacher gets right.
And, timed in the same run: a training step with the exact teacher, the dense forward inside it, and reading
a cached top-k teacher.

    .venv/bin/python research/teacher_topk.py --model smollm2 --batches 4 --ks 16,64,256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from buddy.backbone import load_backbone
from buddy.calibration import load_calibration
from buddy.corpus import mix_windows
from buddy.engine import Engine, router_features
from buddy.planner import GivenPlanner
from buddy.train.router import RouterTrainer, TrainConfig, swap_plans
from buddy.train.teacher import TeacherCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, default=4, help="training batches of 4 x 256 tokens")
    ap.add_argument("--ks", default="16,64,256")
    ap.add_argument("--budgets", default="0.5:0.9")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    bb = load_backbone(a.model, "cpu", a.dtype)
    order = load_calibration(bb, "mix")["orders"]["static-greedy"]
    train = torch.cat(list(mix_windows(bb.tokenizer, "train", 256, 40).values()))
    cfg = TrainConfig(budgets=a.budgets, steps=a.batches)
    tmp = Path(tempfile.mkdtemp())
    tr = RouterTrainer(bb, cfg, order, train, train[:1], tmp / "run")
    ks = [int(x) for x in a.ks.split(",")]
    tail, err, agree, weight = ({K: [] for K in ks} for _ in range(4))
    t_step = t_dense = 0.0
    t_read = {K: 0.0 for K in ks}
    for step in range(a.batches):
        ids, k = tr.batch_for(step)
        with torch.enable_grad():  # one whole training step with the exact teacher, timed
            t0 = time.perf_counter()
            loss, _ = tr.loss(ids, k)
            loss.backward()
            t_step += time.perf_counter() - t0
        t0 = time.perf_counter()
        exact = tr.teacher(ids)
        t_dense += time.perf_counter() - t0
        kv0, h0 = router_features(bb, ids, cfg.kv_policy)
        scores = tr.module(kv0, h0, k.float() / bb.n_layers) + tr.prior
        plan, swapped, *_ , valid = swap_plans(scores, k, cfg.band, torch.Generator().manual_seed(step))
        logq = []
        for p in (plan, swapped):
            eng = Engine(bb, GivenPlanner(p), cfg.kv_policy)
            h, _ = eng.forward(ids, eng.new_cache(*ids.shape), k)
            logq.append(torch.log_softmax(bb.head(h), dim=-1))
        kl = [exact.kl(q) for q in logq]
        gain = kl[0] - kl[1]
        for K in ks:
            cache = TeacherCache(tmp / "cache", bb.checksum, a.dtype, K)
            cache.teacher(ids, lambda x: exact.logp)  # write
            t0 = time.perf_counter()
            top = cache.teacher(ids, lambda x: exact.logp)  # read
            t_read[K] += time.perf_counter() - t0
            tail[K].append(float(top.rest_logp.exp().mean()))
            kk = [top.kl(q) for q in logq]
            err[K].append(float(((kk[0] - kl[0]).abs() / kl[0].clamp_min(1e-6)).mean()))
            g = kk[0] - kk[1]
            w = gain.abs() * valid
            agree[K].append(float((w * (torch.sign(g) == torch.sign(gain))).sum()))
            weight[K].append(float(w.sum()))
    n = a.batches
    print(f"{a.model} {a.dtype}: {n} batches of {cfg.batch} x {cfg.seq_len} training-mix tokens, budgets {a.budgets}")
    print(f"training step (exact teacher) {t_step / n:.2f} s; dense forward inside it {t_dense / n:.2f} s "
          f"({t_dense / t_step:.0%} of the step)")
    print("| K | tail mass | KL error | swap-gain sign agreement (loss-weighted) | cache read s/step | step saved |")
    print("|---|---|---|---|---|---|")
    for K in ks:
        saved = (t_dense - t_read[K]) / t_step
        print(f"| {K} | {sum(tail[K]) / n:.4f} | {sum(err[K]) / n:.2%} | {sum(agree[K]) / sum(weight[K]):.2%} | "
              f"{t_read[K] / n:.3f} | {saved:.0%} |")


if __name__ == "__main__":
    main()
