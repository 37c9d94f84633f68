"""GRPO training of the Budget Predictor on a frozen backbone and router.

    buddy train predictor --model smollm2 --tradeoff 3.5 --out runs/predictor

Data (`--data`): `mix` (default), the cross-domain prompt mix of `buddy.prompt_mix` (the domains of the
router's training mix: prose, math, the multiple-choice tasks, chat and code; the training and validation
documents only, never the ones `buddy sweep --limit 100` evaluates nor the held-out domains), or `sotu`, State
of the Union windows (train years for training, validation years for validation). Each item is a prompt of up
to `prompt_len` tokens and a continuation of up to `cont_len`. For every item and budget level the routed
model's quality is measured once: the negative mean per-token KL from the dense model over the continuation
(or the continuation's log-likelihood, `--quality nll`), with the prompt routed as a prompt and the
continuation as decode. These
tables are cached, so GRPO itself is cheap and several trade-offs reuse them.

GRPO: for each prompt sample a group of G levels from the policy; reward = quality - tradeoff * layer
fraction; advantages normalised within the group; clipped policy-gradient objective over `inner` updates,
plus beta * KL to the reference (the initial, uniform) policy. Checkpoints are atomic; `--resume` continues.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..artifacts import (
    atomic_save_tensors,
    check_resume,
    git_commit,
    load_state,
    save_state,
)
from ..budget import Budget
from ..config import DEFAULT_KV_POLICY, ConfigError, at_least, cache_dir
from ..predictor import (
    BudgetPredictor,
    PredictorConfig,
    PredictorMeta,
    prompt_features,
    save_predictor,
)


@dataclass
class PredictorTrainConfig:
    """Budget Predictor training settings.

    levels: budget fractions the predictor chooses among (comma list).
    tradeoff: lambda in reward = quality - lambda * executed-layer fraction.
    group: levels sampled per prompt (the GRPO group).
    steps: GRPO steps.
    batch: prompts per step.
    lr: AdamW learning rate.
    weight_decay: AdamW weight decay (the predictor sees a few hundred prompts: keep it small and regularised).
    clip: PPO-style ratio clip epsilon.
    beta: weight of the KL term to the reference (initial, uniform) policy.
    inner: policy updates per sampled batch.
    data: `mix` (the cross-domain prompt mix, buddy/prompt_mix.py) or `sotu` (State of the Union windows).
    prompts: training items (mix: spread evenly over its 16 domains; 14 for a model without a chat template).
    val_prompts: validation items (mix: spread evenly over its 16 domains).
    prompt_len: prompt tokens the predictor sees.
    cont_len: continuation tokens whose quality is measured.
    quality: `kl` (negative mean KL to the dense model) or `nll` (continuation log-likelihood).
    width: hidden width of the predictor.
    seed: seed for initialisation, prompt order and sampling.
    val_every: validate (and save the training state) every N steps.
    """

    levels: str = "0.5,0.625,0.75,0.875,1.0"
    tradeoff: float = 3.5
    group: int = 4
    steps: int = 1000
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    clip: float = 0.2
    beta: float = 0.1
    inner: int = 2
    data: str = "mix"
    prompts: int = 896
    val_prompts: int = 336
    prompt_len: int = 128
    cont_len: int = 32
    quality: str = "kl"
    width: int = 8
    seed: int = 0
    val_every: int = 25

    def __post_init__(self):
        try:
            self.level_list = tuple(float(x) for x in str(self.levels).split(","))
            PredictorConfig(1, 1, self.level_list)
        except ValueError:
            raise ConfigError(f"invalid --levels {self.levels!r}: increasing fractions in (0, 1], e.g. 0.5,0.75,1") from None
        at_least(self, 1, "group", "steps", "batch", "inner", "prompts", "val_prompts", "prompt_len", "cont_len", "width", "val_every")
        if self.group < 2:
            raise ConfigError(f"invalid group {self.group}: GRPO needs at least 2 samples per prompt")
        if self.data not in ("mix", "sotu"):
            raise ConfigError(f"invalid data {self.data!r}: use mix or sotu")
        if self.quality not in ("kl", "nll"):
            raise ConfigError(f"invalid quality {self.quality!r}: use kl or nll")
        if not (self.tradeoff >= 0 and self.clip > 0 and self.beta >= 0 and self.lr > 0 and self.weight_decay >= 0):
            raise ConfigError("tradeoff, beta and weight_decay must be >= 0; clip and lr > 0")


# --- quality tables --------------------------------------------------------------------------------
@torch.inference_mode()
def quality_table(engine, windows: torch.Tensor, levels, prompt_len: int, quality: str = PredictorTrainConfig.quality, batch: int = 16,
                  progress: bool = True, desc: str = "quality") -> torch.Tensor:
    """[N, n_levels] quality of each window at each level (prompt routed as prefill, continuation as decode)."""
    from ..eval.ppl import window_logits

    L = engine.n_layers
    ks = [Budget(fraction=x).k(L) for x in levels]
    out = torch.zeros(windows.shape[0], len(levels))
    for s in tqdm(range(0, windows.shape[0], batch), desc=desc, unit="batch", disable=not progress, leave=False):
        ids = windows[s:s + batch].to(engine.bb.device)
        tgt = ids[:, prompt_len:]
        dense = None
        for j, k in enumerate(ks):
            logits, _ = window_logits(engine, ids, k, prompt_len)
            lp = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), dim=-1)
            if quality == "nll":
                out[s:s + batch, j] = lp.gather(-1, tgt[..., None])[..., 0].mean(dim=1).cpu()
                continue
            if dense is None:
                d, _ = window_logits(engine, ids, L, prompt_len) if k != L else (logits, None)
                dense = torch.log_softmax(d[:, prompt_len - 1:-1].float(), dim=-1)
            kl = (dense.exp() * (dense - lp)).sum(-1).mean(dim=1)
            out[s:s + batch, j] = -kl.cpu()
    return out


def planner_fingerprint(planner) -> str:
    """The planner's name and a hash of what decides its plans (router weights, prior, static order), so that a
    cached table is never reused for another router or calibration."""
    h = hashlib.sha256(planner.name.encode())
    module = getattr(planner, "module", None)
    tensors = [*(module.state_dict().values() if module is not None else ()),
               *(t for t in (getattr(planner, "prior", None),) if isinstance(t, torch.Tensor))]
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([int(x) for x in getattr(planner, "order", ()) or ()]).encode())
    return f"{planner.name}-{h.hexdigest()[:16]}"


def _table_path(bb, planner, policy: str, cfg: PredictorTrainConfig, split: str, n: int) -> Path:
    key = json.dumps([bb.checksum, str(bb.dtype), planner_fingerprint(planner), policy, cfg.level_list,
                      cfg.prompt_len, cfg.cont_len, cfg.quality, split, n])
    return cache_dir() / "predictor" / f"{bb.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def _cached(path: Path, compute) -> dict[str, torch.Tensor]:
    """The tensors in `path`, or `compute()`'s, written there atomically first."""
    from safetensors.torch import load_file

    if path.is_file():
        return load_file(path)
    t = {k: v.contiguous() for k, v in compute().items()}
    atomic_save_tensors(t, path)
    return t


