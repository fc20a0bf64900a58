"""Optimiser parameter groups shared by the suite's tasks."""
import torch.nn as nn

__all__ = ["no_weight_decay_groups"]


def no_weight_decay_groups(model, weight_decay=0.05):
    """AdamW parameter groups as VMamba/M3amba: no weight decay on parameters flagged
    ``_no_weight_decay`` (the SSMs' A_logs and Ds) and on LayerNorms.

    Frozen parameters (CLIP, and the linear embeddings when not trainable) are left out.
    Returns [{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}].
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    norm_params = {id(p) for module in model.modules() if isinstance(module, nn.LayerNorm)
                   for p in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if getattr(param, "_no_weight_decay", False) or id(param) in norm_params:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
