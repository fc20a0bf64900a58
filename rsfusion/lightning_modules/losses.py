"""Training losses of the suite's tasks (the networks in ``networks/`` only compute outputs)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rsfusion.lightning_modules.networks.bdgf import BDGFOutput

__all__ = ["m3amba_loss", "bdgf_loss", "dml_kl_loss", "entropy_gap_loss", "feature_similarity_loss",
           "warmup_weight"]

ML_MODES = ("none", "prob", "feat", "both")  # BDGF's mutual-learning terms


def m3amba_loss(outputs, target, mask=None, ignore_index=-1, ce_weights=(1 / 3, 1 / 3, 1 / 3),
                supervised_weight=1.0, consistency_weight=0.1, detach_fused=False, class_weights=None,
                label_smoothing=0.0):
    """Masked CE on the three heads plus cosine consistency (figure: L = l1 L_sup + l2 L_unsup).

    The form follows the paper's figure; the weights are ours (the paper's are unknown):
    L_sup = sum_i ce_weights[i] * CE_i (mean CE over the labelled pixels of head i; default: the
    mean over the three heads), L_unsup = (1 - cos(M_hsi, M_fused)) + (1 - cos(M_aux, M_fused)),
    cosine over the class axis, averaged over all pixels (labelled or not).

    Args:
        outputs: (hsi_logits, aux_logits, fused_logits), each (B, K, H, W).
        target: (B, H, W) integer labels.
        mask: optional (B, H, W); pixels with mask > 0 are labelled (the authors' loader style,
            where unlabelled pixels carry class 0). Without it, target == ignore_index is unlabelled.
        ignore_index: unlabelled value of ``target`` when no mask is given (-1).
        supervised_weight, consistency_weight: l1, l2 [ours: 1.0, 0.1].
        detach_fused: stop the consistency gradient into the fused head [ours: False].
        class_weights, label_smoothing: ``F.cross_entropy``'s ``weight`` (K,) and ``label_smoothing``,
            applied to each head's CE (weighted mean over the labelled pixels).

    Returns a dict of scalar tensors: loss, ce_hsi, ce_aux, ce_fused, consistency.
    """
    if len(outputs) != 3 or len(ce_weights) != 3:
        raise ValueError("outputs and ce_weights must each hold 3 entries (hsi, aux, fused)")
    if target.shape != outputs[2].shape[:1] + outputs[2].shape[2:]:
        raise ValueError(f"target must be (B, H, W) = {tuple(outputs[2].shape[:1] + outputs[2].shape[2:])}, "
                         f"got {tuple(target.shape)}")
    labelled = (mask > 0) if mask is not None else (target != ignore_index)
    labels = target[labelled].long()
    ces = []
    for logits in outputs:
        pixels = logits.float().permute(0, 2, 3, 1)[labelled]  # (P, K)
        ces.append(F.cross_entropy(pixels, labels, weight=class_weights, label_smoothing=label_smoothing)
                   if labels.numel() else pixels.sum() * 0.0)
    fused = outputs[2].float().detach() if detach_fused else outputs[2].float()
    consistency = sum(1.0 - F.cosine_similarity(o.float(), fused, dim=1).mean() for o in outputs[:2])
    supervised = sum(w * ce for w, ce in zip(ce_weights, ces))
    return {"loss": supervised_weight * supervised + consistency_weight * consistency,
            "ce_hsi": ces[0], "ce_aux": ces[1], "ce_fused": ces[2], "consistency": consistency}


def _as_list(values: Mapping[str, Tensor] | Sequence[Tensor]) -> list[Tensor]:
    return list(values.values()) if isinstance(values, Mapping) else list(values)


def dml_kl_loss(logits: Mapping[str, Tensor] | Sequence[Tensor], temperature: float = 2.0) -> Tensor:
    """Deep-mutual-learning KL [R]: mean over ordered pairs i != j of tau^2 KL(sg(p_j) || p_i),
    p = softmax(logits / tau), batch mean. Zero for fewer than two branches."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ls = _as_list(logits)
    if len(ls) < 2:
        return ls[0].new_zeros(()) if ls else torch.zeros(())
    log_p = [F.log_softmax(z / temperature, dim=-1) for z in ls]
    terms = [F.kl_div(log_p[i], log_p[j].detach(), log_target=True, reduction="batchmean")
             for i in range(len(ls)) for j in range(len(ls)) if i != j]
    return temperature ** 2 * torch.stack(terms).mean()


