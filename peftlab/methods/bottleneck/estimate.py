"""How the memory estimator counts bottleneck adapters: W_down (m×d), b_down (m), W_up (d×m), b_up (d) per
site, in the model dtype, the sites recorded per layer (their saved activations are counted by the estimator's
``adapter`` rule), and trained norms."""

from __future__ import annotations

import re

from torch import nn

from ...core.registry import EstimateRules
from .sites import sites_for


def extra_params(model: nn.Module, cfg, out) -> list[int]:
    """Bottleneck adapter tensors (W_down m×d, b_down m, W_up d×m, b_up d per site); records the sites."""
    sites = sites_for(
        out.config.model_type,
        {k: getattr(cfg, k) for k in ("attn_out", "ffn_out", "attn_in", "ffn_in", "norms")},
    )
    numels: list[int] = []
    for site in ["ffn"] if cfg.style == "pfeiffer" else ["attn", "ffn"]:
        for path, module in model.named_modules():
            m = re.fullmatch(getattr(sites, f"{site}_out"), path)
            if not m or (cfg.layers is not None and int(m.group(1)) not in cfg.layers):
                continue
            layer, d = int(m.group(1)), module.out_features
            size = cfg.bottleneck(layer, d)
            out.adapter_sites[layer][site] = size
            numels += [size * d, size, d * size, d]
    if cfg.train_layernorm and sites.norms:
        for path, module in model.named_modules():
            if re.fullmatch(sites.norms, path):
                numels += [p.numel() for p in module.parameters()]
                out.norms_train = True
    return numels


RULES = EstimateRules(extra_params=extra_params, params_in_model_dtype=True, activation=lambda cfg: cfg.activation)