def cached_table(engine, bb, cfg: PredictorTrainConfig, split: str, n: int, progress: bool = True):
    """(features [N, F], quality [N, n_levels]) for n SOTU windows of a split; computed once, then cached."""
    from ..data import sotu_texts, token_windows

    def compute():
        windows = token_windows(bb.tokenizer, sotu_texts(split), cfg.prompt_len + cfg.cont_len, n)
        feats = torch.cat([prompt_features(bb, windows[s:s + 32, :cfg.prompt_len], engine.kv_policy)
                           for s in range(0, windows.shape[0], 32)])
        q = quality_table(engine, windows, cfg.level_list, cfg.prompt_len, cfg.quality, progress=progress,
                          desc=f"quality ({split})")
        return {"features": feats, "quality": q}

    t = _cached(_table_path(bb, engine.planner, engine.kv_policy, cfg, split, n), compute)
    return t["features"], t["quality"]


def item_table(engine, items, levels, quality: str = PredictorTrainConfig.quality, progress: bool = True, desc: str = "quality",
               policy: str = DEFAULT_KV_POLICY) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, F], quality [N, n_levels]) of prompt-mix items (`buddy.prompt_mix.MixItem`) of any length:
    items of one (prompt, continuation) shape are batched together, and rows keep the items' order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((len(it.prompt), len(it.continuation)), []).append(i)
    feats, q = [None] * len(items), torch.zeros(len(items), len(levels))
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False)
    for (p, _), idx in groups.items():
        for s in range(0, len(idx), 16):
            part = idx[s:s + 16]
            ids = torch.tensor([items[i].prompt + items[i].continuation for i in part])
            f = prompt_features(engine.bb, ids[:, :p], policy)
            q[part] = quality_table(engine, ids, levels, p, quality, batch=16, progress=False)
            for j, i in enumerate(part):
                feats[i] = f[j]
            bar.update(len(part))
    bar.close()
    return torch.stack(feats), q


def bucket_length(n: int, prompt: bool) -> int:
    """The bucket a length falls to: prompts to multiples of 16 below 128, of 32 below 512, then of 64;
    continuations to multiples of 4 below 16, of 8 below 64, then of 16; shorter ones stay whole."""
    steps = ((16, 1), (128, 16), (512, 32), (None, 64)) if prompt else ((4, 1), (16, 4), (64, 8), (None, 16))
    for top, step in steps:
        if top is None or n < top:
            return n - n % step
    return n