def entropy_gap_loss(logits: Mapping[str, Tensor] | Sequence[Tensor], temperature: float = 2.0) -> Tensor:
    """Entropy alignment [R]: mean over pairs i < j of |H(p_i) - H(p_j)|, H the batch-mean entropy
    of p = softmax(logits / tau). Zero for fewer than two branches."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ls = _as_list(logits)
    if len(ls) < 2:
        return ls[0].new_zeros(()) if ls else torch.zeros(())
    entropies = []
    for z in ls:
        log_p = F.log_softmax(z / temperature, dim=-1)
        entropies.append(-(log_p.exp() * log_p).sum(dim=-1).mean())
    gaps = [(entropies[i] - entropies[j]).abs() for i in range(len(ls)) for j in range(i + 1, len(ls))]
    return torch.stack(gaps).mean()


def feature_similarity_loss(projections: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Feature similarity [R]: mean over pairs i < j of (1 - cos(u_i, u_j)), batch mean."""
    us = _as_list(projections)
    if len(us) < 2:
        return us[0].new_zeros(()) if us else torch.zeros(())
    terms = [(1 - F.cosine_similarity(us[i], us[j], dim=-1)).mean()
             for i in range(len(us)) for j in range(i + 1, len(us))]
    return torch.stack(terms).mean()


def warmup_weight(progress: float, warmup_fraction: float = 0.1) -> float:
    """Linear ramp 0 -> 1 over the first ``warmup_fraction`` of training; progress in [0, 1]
    (e.g. epoch / max_epochs) [D]."""
    if warmup_fraction < 0:
        raise ValueError(f"warmup_fraction must be >= 0, got {warmup_fraction}")
    if warmup_fraction == 0:
        return 1.0
    return float(min(max(progress / warmup_fraction, 0.0), 1.0))


def bdgf_loss(output: BDGFOutput, target: Tensor, ml: str = "both", temperature: float = 2.0,
              lambda_prob: float = 1.0, lambda_feat: float = 0.5, entropy_weight: float = 0.1,
              warmup: float = 1.0, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Total BDGF loss L = sum_i CE_i + w (lambda_p (L_prob + entropy_weight L_ent) + lambda_f L_feat).

    ``ml`` (ablation C): "none", "prob" (KL + entropy), "feat" (cosine) or "both"; ``warmup`` = w
    from :func:`warmup_weight`; ``entropy_weight=0`` drops the entropy term. Defaults [D]:
    tau 2, lambda_p 1, lambda_f 0.5, entropy 0.1. Returns a dict with ``loss``, ``ce``,
    ``ce/<branch>``, ``prob_kl``, ``entropy_gap``, ``feat_cos`` (all unweighted except ``loss``).
    """
    if ml not in ML_MODES:
        raise ValueError(f"ml must be one of {ML_MODES}, got {ml!r}")
    terms = {f"ce/{b}": F.cross_entropy(z, target, label_smoothing=label_smoothing) for b, z in output.logits.items()}
    ce = torch.stack(list(terms.values())).sum()
    kl = dml_kl_loss(output.logits, temperature)
    ent = entropy_gap_loss(output.logits, temperature)
    feat = feature_similarity_loss(output.projections)
    loss = ce
    if ml in ("prob", "both"):
        loss = loss + warmup * lambda_prob * (kl + entropy_weight * ent)
    if ml in ("feat", "both"):
        loss = loss + warmup * lambda_feat * feat
    return {"loss": loss, "ce": ce, **terms, "prob_kl": kl, "entropy_gap": ent, "feat_cos": feat}
