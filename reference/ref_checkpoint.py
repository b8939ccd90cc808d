"""Reference tasks about the checkpoint format itself."""

from __future__ import annotations

import torch
from ref_common import load_s3gen, load_t3, load_voice_encoder, module_state_dicts


def module_layout(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Key -> shape, dtype, std and mean of the reference modules' own freshly initialised state dicts."""
    layout = {
        file: {
            key: {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "std": float(t.float().std()) if t.numel() > 1 else None,
                "mean": float(t.float().mean()),
            }
            for key, t in sd.items()
        }
        for file, sd in module_state_dicts().items()
    }
    return {}, layout


def load_strict(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Load a checkpoint directory into the reference modules exactly as upstream does."""
    ckpt = params["ckpt_dir"]
    loaded = {"t3": load_t3(ckpt), "s3gen": load_s3gen(ckpt), "ve": load_voice_encoder(ckpt)}
    conds = torch.load(f"{ckpt}/conds.pt", weights_only=True)
    return {}, {
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in loaded.items()},
        "conds_t3_keys": sorted(conds["t3"]),
        "conds_gen_keys": sorted(conds["gen"]),
    }