def bucket_items(items: list, bos: int | None = None) -> list:
    """Items with their prompt cut from the left to its bucket length and their continuation cut to its
    (`bucket_length`): far fewer distinct shapes, so `item_table` batches them. A prompt's last tokens and a
    continuation's first ones are kept, and a leading `bos` (for tokenizers that add one) stays first."""
    from ..prompt_mix import MixItem

    out = []
    for it in items:
        head = 1 if bos is not None and it.prompt[:1] == [bos] else 0
        keep = bucket_length(len(it.prompt) - head, prompt=True)
        prompt = it.prompt[:head] + it.prompt[len(it.prompt) - keep:]
        out.append(MixItem(it.domain, prompt, it.continuation[:bucket_length(len(it.continuation), prompt=False)]))
    return out


def added_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of every text, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def cached_mix_table(engine, bb, cfg: PredictorTrainConfig, split: str, n: int, progress: bool = True):
    """(features, quality, domain index into `prompt_mix.ALL_DOMAINS`) of n prompt-mix items of a split
    (spread evenly over the split's domains, cut to bucket shapes); computed once, then cached."""
    from ..prompt_mix import ALL_DOMAINS, VERSION, mix_items, split_domains

    def compute():
        items = bucket_items(mix_items(bb.tokenizer, split, max(1, n // len(split_domains(split))), cfg.prompt_len,
                                       cfg.cont_len), added_bos(bb.tokenizer))
        feats, q = item_table(engine, items, cfg.level_list, cfg.quality, progress, f"quality (mix {split})",
                              engine.kv_policy)
        return {"features": feats, "quality": q,
                "domain": torch.tensor([ALL_DOMAINS.index(it.domain) for it in items])}

    t = _cached(_table_path(bb, engine.planner, engine.kv_policy, cfg, f"mix{VERSION}-{split}", n), compute)
    return t["features"], t["quality"], t["domain"]


def split_table(engine, cfg: PredictorTrainConfig, split: str, n: int, progress: bool = True):
    """(features, quality, domain index or None) of `cfg.data` for one split: n items, cached."""
    if cfg.data == "mix":
        return cached_mix_table(engine, engine.bb, cfg, split, n, progress)
    return (*cached_table(engine, engine.bb, cfg, split, n, progress), None)


# --- GRPO ----------------------------------------------------------------------------------------
def rewards(quality: torch.Tensor, levels: torch.Tensor, tradeoff: float) -> torch.Tensor:
    """[N, n_levels] reward of each level: quality - tradeoff * executed-layer fraction."""
    return quality - tradeoff * levels[None]


def grpo_step(policy: BudgetPredictor, opt, feats: torch.Tensor, reward: torch.Tensor, cfg: PredictorTrainConfig,
              gen: torch.Generator) -> dict:
    """One GRPO step on a batch: feats [B, F], reward [B, n_levels] (known for every level)."""
    n = reward.shape[1]
    with torch.no_grad():
        logp_old_all = torch.log_softmax(policy(feats), dim=-1)
        actions = torch.multinomial(logp_old_all.exp(), cfg.group, replacement=True, generator=gen)  # [B, G]
        logp_old = logp_old_all.gather(1, actions)
        r = reward.gather(1, actions)
        adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-6)
    ref_logp = -math.log(n)  # the reference policy is the initial uniform one
    for _ in range(cfg.inner):
        logp = torch.log_softmax(policy(feats), dim=-1).gather(1, actions)
        ratio = (logp - logp_old).exp()
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
        kl = (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1).mean()  # k3 estimator, >= 0
        loss = pg + cfg.beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"loss": float(loss.detach()), "reward": float(r.mean()), "kl_ref": float(kl.detach())}


def policy_report(policy: BudgetPredictor, feats, quality, levels: torch.Tensor, tradeoff: float) -> dict:
    """The served (argmax) policy on a table: mean level, mean quality and reward; fixed levels alongside."""
    with torch.no_grad():
        pick = policy(feats).argmax(dim=-1)
    q = quality.gather(1, pick[:, None])[:, 0]
    lv = levels[pick]
    return {"mean_level": float(lv.mean()), "quality": float(q.mean()),
            "reward": float((q - tradeoff * lv).mean()),
            "level_share": [float((pick == i).float().mean()) for i in range(len(levels))],
            "fixed_quality": [float(x) for x in quality.mean(dim=0)]}


def domain_levels(policy: BudgetPredictor, feats, domain: torch.Tensor, levels: torch.Tensor) -> dict:
    """The served policy's mean chosen level per prompt-mix domain."""
    from ..prompt_mix import ALL_DOMAINS

    with torch.no_grad():
        lv = levels[policy(feats).argmax(dim=-1)]
    return {ALL_DOMAINS[d]: round(float(lv[domain == d].mean()), 4) for d in sorted(set(domain.tolist()))}


