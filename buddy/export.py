"""Export a fixed-depth model: a plain Hugging Face checkpoint with only the k layers of a static plan.

    buddy export --model smollm2 --layers 20 --planner static-greedy --out exported/smollm2-k20

The kept layers are renumbered 0..k-1 and `num_hidden_layers` is k, so vanilla `transformers` (and serving
engines that read HF checkpoints) load and generate with it unchanged. Under a static plan a skipped layer is
skipped for every token, so nothing reads its KV cache: the export's logits equal Buddy's at that plan.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from .config import DEFAULT_KV_POLICY
from .errors import BuddyError
from .planner import plan_table

EXPORT_PLANNERS = ("static-greedy", "static-bi", "router-prior")


class ExportError(BuddyError):
    """The export cannot be made (unknown planner, no calibration, existing output)."""


def export_order(bb, planner: str, kv_policy: str = DEFAULT_KV_POLICY, calibration: str | None = None) -> list[int]:
    """The layer importance order behind a static export."""
    if planner == "router-prior":
        from .api import router_dir
        from .router import load_router

        rdir = router_dir(bb, kv_policy)
        if rdir is None:
            raise ExportError(f"no trained router for model {bb.name!r}; use --planner static-greedy")
        return list(load_router(rdir, checksum=bb.checksum, n_layers=bb.n_layers)[1].prior_order)
    if planner in ("static-greedy", "static-bi"):
        from .prior import load_calibration

        return list(load_calibration(bb, calibration)["orders"][planner])
    raise ExportError(f"unknown export planner {planner!r}: use one of {', '.join(EXPORT_PLANNERS)}")


def kept_layers(order: list[int], n_layers: int, k: int) -> list[int]:
    return plan_table(order, n_layers)[k].nonzero().flatten().tolist()


def export_checkpoint(bb, keep: list[int], out: str | Path, meta: dict | None = None) -> Path:
    """Write a Hugging Face checkpoint of bb's model with only the layers in `keep` (renumbered)."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another --out")
    cfg = copy.deepcopy(bb.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = min(cfg.max_window_layers, len(keep))
    new = AutoModelForCausalLM.from_config(cfg, dtype=bb.dtype)
    renumber = {old: new_i for new_i, old in enumerate(keep)}
    state = {}
    for name, t in bb.state_dict().items():
        m = re.match(r"(.*\blayers)\.(\d+)\.(.*)", name)
        if m is None:
            state[name] = t
        elif int(m[2]) in renumber:
            state[f"{m[1]}.{renumber[int(m[2])]}.{m[3]}"] = t
    missing, unexpected = new.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"could not map the weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.tie_word_embeddings:
        new.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    new.save_pretrained(out, safe_serialization=True)
    if bb.tokenizer is not None:
        bb.tokenizer.save_pretrained(out)
    (out / "buddy-export.json").write_text(json.dumps({"source_model": bb.name, "source_checksum": bb.checksum,
                                                       "kept_layers": keep, "n_layers_source": bb.n_layers,
                                                       **(meta or {})}, indent=1) + "\n")
    return out


@torch.no_grad()
def export(bb, k: int, planner: str, out: str | Path, command: str = "", kv_policy: str = DEFAULT_KV_POLICY,
           calibration: str | None = None) -> tuple[Path, list[int]]:
    keep = kept_layers(export_order(bb, planner, kv_policy, calibration), bb.n_layers, k)
    return export_checkpoint(bb, keep, out, {"planner": planner, "k": k, "command": command}), keep
