"""Training losses of the suite's tasks (the networks in ``networks/`` only compute outputs)."""
import torch.nn.functional as F

__all__ = ["m3amba_loss"]


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