class PredictorTrainer:
    def __init__(self, engine, cfg: PredictorTrainConfig, out: Path, command: str = ""):
        self.engine, self.bb, self.cfg, self.out, self.command = engine, engine.bb, cfg, Path(out), command
        torch.manual_seed(cfg.seed)
        self.policy = BudgetPredictor(PredictorConfig(self.bb.shapes.n_kv_heads * self.bb.shapes.head_dim * 2,
                                                      self.bb.shapes.hidden, cfg.level_list, cfg.width))
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.levels = torch.tensor(cfg.level_list)
        self.step, self.history, self.seconds = 0, [], 0.0

    def tables(self, progress: bool = True):
        tr = split_table(self.engine, self.cfg, "train", self.cfg.prompts, progress)
        va = split_table(self.engine, self.cfg, "validation", self.cfg.val_prompts, progress)
        self.train, self.val, self.val_domain = tr[:2], va[:2], va[2]

    def save_state(self) -> None:
        save_state(self.out / "state.pt", {
            "policy": self.policy.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
            "gen": self.gen.get_state(), "history": self.history, "seconds": self.seconds, "config": asdict(self.cfg)})

    def load_state(self) -> bool:
        f = self.out / "state.pt"
        if not f.is_file():
            return False
        st = load_state(f, "cpu")
        check_resume(f, st["config"], {k: v for k, v in asdict(self.cfg).items() if k not in ("steps", "val_every")})
        self.policy.load_state_dict(st["policy"])
        self.opt.load_state_dict(st["opt"])
        self.gen.set_state(st["gen"])
        self.step, self.history, self.seconds = st["step"], st["history"], st["seconds"]
        return True

    def run(self, progress: bool = True) -> dict:
        # the head is tiny: one thread is as fast as several, and far faster when other jobs hold the cores
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._run(progress)
        finally:
            torch.set_num_threads(threads)

    def _run(self, progress: bool) -> dict:
        feats, quality = self.train
        reward = rewards(quality, self.levels, self.cfg.tradeoff)
        bar = tqdm(range(self.step, self.cfg.steps), desc="grpo", unit="step", disable=not progress,
                   initial=self.step, total=self.cfg.steps)
        t0 = time.perf_counter()
        for _ in bar:
            idx = torch.randint(0, feats.shape[0], (self.cfg.batch,), generator=self.gen)
            m = grpo_step(self.policy, self.opt, feats[idx], reward[idx], self.cfg, self.gen)
            self.step += 1
            if self.step % self.cfg.val_every == 0 or self.step == self.cfg.steps:
                v = policy_report(self.policy, *self.val, self.levels, self.cfg.tradeoff)
                self.history.append({"step": self.step, **m, "val_reward": v["reward"], "val_level": v["mean_level"]})
                bar.set_postfix(reward=f"{m['reward']:.3f}", val_level=f"{v['mean_level']:.3f}")
                self.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.save_state()
        return self.finish()

    def finish(self) -> dict:
        val = policy_report(self.policy, *self.val, self.levels, self.cfg.tradeoff)
        if getattr(self, "val_domain", None) is not None:
            val["domain_level"] = domain_levels(self.policy, self.val[0], self.val_domain, self.levels)
        commit = git_commit()
        meta = PredictorMeta(
            model=self.bb.name, checksum=self.bb.checksum, config=asdict(self.policy.cfg), tradeoff=self.cfg.tradeoff,
            planner=self.engine.planner.name, kv_policy=self.engine.kv_policy, quality=self.cfg.quality,
            group=self.cfg.group, steps=self.step,
            data=self.data_description(),
            command=self.command, git_commit=commit, train_seconds=round(self.seconds, 1), validation=val)
        save_predictor(self.policy, meta, self.out)
        return val

    def data_description(self) -> str:
        c = self.cfg
        if c.data == "mix":
            from ..prompt_mix import DOMAINS, VERSION

            n, v = c.prompts // len(DOMAINS), c.val_prompts // len(DOMAINS)
            return (f"prompt mix (buddy/prompt_mix.py), {n} training and {v} validation items per domain of "
                    f"{', '.join(DOMAINS)}: prompts of up to {c.prompt_len} tokens, continuations of up to "
                    f"{c.cont_len}; no document of the test split (the first 100 of every task, SOTU 2011-2021) and none "
                    f"of the held-out domains; mix version {VERSION}")
        return (f"SOTU train years (<= 2000): {c.prompts} windows of {c.prompt_len} prompt + "
                f"{c.cont_len} continuation tokens; validation: {c.val_prompts} windows of 2001-2010")
