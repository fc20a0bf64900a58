"""The tasks' losses (rsfusion/lightning_modules/losses.py): M3amba's masked CE of three heads + cosine consistency."""
import torch
import torch.nn.functional as F

from rsfusion.lightning_modules.losses import m3amba_loss


def _loss_inputs():
    generator = torch.Generator().manual_seed(3)
    outputs = tuple(torch.randn(2, 4, 5, 5, generator=generator) for _ in range(3))
    target = torch.randint(0, 4, (2, 5, 5), generator=generator)
    target[0, :2] = -1
    target[1, :, 3:] = -1
    return outputs, target


def test_masked_loss_ignores_unlabelled_pixels():
    outputs, target = _loss_inputs()
    unlabelled = target == -1
    loss = m3amba_loss(outputs, target)
    expected_ce = F.cross_entropy(outputs[2], target, ignore_index=-1)
    torch.testing.assert_close(loss["ce_fused"], expected_ce)
    changed_logits = tuple(torch.where(unlabelled[:, None], o * 7 - 3, o) for o in outputs)
    changed = m3amba_loss(changed_logits, target)
    for key in ("ce_hsi", "ce_aux", "ce_fused"):
        torch.testing.assert_close(changed[key], loss[key])
    mask = (~unlabelled).float()
    loader_style = torch.where(unlabelled, torch.zeros_like(target), target)  # authors' loader
    for fill in (0, 3):
        relabelled = torch.where(unlabelled, torch.full_like(target, fill), loader_style)
        torch.testing.assert_close(m3amba_loss(outputs, relabelled, mask=mask)["loss"], loss["loss"])
    sup = sum(loss[k] for k in ("ce_hsi", "ce_aux", "ce_fused")) / 3
    torch.testing.assert_close(loss["loss"], sup + 0.1 * loss["consistency"])


def test_consistency_term_is_cosine_to_the_fused_output():
    outputs, target = _loss_inputs()
    fused = outputs[2]
    assert m3amba_loss((fused, fused, fused), target)["consistency"].abs() < 1e-6
    torch.testing.assert_close(m3amba_loss((-fused, -fused, fused), target)["consistency"],
                               torch.tensor(4.0))
    no_labels = torch.full_like(target, -1)
    loss = m3amba_loss(outputs, no_labels)
    assert loss["ce_fused"] == 0 and torch.isfinite(loss["loss"])
