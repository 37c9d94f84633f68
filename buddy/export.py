"""Export a fixed-depth model: a plain Hugging Face checkpoint with only the k layers of a static plan; or
(`--format vllm`) the whole model with its router, for Buddy's vLLM plugin (per-request budgets).

    buddy export --model smollm2 --layers 20 --planner static-greedy --out exported/smollm2-k20
    buddy export --format vllm --model smollm2 --out exported/smollm2-vllm

The kept layers are renumbered 0..k-1 and `num_hidden_layers` is k, so vanilla `transformers` (and serving
engines that read HF checkpoints) load and generate with it unchanged. Under a static plan a skipped layer is
skipped for every token, so nothing reads its KV cache: the export's logits equal Buddy's at that plan.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from .config import DEFAULT_KV_POLICY, EXPORT_PLANNERS, VLLM_KV_POLICIES
from .errors import BuddyError
from .planner import plan_table


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
        from .calibration import load_calibration

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


VLLM_FAMILIES = {"llama": "BuddyLlamaForCausalLM", "qwen2": "BuddyQwen2ForCausalLM"}  # vllm_plugin.ARCHITECTURES


@torch.no_grad()
def export_vllm(bb, module, meta, out: str | Path, default_layers: int, command: str = "",
                kv_policy: str = DEFAULT_KV_POLICY, predictor=None, depth=None) -> Path:
    """The full model plus its router as one directory that `vllm.LLM(model=out)` and `vllm serve out` load
    with Buddy's plugin installed: `architectures` names the Buddy class, config.json's `buddy` section
    holds the router config, prior order, KV policy and default layer count, and `buddy_router.safetensors`
    the Decision Module (tensor names `buddy_router.*`). With a budget predictor (budget "auto"), its config
    is `buddy.predictor` and its tensors `buddy_predictor.*`, in the same file; with a depth head
    (allocation "token"), `buddy.depth` and `buddy_depth.*`."""
    from safetensors.torch import save_file

    if kv_policy not in VLLM_KV_POLICIES:
        raise ExportError(f"vLLM serves the KV policies fill and zero (its attention kernel has no per-position "
                          f"mask), not {kv_policy!r}")
    arch = VLLM_FAMILIES.get(bb.config.model_type)
    if arch is None:
        raise ExportError(f"model_type {bb.config.model_type!r} has no Buddy vLLM class: use one of "
                          f"{', '.join(VLLM_FAMILIES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    bb.reference_model.save_pretrained(out, safe_serialization=True)
    if bb.tokenizer is not None:
        bb.tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = [arch]
    cfg["buddy"] = {"router": dict(meta.config), "prior_order": list(meta.prior_order), "kv_policy": kv_policy,
                    "default_layers": int(default_layers), "source_model": bb.name, "source_checksum": bb.checksum,
                    "router_steps": meta.steps, "command": command}
    if predictor is not None:
        cfg["buddy"]["predictor"] = {**asdict(predictor.cfg), "levels": list(predictor.cfg.levels)}
    if depth is not None:
        cfg["buddy"]["depth"] = {**asdict(depth.cfg), "levels": list(depth.cfg.levels)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    index = out / "model.safetensors.index.json"
    # float32 whatever the model's dtype: these pick layers and depths (and a standardized router's input means,
    # e.g. 145 for Qwen2.5's pooled keys, would lose the variation it reads in bfloat16)
    state = {}
    for name, part in (("buddy_router", module), ("buddy_predictor", predictor), ("buddy_depth", depth)):
        if part is not None:
            state.update({f"{name}.{k}": v.detach().float().contiguous() for k, v in part.state_dict().items()})
    save_file(state, out / "buddy_router.safetensors", metadata={"format": "pt"})
    if index.is_file():  # vLLM reads only the files an index lists: add the router's tensors to it
        idx = json.loads(index.read_text())
        idx["weight_map"].update({k: "buddy_router.safetensors" for k in state})
        index.write_text(json.dumps(idx, indent=2) + "\n")
    return out
