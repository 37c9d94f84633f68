"""The dense model's next-token distributions, the teacher of router training: exact, or top-k and cached.

Every router training step scores plans by KL(dense || routed), so it runs the dense model once per step
(about a third of a step's compute). With `teacher_topk=K` the teacher keeps only each token's K most likely
tokens plus one bucket for the rest of the vocabulary, and is cached on disk per window (keyed by the
window's token ids, the model's checksum and dtype), so a second run over the same windows (another learning
rate, another KV policy, a resumed run) reads it instead of running the dense model.

The KL against a top-k teacher is the KL between the two distributions coarsened to (top-k tokens, rest):

    KL_K = sum_{i in top-k} p_i (log p_i - log q_i) + r (log r - log q_rest)

where r and q_rest are the teacher's and the student's mass outside the teacher's top k, each taken as a
log-sum-exp over the rest of the vocabulary (never as 1 - sum, which loses a confident model's small rest to
rounding). It never exceeds the exact KL (coarsening cannot increase a divergence) and equals it when K = V.
Cached values are float32.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from ..artifacts import atomic_save_tensors
from ..config import cache_dir


class Teacher:
    """A batch's teacher: exact log-probs [B, T, V], or top-k (indices, log-probs) [B, T, K]."""

    def __init__(self, logp: torch.Tensor | None = None, top_idx: torch.Tensor | None = None,
                 top_logp: torch.Tensor | None = None, rest_logp: torch.Tensor | None = None):
        if (logp is None) == (top_idx is None) or (top_idx is not None and (top_logp is None or rest_logp is None)):
            raise ValueError("a teacher is exact (logp) or top-k (top_idx, top_logp, rest_logp), not both or neither")
        self.logp, self.top_idx, self.top_logp, self.rest_logp = logp, top_idx, top_logp, rest_logp

    @staticmethod
    def _rest(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """log of the mass outside idx: [..., V], [..., K] -> [...] (-inf when idx covers the vocabulary)."""
        return logp.scatter(-1, idx, float("-inf")).logsumexp(-1)

    @classmethod
    def top_k(cls, logp: torch.Tensor, k: int) -> "Teacher":
        v, i = logp.topk(min(k, logp.shape[-1]), dim=-1)
        return cls(top_idx=i, top_logp=v, rest_logp=cls._rest(logp, i))

    def kl(self, logq: torch.Tensor) -> torch.Tensor:
        """Per-token KL(teacher || q) [B, T] from the student's log-probs logq [B, T, V]."""
        if self.logp is not None:
            return (self.logp.exp() * (self.logp - logq)).sum(-1)
        idx = self.top_idx.to(logq.device).long()
        lp, lr = self.top_logp.to(logq.dtype), self.rest_logp.to(logq.dtype)
        lq = logq.gather(-1, idx)
        lq_rest = self._rest(logq, idx)
        tail = torch.where(torch.isfinite(lr), lr.exp() * (lr - lq_rest), torch.zeros_like(lr))
        return (lp.exp() * (lp - lq)).sum(-1) + tail


class TeacherCache:
    """Top-k teachers of whole windows on disk, one safetensors file per window.

    The directory is per (model checksum, dtype, k); a file's name is the hash of the window's token ids, so
    any run that draws the same window reuses it, whatever its data settings, seed or KV policy."""

    def __init__(self, root: Path | None, checksum: str, dtype: str, k: int):
        if k < 1:
            raise ValueError(f"invalid teacher top-k {k}: must be >= 1")
        root = Path(root) if root else cache_dir() / "teacher"
        self.dir = root / f"{checksum[:16]}-{dtype}-top{k}"
        self.k = k
        self.hits = self.misses = 0

    def _path(self, window: torch.Tensor) -> Path:
        ids = window.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
        return self.dir / f"{hashlib.sha256(ids).hexdigest()[:32]}.safetensors"

    def _read(self, path: Path, T: int):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            t = load_file(path)
        except (OSError, SafetensorError):
            return None
        i, v, r = t.get("top_idx"), t.get("top_logp"), t.get("rest_logp")
        if i is None or v is None or r is None or i.shape != (T, self.k) or v.shape != (T, self.k) or r.shape != (T,):
            return None  # a damaged or foreign file is recomputed (and overwritten)
        return i, v, r

    def teacher(self, ids: torch.Tensor, dense_logp) -> Teacher:
        """The top-k teacher of windows ids [B, T]: read where cached; the others are computed with
        dense_logp(ids of the missing rows) -> log-probs [b, T, V] in one forward, then written."""
        B, T = ids.shape
        paths = [self._path(w) for w in ids]
        found = [self._read(p, T) if p.is_file() else None for p in paths]
        missing = [b for b in range(B) if found[b] is None]
        if missing:
            with torch.no_grad():
                t = Teacher.top_k(dense_logp(ids[missing]), self.k)
            for j, b in enumerate(missing):
                found[b] = (t.top_idx[j].to("cpu", torch.int32).contiguous(),
                            t.top_logp[j].to("cpu", torch.float32).contiguous(),
                            t.rest_logp[j].to("cpu", torch.float32).contiguous())
                try:
                    atomic_save_tensors(dict(zip(("top_idx", "top_logp", "rest_logp"), found[b])), paths[b])
                except OSError as e:  # a full disk or a read-only cache costs speed, never the run
                    warnings.warn(f"teacher cache: could not write {paths[b]} ({e})", stacklevel=2)
        self.hits += B - len(missing)
        self.misses += len(missing)
        dev = ids.device
        idx, top, rest = (torch.stack([f[n] for f in found]).to(dev) for n in range(3))
        return Teacher(top_idx=idx, top_logp=top, rest_logp=rest)
