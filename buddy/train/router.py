"""Router training: a frozen backbone, a Decision Module learning which layers each token should run.

    buddy train router --model smollm2 --kv-policy fill --budgets 0.5:1.0 --steps 400 --out runs/router

Each sequence gets its own budget k (sampled from the range), so one router serves every budget.
The routed forward is one parallel pass that reproduces cached decode exactly for the chosen KV policy
(hard top-k plans; a straight-through sigmoid around the top-k threshold carries the gradient).
Loss: KL from the dense model's next-token distribution (+ optional LM cross-entropy). Validation
perplexity on SOTU validation years every N steps, against the prior-only plan; the best checkpoint is
what gets written. Checkpoints are atomic; `--resume` continues a killed run with the same result.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..artifacts import check_resume, git_commit, load_state, save_state
from ..backbone import Backbone
from ..budget import ALWAYS_ON
from ..config import DEFAULT_KV_POLICY, KV_POLICIES, ConfigError
from ..engine import layer0, router_features
from ..planner import GivenPlanner, topk_plan
from ..router import (
    DecisionModule,
    RouterConfig,
    RouterMeta,
    RouterPlanner,
    prior_scores,
    save_router,
)
from .teacher import Teacher, TeacherCache


@dataclass
class TrainConfig:
    """Router training settings.

    kv_policy: the KV policy the router is trained (and later served) with.
    budgets: range of budget fractions `lo:hi`; each sequence samples k uniformly in it (k < L).
    steps: optimizer steps (0 with `init` and `scales`: fit the per-k weights of a trained router, no training).
    batch: sequences per step.
    seq_len: tokens per sequence.
    lr: AdamW learning rate.
    tau: temperature of the straight-through sigmoid around the top-k threshold.
    ce_weight: weight of the LM cross-entropy added to the KL loss.
    width: hidden width of the Decision Module.
    standardize: standardize the Decision Module's inputs per feature, with means and deviations measured
        on `standardize_windows` training windows before the first step (buddy/router.py, RouterConfig).
    standardize_windows: training windows (evenly spaced) that measure the standardization.
    budget_onehot: give the Decision Module a one-hot encoding of k besides the Fourier features.
    data: training text: `mix` (the cross-domain mix of buddy/corpus.py; validation is the mean over its
        domains), `sotu` (SOTU training years; validation on SOTU 2001-2010), or your own UTF-8 `.txt` file
        (its first 90% trains, its last 10% validates).
    train_per_domain: `mix`: at most this many evenly spaced training windows per domain (balances the mix).
    calibration: the calibration whose static order is the prior (`mix`, `sotu` or a JSON path).
    val_every: validate (and write the best router so far) every N steps.
    save_every: write the resumable training state every N steps (and at every validation).
    val_windows: validation windows of seq_len tokens (per domain for `mix`).
    val_layers: layer counts validated at (comma list; empty = 0.5, 0.7, 0.9 of L).
    prior: calibration order used as the prior (static-greedy or static-bi).
    estimator: `swap` (measure swapping a kept and a dropped layer near the top-k threshold, per token,
        and train the scores to rank the better one higher), `st` (straight-through gates), or `gate`
        (keep the scores of the router in `init`; train only its gate: per token, measure the router's
        plan against the prior's plan and learn where the router's plan wins).
    init: a router directory to start from (required for `gate`).
    select: which validated checkpoint is kept: `mean` (lowest mean NLL over domains and layer counts) or
        `safe` (the lowest mean among checkpoints no worse than the prior, by more than 0.002 nats, on any
        validation domain and layer count; the prior itself if none is).
    band: `swap` picks the swapped layers among this many ranks on each side of the threshold.
    swap_every: `swap` swaps at every token (1) and credits each swap with its own token's KL change, or swaps at
        one token in every N (a random offset per row and step) and credits each swap with the KL change of its
        token and of the N-1 tokens after it, which read its K/V. Under `fill`, later tokens carry about two
        thirds of a swap's effect (research/swap_crosstalk.py), which the per-token credit leaves out. A step
        costs the same two forwards either way, so it carries N times fewer labels; swaps in a window's last
        N-1 tokens get a shorter credit (cut at the window's end).
    seed: seed for data order, budgets and initialisation.
    teacher_topk: 0 runs the dense model (the teacher) at every step, exactly; K > 0 keeps each token's K most
        likely tokens plus one bucket for the rest (the coarsened KL, never above the exact one) and caches
        them on disk per window, so later runs over the same windows skip the dense forward
        (buddy/train/teacher.py).
    teacher_cache: where top-k teachers are cached (default: Buddy's cache directory, `teacher/`).
    scales: after training, weigh the router's scores against the prior per layer count: for each validated k
        the value among these (comma list, e.g. 0,0.5,1) with the lowest mean validation NLL among those no
        worse than the prior on any validation domain, by more than 0.002 nats (0 is the prior's plan itself,
        always allowed); layer counts in between interpolate. The validation split is the one that also picks
        the checkpoint, so judge the result on test domains. Empty: weight 1 (the router as trained). Rerun
        with `--resume` and the same `--steps` to fit scales for a finished run; `--init` starts from weight 1.
        `--init ROUTER_DIR --steps 0 --scales ...` fits the weights of a trained router (a shipped one included)
        without training it: its validation is then the init router's, and its metadata names the init.
    scale_windows: fit the scales on this many validation windows (per domain for `mix`), every weight (the prior's and
        the router's as trained included) measured afresh on them; 0 = the checkpoint's own validation windows.
        More windows make the per-domain test less noisy (2 windows per domain decide on noise).
    ema: 0 validates and writes the weights as trained; d in (0, 1) keeps an exponential moving average of them
        (each step: average = d * average + (1 - d) * weights) and validates and writes the average instead, which
        smooths the swings between checkpoints (docs/results.md, "Training longer"). 0.99 averages over about the
        last 100 steps.
    scale_rule: when a weight counts as no worse than the prior on a domain: `strict` (its mean validation NLL is
        at most 0.002 nats above the prior's) or `interval` (the 95% paired bootstrap interval over windows of its
        NLL minus the prior's does not lie entirely above 0: only a significant loss rules it out; every weight
        is then measured afresh, per window).
    """

    kv_policy: str = DEFAULT_KV_POLICY
    budgets: str = "0.5:1.0"
    steps: int = 400
    batch: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    tau: float = 1.0
    ce_weight: float = 0.0
    width: int = 256
    standardize: bool = False
    standardize_windows: int = 64
    budget_onehot: bool = True
    data: str = "mix"
    train_per_domain: int = 1000
    calibration: str = "mix"
    val_every: int = 25
    save_every: int = 25
    val_windows: int = 8
    val_layers: str = ""
    prior: str = "static-greedy"
    estimator: str = "swap"
    init: str = ""
    select: str = "mean"
    band: int = 3
    swap_every: int = 1
    seed: int = 0
    teacher_topk: int = 0
    teacher_cache: str = ""
    scales: str = ""
    scale_windows: int = 0
    scale_rule: str = "strict"
    ema: float = 0.0

    def __post_init__(self):
        if self.kv_policy not in KV_POLICIES:
            raise ConfigError(f"invalid kv policy {self.kv_policy!r}: must be one of {', '.join(KV_POLICIES)}")
        try:
            lo, hi = (float(x) for x in self.budgets.split(":"))
        except ValueError:
            raise ConfigError(f"invalid budgets {self.budgets!r}: use lo:hi, e.g. 0.5:1.0") from None
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"invalid budgets {self.budgets!r}: need 0 < lo <= hi <= 1")
        if self.prior not in ("static-greedy", "static-bi"):
            raise ConfigError(f"invalid prior {self.prior!r}: must be static-greedy or static-bi")
        if self.estimator not in ("swap", "st", "gate"):
            raise ConfigError(f"invalid estimator {self.estimator!r}: must be swap, st or gate")
        if self.estimator == "gate" and not self.init:
            raise ConfigError("estimator gate trains the gate of a trained router: give --init ROUTER_DIR")
        if self.select not in ("mean", "safe"):
            raise ConfigError(f"invalid select {self.select!r}: must be mean or safe")
        try:
            sc = [float(x) for x in self.scales.split(",")] if self.scales else []
        except ValueError:
            sc = [-1.0]
        if any(not (0 <= x <= 4) for x in sc):
            raise ConfigError(f"invalid scales {self.scales!r}: a comma list of weights in [0, 4], e.g. 0,0.5,1")
        if self.teacher_topk < 0:
            raise ConfigError(f"invalid teacher_topk {self.teacher_topk}: must be >= 0 (0: the exact dense teacher)")
        if self.val_layers:
            try:
                ks = [int(x) for x in self.val_layers.split(",")]
            except ValueError:
                raise ConfigError(f"invalid val_layers {self.val_layers!r}: use a comma list of layer counts, "
                                  "e.g. 15,21,27") from None
            if any(k < 2 for k in ks):
                raise ConfigError(f"invalid val_layers {self.val_layers!r}: every count must be >= 2")
        if self.data not in ("mix", "sotu") and not self.data.endswith(".txt"):
            raise ConfigError(f"invalid data {self.data!r}: must be mix, sotu or a UTF-8 .txt file of your own")
        if self.steps < 0:
            raise ConfigError(f"invalid steps {self.steps}: must be >= 0")
        if self.steps == 0 and not (self.init and self.scales):
            raise ConfigError("steps 0 fits the per-k weights of a trained router without training it: "
                              "give --init ROUTER_DIR and --scales too")
        for name in ("batch", "seq_len", "val_every", "save_every", "val_windows", "width", "band",
                     "swap_every", "train_per_domain", "standardize_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid {name} {getattr(self, name)}: must be >= 1")
        if self.swap_every > 1 and self.estimator != "swap":
            raise ConfigError(f"swap_every {self.swap_every} is for the swap estimator, not {self.estimator!r}")
        if self.swap_every > self.seq_len:
            raise ConfigError(f"swap_every {self.swap_every} is longer than seq_len {self.seq_len}: some windows "
                              "would get no swap")
        if self.scale_windows < 0:
            raise ConfigError(f"invalid scale_windows {self.scale_windows}: must be >= 0 (0 = the validation windows)")
        if self.scale_rule not in ("strict", "interval"):
            raise ConfigError(f"invalid scale_rule {self.scale_rule!r}: must be strict or interval")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"invalid ema {self.ema}: must be in [0, 1) (0: no average; e.g. 0.99)")
        if self.scale_windows and not self.scales:
            raise ConfigError("scale_windows is for fitting scales: give scales too (e.g. --scales 0,0.5,1)")

    def k_range(self, n_layers: int) -> tuple[int, int]:
        lo, hi = (float(x) for x in self.budgets.split(":"))
        k_lo = max(2, math.floor(lo * n_layers + 0.5))
        k_hi = min(n_layers - 1, math.floor(hi * n_layers + 0.5))  # k = L has nothing to route
        return k_lo, max(k_lo, k_hi)

    def val_ks(self, n_layers: int) -> list[int]:
        if self.val_layers:
            return [int(x) for x in self.val_layers.split(",")]
        return sorted({max(2, math.floor(f * n_layers + 0.5)) for f in (0.5, 0.7, 0.9)})


def routed_train_forward(bb: Backbone, module: DecisionModule, prior: torch.Tensor, ids: torch.Tensor,
                         k: torch.Tensor, policy: str, tau: float):
    """Routed logits [B, T, V] of one parallel pass with per-token hard plans (decode semantics for
    `policy`) and straight-through gates; returns (logits, hard plan [B, T, L])."""
    B, T = ids.shape
    L = bb.n_layers
    cache, h, rope = layer0(bb, ids, policy)
    scores = module(cache.kv0_mean, h, k.float() / L) + prior.to(h.device)  # [B, T, L-2]
    plan = topk_plan(scores.detach(), k)
    ranked = scores.detach().sort(dim=-1, descending=True).values
    m = k.view(B, 1, 1) - ALWAYS_ON  # intermediate layers kept
    hi = ranked.gather(-1, (m - 1).clamp(0, L - 3).expand(B, T, 1))
    lo = ranked.gather(-1, m.clamp(0, L - 3).expand(B, T, 1))
    soft = torch.sigmoid((scores - (hi + lo) / 2) / tau)
    gates = (plan[..., 1:-1].to(soft.dtype) + soft - soft.detach()).to(h.dtype)
    cache.route(plan)
    for i in range(1, L):
        with cache.only(keep=plan[..., i]):
            out = bb.layer(i, h, cache.mask(i), rope, cache)
        h = out if i == L - 1 else h + gates[..., i - 1, None] * (out - h)
    cache.end()
    return bb.head(h), plan


def significantly_worse(nll: list[float], prior_nll: list[float]) -> bool:
    """Whether the 95% paired bootstrap interval over windows of mean(nll - prior_nll) lies entirely above 0."""
    from ..eval.stats import paired_bootstrap

    d = np.asarray(nll, dtype=float) - np.asarray(prior_nll, dtype=float)
    return d.size > 0 and paired_bootstrap(d)[1] > 0


def worst_domain(nll: dict, prior: dict, k: int) -> list:
    """[domain, perplexity ratio to the prior] of the domain where {domain: {k: NLL}} loses most at k."""
    d = max(prior, key=lambda d: nll[d][k] - prior[d][k])
    return [d, round(math.exp(nll[d][k] - prior[d][k]), 4)]


def interpolate(n: int, points: dict[int, float]) -> list[float]:
    """Values at 0..n: linear between the given (k, value) points, the nearest point's value outside them."""
    ks = sorted(points)
    return [float(x) for x in np.interp(range(n + 1), ks, [points[k] for k in ks])]


def swap_plans(scores: torch.Tensor, k: torch.Tensor, band: int, gen: torch.Generator, rows: slice = slice(None),
               batch: int | None = None):
    """Per token, swap one kept and one dropped intermediate layer near the top-k threshold.

    Random draws are made for the whole global batch (`batch` rows) and `rows` of them used, so a
    distributed shard draws exactly what one process would for those rows.
    Returns (plan, swapped plan, kept index a, dropped index c, valid [B, T]); a and c index the L-2
    intermediate layers."""
    B, T, M = scores.shape
    order = scores.argsort(dim=-1, descending=True)  # rank -> layer index
    m = (k - ALWAYS_ON).view(B, 1)
    G = batch or B
    ra = m - 1 - torch.randint(0, band, (G, T), generator=gen)[rows].to(scores.device)
    rc = m + torch.randint(0, band, (G, T), generator=gen)[rows].to(scores.device)
    valid = (ra >= 0) & (rc < M) & (m > 0) & (m < M)
    a = order.gather(-1, ra.clamp(0, M - 1)[..., None])[..., 0]
    c = order.gather(-1, rc.clamp(0, M - 1)[..., None])[..., 0]
    plan = topk_plan(scores, k)
    mid = plan[..., 1:-1].clone()
    bi, ti = torch.nonzero(valid, as_tuple=True)
    mid[bi, ti, a[bi, ti]] = False
    mid[bi, ti, c[bi, ti]] = True
    swapped = torch.cat([plan[..., :1], mid, plan[..., -1:]], dim=-1)
    return plan, swapped, a, c, valid


def sparse_swaps(plan: torch.Tensor, swapped: torch.Tensor, valid: torch.Tensor, every: int, gen: torch.Generator,
                 rows: slice = slice(None), batch: int | None = None):
    """Keep the swaps of one token in every `every` (a random offset per row, drawn for the whole global batch
    like swap_plans' draws); the other tokens run `plan`. Returns (swapped plan, valid [B, T])."""
    B, T = valid.shape
    off = torch.randint(0, every, (batch or B,), generator=gen)[rows].to(valid.device)
    pos = torch.arange(T, device=valid.device)
    at = (pos[None, :] >= off[:, None]) & ((pos[None, :] - off[:, None]) % every == 0)
    valid = valid & at
    return torch.where(valid[..., None], swapped, plan), valid


def window_sum(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T] -> [B, T]: x[t] + ... + x[t + n - 1], cut at the end of the sequence."""
    T = x.shape[-1]
    cs = torch.nn.functional.pad(x.cumsum(-1), (1, 0))
    end = torch.arange(T, device=x.device).add(n).clamp_max(T)
    return cs[..., end] - cs[..., :T]


def _dist() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over the distributed processes (itself in one process); no gradient."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def init_record(path: Path, meta) -> dict:
    """What a run started from, so its metadata still names it after the directory is overwritten."""
    h = hashlib.sha256((path / "router.safetensors").read_bytes()).hexdigest()
    return {"path": str(path), "sha256": h, "git_commit": meta.git_commit, "steps": meta.steps,
            "data": meta.data}


def init_distributed() -> bool:
    """Join the process group of a torchrun launch (gloo on CPU, NCCL on CUDA); False when not launched so."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


class RouterTrainer:
    """Holds the frozen backbone, the module, data and optimizer; `run()` trains with checkpoints."""

    def __init__(self, bb: Backbone, cfg: TrainConfig, order: list[int], train_windows: torch.Tensor,
                 val_windows: torch.Tensor | dict[str, torch.Tensor], out: Path, command: str = "", data: str = ""):
        self.bb, self.cfg, self.out = bb, cfg, Path(out)
        bb.freeze()
        torch.manual_seed(cfg.seed)
        rcfg = RouterConfig(n_layers=bb.n_layers, kv_dim=2 * bb.shapes.n_kv_heads * bb.shapes.head_dim,
                            hidden_dim=bb.shapes.hidden, width=cfg.width,
                            budget_onehot=cfg.budget_onehot, gate=cfg.estimator == "gate",
                            standardize=cfg.standardize)
        self.init_meta = None
        if cfg.init:  # start from a trained router (its shape and prior win over the settings above)
            from ..router import load_router

            init, self.init_meta = load_router(Path(cfg.init), checksum=bb.checksum, n_layers=bb.n_layers)
            if list(self.init_meta.prior_order) != list(order):
                raise ConfigError(f"router {cfg.init} was trained with another prior order than calibration "
                                  f"{cfg.calibration!r} gives: pass the calibration it was trained with")
            if cfg.standardize and not init.cfg.standardize:
                raise ConfigError(f"router {cfg.init} was trained without --standardize; its weights read raw "
                                  "inputs: drop --standardize, or train from scratch")
            rcfg = RouterConfig(**{**asdict(init.cfg), "gate": rcfg.gate or init.cfg.gate})
        self.module = DecisionModule(rcfg).to(bb.device)
        if cfg.init:
            self.module.load_state_dict(init.state_dict(), strict=False)
            self.module.scale.fill_(1.0)  # a fitted weight belongs to the weights it was fitted for
        elif rcfg.standardize:  # every process measures the same windows; a resumed run loads its own
            self.fit_standardization(train_windows, cfg.standardize_windows)
        if rcfg.gate and cfg.estimator == "gate":  # only the gate trains; it starts closed (= the prior's plan)
            for name, p in self.module.named_parameters():
                p.requires_grad_(name.startswith("fc_gate"))
            torch.nn.init.zeros_(self.module.fc_gate.weight)
            torch.nn.init.zeros_(self.module.fc_gate.bias)
        # the weights that validate and ship: the module itself, or its moving average (TrainConfig.ema)
        self.ema_module = copy.deepcopy(self.module).requires_grad_(False) if cfg.ema else None
        self.rank, self.world = _dist()
        if cfg.estimator == "gate" and self.world > 1:
            raise ConfigError("estimator gate runs in one process (it is small): launch it without torchrun")
        if cfg.batch % self.world:
            raise ConfigError(f"batch {cfg.batch} must be divisible by the {self.world} distributed processes")
        self.net = self.module  # what training calls: the module, or its DDP wrapper across processes
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.module)
        self.order = order
        self.prior = prior_scores(order, bb.n_layers).to(bb.device)
        self.teacher_cache = (TeacherCache(Path(cfg.teacher_cache) if cfg.teacher_cache else None, bb.checksum,
                                           str(bb.dtype).removeprefix("torch."), cfg.teacher_topk)
                              if cfg.teacher_topk else None)
        self.opt = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=0.0)
        # validation windows by domain; the validation score is the mean over domains (each domain counts once)
        self.val_windows = val_windows if isinstance(val_windows, dict) else {"validation": val_windows}
        self.scale_windows: dict | torch.Tensor | None = None  # fit_scales' own windows (TrainConfig.scale_windows)
        self.train_windows = train_windows
        self.step = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.baseline: dict | None = None
        self.train_seconds = 0.0
        self.meta = RouterMeta(model=bb.name, checksum=bb.checksum, n_layers=bb.n_layers, kv_policy=cfg.kv_policy,
                               budgets=tuple(float(x) for x in cfg.budgets.split(":")), prior=cfg.prior,
                               prior_order=list(order), config=asdict(rcfg), command=command, data=data,
                               git_commit=git_commit(), calibration=cfg.calibration,
                               init=init_record(Path(cfg.init), self.init_meta) if cfg.init else {})

    def fit_standardization(self, windows: torch.Tensor, n: int) -> None:
        """The Decision Module's input statistics from n evenly spaced training windows (layer 0 only)."""
        idx = torch.linspace(0, len(windows) - 1, min(n, len(windows))).round().long()
        kv, h = [], []
        for chunk in idx.split(8):
            kv0, h0 = router_features(self.bb, windows[chunk].to(self.bb.device), self.cfg.kv_policy)
            kv.append(kv0.float().cpu())
            h.append(h0.float().cpu())
        self.module.fit_standardization(torch.cat(kv), torch.cat(h))

    # --- deterministic data and budgets per step (so a resumed run repeats exactly) ----------------------
    def shard(self) -> slice:
        """This process's rows of the global batch."""
        n = self.cfg.batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def batch_for(self, step: int):
        n = self.train_windows.shape[0]
        per_epoch = max(1, n // self.cfg.batch)
        epoch, j = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)[j * self.cfg.batch:(j + 1) * self.cfg.batch]
        gk = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)
        lo, hi = self.cfg.k_range(self.bb.n_layers)
        k = torch.randint(lo, hi + 1, (len(perm),), generator=gk)
        return self.train_windows[perm].to(self.bb.device), k.to(self.bb.device)

    def _kl(self, dense: Teacher, plan, ids, k):
        """Per-token KL(dense || routed with `plan`) [B, T], no grad."""
        from ..engine import Engine

        eng = Engine(self.bb, GivenPlanner(plan), self.cfg.kv_policy)
        cache = eng.new_cache(ids.shape[0], ids.shape[1])
        h, _ = eng.forward(ids, cache, k)
        return dense.kl(torch.log_softmax(self.bb.head(h), dim=-1))

    def teacher(self, ids: torch.Tensor) -> Teacher:
        """The dense model's next-token distributions for ids [B, T]: exact, or top-k through the cache."""
        def dense_logp(x):
            with torch.no_grad():
                return torch.log_softmax(self.bb.dense_logits(x), dim=-1)

        if self.teacher_cache is None:
            return Teacher(logp=dense_logp(ids))
        return self.teacher_cache.teacher(ids, dense_logp)

    def swap_loss(self, ids, k, dense):
        """Measured effect of one swap per token near the threshold -> logistic ranking loss on the scores."""
        kv0, h0 = router_features(self.bb, ids, self.cfg.kv_policy)
        scores = self.net(kv0, h0, k.float() / self.bb.n_layers) + self.prior
        gen = torch.Generator().manual_seed(self.cfg.seed * 31337 + self.step)
        plan, swapped, a, c, valid = swap_plans(scores.detach(), k, self.cfg.band, gen, self.shard(), self.cfg.batch)
        n = self.cfg.swap_every
        if n > 1:
            swapped, valid = sparse_swaps(plan, swapped, valid, n, gen, self.shard(), self.cfg.batch)
        kl = self._kl(dense, plan, ids, k)
        gain = kl - self._kl(dense, swapped, ids, k)  # > 0: the dropped layer c would have been better
        if n > 1:  # a swap's credit: its own token and the next n-1, which read its K/V
            gain = window_sum(gain, n)
        margin = scores.gather(-1, c[..., None])[..., 0] - scores.gather(-1, a[..., None])[..., 0]
        w = gain.abs() * valid
        # normalised by the global weight, times the process count: DDP's gradient mean is then the global loss's
        loss = (w * torch.nn.functional.softplus(-torch.sign(gain) * margin)).sum() / _all_sum(w.sum()).clamp_min(1e-9)
        return loss * self.world, kl.mean()

    def gate_loss(self, ids, k, dense):
        """Per token, the measured gain of the router's plan over the prior's plan -> logistic loss on the gate."""
        kv0, h0 = router_features(self.bb, ids, self.cfg.kv_policy)
        scores, gate = self.module.heads(kv0, h0, k.float() / self.bb.n_layers)
        with torch.no_grad():
            routed = topk_plan(scores + self.prior, k)
            prior = topk_plan(self.prior.expand_as(scores), k)
            kl_router = self._kl(dense, routed, ids, k)
            gain = self._kl(dense, prior, ids, k) - kl_router  # > 0: the router's plan is better for this token
            same = (routed == prior).all(-1)  # identical plans teach the gate nothing
            w = gain.abs() * ~same
        loss = (w * torch.nn.functional.softplus(-torch.sign(gain) * gate)).sum() / w.sum().clamp_min(1e-9)
        return loss, kl_router.mean()

    def loss(self, ids, k):
        dense = self.teacher(ids)
        if self.cfg.estimator == "swap":
            return self.swap_loss(ids, k, dense)
        if self.cfg.estimator == "gate":
            return self.gate_loss(ids, k, dense)
        logits, _ = routed_train_forward(self.bb, self.net, self.prior, ids, k, self.cfg.kv_policy, self.cfg.tau)
        kl = dense.kl(torch.log_softmax(logits, dim=-1)).mean()
        loss = kl
        if self.cfg.ce_weight:
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss = loss + self.cfg.ce_weight * ce
        return loss, kl

    def validate(self, use_router: bool = True, module: DecisionModule | None = None, windows: dict | None = None,
                 per_window: bool = False) -> dict:
        """Validation NLL per domain and layer count; `nll` per k and `mean_nll` average the domains
        (on the validation windows, or on `windows` {domain: [N, T]}); `per_window` adds `window_nll`
        {domain: {k: [each window's mean NLL]}}."""
        from ..engine import Engine
        from ..eval.ppl import evaluate_windows

        planner = RouterPlanner(module or self.module, self.prior, use_router=use_router)
        eng = Engine(self.bb, planner, self.cfg.kv_policy)
        ks = self.cfg.val_ks(self.bb.n_layers)
        runs = {d: {k: evaluate_windows(eng, w, layers=k, batch_size=self.cfg.batch, per_window=per_window)
                    for k in ks} for d, w in (windows or self.val_windows).items()}
        domains = {d: {k: r.nll for k, r in per.items()} for d, per in runs.items()}
        res = {k: sum(v[k] for v in domains.values()) / len(domains) for k in ks}
        self.module.train()
        out = {"nll": res, "mean_nll": sum(res.values()) / len(res), "domains": domains}
        if per_window:
            out["window_nll"] = {d: {k: r.window_nll for k, r in per.items()} for d, per in runs.items()}
        return out

    SAFE_TOLERANCE = 0.002  # nats of validation NLL: `select=safe` treats smaller losses as noise

    def _safe(self, v: dict) -> bool:
        base = self.baseline["domains"]
        return all(x <= base[d][k] + self.SAFE_TOLERANCE for d, per in v["domains"].items() for k, x in per.items())

    def _better(self, v: dict) -> bool:
        """Whether validation result v beats the best checkpoint so far (by `select`)."""
        if self.cfg.select == "safe" and self._safe(v) != self._safe(self.best):
            return self._safe(v)
        return v["mean_nll"] < self.best["mean_nll"]

    def shipped(self) -> DecisionModule:
        """The weights that validate and are written: the moving average with `ema`, else the module."""
        return self.ema_module if self.ema_module is not None else self.module

    @torch.no_grad()
    def update_average(self) -> None:
        if self.ema_module is None:
            return
        d = self.cfg.ema
        avg = self.ema_module.state_dict()
        for name, p in self.module.state_dict().items():
            if p.is_floating_point():
                avg[name].mul_(d).add_(p, alpha=1 - d)

    # --- checkpoints ------------------------------------------------------------------------------------
    def save_state(self) -> None:
        save_state(self.out / "state.pt", {
            "step": self.step, "module": self.module.state_dict(), "opt": self.opt.state_dict(),
            **({"ema": self.ema_module.state_dict()} if self.ema_module is not None else {}),
            "history": self.history, "best": self.best, "baseline": self.baseline,
            "train_seconds": self.train_seconds, "settings": self.settings(), "init": self.meta.init})

    def settings(self) -> dict:
        """The settings a resumed run must share with the run it continues (all but the step count)."""
        return {k: v for k, v in asdict(self.cfg).items()
                if k not in ("steps", "val_every", "save_every", "teacher_cache", "scales", "scale_windows",
                             "scale_rule")}

    def load_state(self) -> bool:
        path = self.out / "state.pt"
        if not path.is_file():
            return False
        state = load_state(path, self.bb.device)
        saved = state.get("settings")
        if saved is not None:  # states written before --standardize existed trained without it
            saved = {"standardize": False, "ema": 0.0, "swap_every": 1, **saved}  # and without --ema, --swap-every
        check_resume(path, saved, self.settings())
        self.module.load_state_dict(state["module"])
        if self.ema_module is not None:
            self.ema_module.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.history = state["step"], state["history"]
        self.best, self.baseline, self.train_seconds = state["best"], state["baseline"], state["train_seconds"]
        started = state.get("init")
        if started:  # the run's start is what it recorded then, even if --init DIR holds other weights now
            if started["sha256"] != self.meta.init.get("sha256"):
                warnings.warn(f"{self.cfg.init} holds other weights than the router this run started from "
                              f"(sha256 {started['sha256'][:12]}); its metadata keeps naming that one", stacklevel=2)
            self.meta.init = started
        return True

    def _write_best(self) -> None:
        """The best validated router so far becomes the output router."""
        self.meta.steps = self.step
        self.meta.best_step = self.best["step"]
        self.meta.train_seconds = round(self.train_seconds, 1)
        self.meta.validation = {
            "prior_only_ppl": {str(k): math.exp(v) for k, v in self.baseline["nll"].items()},
            "router_ppl": {str(k): math.exp(v) for k, v in self.best["nll"].items()},
            "split": ("SOTU validation years 2001-2010" if self.cfg.data == "sotu" else
                      "validation split of the training mix; ppl = exp(mean over domains of the mean NLL)"
                      if self.cfg.data == "mix" else f"the last 10% of {self.cfg.data}"),
        }
        if "domains" in self.best:
            self.meta.validation["router_over_prior"] = {
                d: {str(k): round(math.exp(v - self.baseline["domains"][d][k]), 4) for k, v in per.items()}
                for d, per in self.best["domains"].items()}
        module = DecisionModule(self.module.cfg)
        module.load_state_dict(self.best["module"])
        save_router(module, self.meta, self.out)

    def run(self, progress: bool = True) -> dict:
        cfg = self.cfg
        main = self.rank == 0  # only the first process validates and writes files
        progress = progress and main
        if self.baseline is None and main:
            self.baseline = self.validate(use_router=False)
            # step 0's checkpoint is the router the run starts from, validated as such with --init (with
            # --steps 0 that is a weight fit of a trained router); a fresh router starts as the prior's plan
            start = self.validate(module=self.shipped()) if cfg.init else self.baseline
            self.best = {"step": 0, "mean_nll": start["mean_nll"], "nll": start["nll"], "domains": start["domains"],
                         "module": {k: v.clone() for k, v in self.shipped().state_dict().items()}}
        self.module.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train router", unit="step", disable=not progress)
        tokens = cfg.batch * cfg.seq_len
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            ids, k = self.batch_for(self.step)
            ids, k = ids[self.shard()], k[self.shard()]
            loss, kl = self.loss(ids, k)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            kl = float(_all_sum(kl.detach())) / self.world
            loss_value = float(_all_sum(loss.detach())) / self.world
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], 1.0)
            self.opt.step()
            self.update_average()
            self.step += 1
            dt = time.perf_counter() - t0
            self.train_seconds += dt
            self.history.append({"step": self.step, "loss": loss_value, "kl": kl})
            if main:
                bar.set_postfix(kl=f"{kl:.4f}", tok_s=f"{tokens / dt:.0f}",
                                best=f"{math.exp(self.best['mean_nll']):.2f}@{self.best['step']}", refresh=False)
            bar.update(1)
            if main and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                t1 = time.perf_counter()
                v = self.validate(module=self.shipped())
                self.train_seconds += time.perf_counter() - t1
                self.history[-1]["val_mean_nll"] = v["mean_nll"]
                self.history[-1]["val_domains"] = v["domains"]
                if self._better(v):
                    self.best = {"step": self.step, "mean_nll": v["mean_nll"], "nll": v["nll"],
                                 "domains": v["domains"], "module": {k: t.clone() for k, t in self.shipped().state_dict().items()}}
                worst = max((math.exp(x - self.baseline["domains"][d][k]), d, k)
                            for d, per in v["domains"].items() for k, x in per.items())
                bar.write(f"step {self.step}: val ppl " + " ".join(
                    f"k={k}:{math.exp(x):.2f}(prior {math.exp(self.baseline['nll'][k]):.2f})"
                    for k, x in v["nll"].items()) + f"; worst router/prior {worst[0]:.3f} ({worst[1]}, k={worst[2]})")
                self._write_best()
                self.save_state()
            elif main and self.step % cfg.save_every == 0:
                self.save_state()
        bar.close()
        if main:
            self._write_best()
            self.save_state()
            if cfg.scales:
                self.fit_scales([float(x) for x in cfg.scales.split(",")], progress)
        return self.best

    def fit_scales(self, candidates: list[float], progress: bool = True) -> dict[int, float]:
        """Fit the best router's per-k score weight on validation (see TrainConfig.scales) and rewrite it."""
        if "domains" not in self.baseline:
            raise ConfigError(f"{self.out / 'state.pt'} predates per-domain validation: fit scales on a newer run")
        module = DecisionModule(self.module.cfg).to(self.bb.device)
        module.load_state_dict(self.best["module"])
        module.scale.fill_(1.0)
        ks = self.cfg.val_ks(self.bb.n_layers)
        windows = self.scale_windows
        if windows is not None and not isinstance(windows, dict):
            windows = {"validation": windows}
        interval = self.cfg.scale_rule == "interval"  # needs per-window NLLs: every weight measured afresh
        if windows is None and not interval:
            base = self.baseline["domains"]
        else:
            v = self.validate(use_router=False, windows=windows, per_window=interval)
            base, base_w = v["domains"], v.get("window_nll")
        results, per_window = {0.0: base}, {}
        for a in sorted(set(candidates) - {0.0}):
            if a == 1.0 and self.best["step"] > 0 and windows is None and not interval:  # the checkpoint's own
                results[a] = self.best["domains"]
                continue
            module.scale.fill_(a)
            v = self.validate(module=module, windows=windows, per_window=interval)
            results[a], per_window[a] = v["domains"], v.get("window_nll")
            if progress:
                tqdm.write(f"scale {a:g}: val ppl " + " ".join(
                    f"k={k}:{math.exp(sum(results[a][d][k] for d in base) / len(base)):.2f}" for k in ks))
        chosen = {}
        for k in ks:
            def mean(a):
                return sum(results[a][d][k] for d in base) / len(base)
            if interval:
                safe = [0.0] + [a for a in per_window if not any(
                    significantly_worse(per_window[a][d][k], base_w[d][k]) for d in base)]
            else:
                safe = [a for a, r in results.items()
                        if all(r[d][k] <= base[d][k] + self.SAFE_TOLERANCE for d in base)]
            chosen[k] = min(safe, key=mean)
        module.scale.copy_(torch.tensor(interpolate(self.bb.n_layers, chosen)))
        self.meta.validation["scale"] = {
            "by_k": {str(k): chosen[k] for k in ks},
            "ppl": {f"{a:g}": {str(k): round(math.exp(sum(r[d][k] for d in base) / len(base)), 4) for k in ks}
                    for a, r in sorted(results.items())},
            "rule": ("per validated k, the lowest mean NLL among scales not significantly worse than the prior on "
                     "any validation domain (95% paired bootstrap interval over windows above 0); interpolated"
                     if interval else
                     "per validated k, the lowest mean NLL among scales no worse than the prior (by more than "
                     f"{self.SAFE_TOLERANCE} nats) on any validation domain; interpolated between them"),
            "windows": {d: int(w.shape[0]) for d, w in (windows or self.val_windows).items()},
            "worst_domain": {f"{a:g}": {str(k): worst_domain(r, base, k) for k in ks}
                             for a, r in sorted(results.items()) if a}}
        save_router(module, self.meta, self.out)
        if progress:
            tqdm.write("scales: " + " ".join(f"k={k}:{chosen[k]:g}" for k in ks))
        return chosen
