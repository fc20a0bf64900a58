"""No constructor option is accepted and silently ignored (issue 12, section 4).

For every model class and every constructor option: two seeded Lightning fits of two optimiser
steps on the same tiny synthetic scene, one with the class's (tiny) defaults and one with the option
changed, must end with different weights (or a different number of steps per epoch), or the
changed value must be refused with a one-line error. Options that cannot change a training step are
listed in EXEMPT with the reason; an argument that is neither exercised nor listed fails
``test_every_constructor_argument_is_exercised_or_listed``, so a new option cannot slip through.

The optimiser and schedule options (OPTIMISER_OPTIONS) live in ``FusionTask.configure_optimizers``
only: they are exercised on TwoBranchCNN, and a test checks that no model overrides that method.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from rsfusion.datamodules import SyntheticDataModule
from rsfusion.datamodules.errors import InputError
from rsfusion.lightning_modules import BDGF, DAS2F, BDGFPretrain, M3amba, TwoBranchCNN
from rsfusion.lightning_modules.base import FusionClassifier, FusionTask

TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                 patch_size=8, projection_dim=8)
TINY_DDPM = dict(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[], stem_channels=4,
                 norm_groups=4, dropout=0.0, num_timesteps=50, mask_window=2)
SCENE = dict(scene_height=24, scene_width=24, train_per_class=4, batch_size=8)
# scan_backend selects the selective-scan kernel; values that cannot run on this machine are refused.
SCAN_BACKEND_CASES = [("scan_backend", "gpu", {}, ("refused", r"scan_backend must be one of \('auto', 'cuda', "
                                                             r"'triton', 'torch'\), got 'gpu'"))]
if not torch.cuda.is_available():
    SCAN_BACKEND_CASES.append(("scan_backend", "cuda", {}, ("refused", r"scan_backend 'cuda' \(mamba-ssm's kernel\) "
                                                                       r"needs a CUDA device")))
    if os.environ.get("TRITON_INTERPRET") != "1":
        SCAN_BACKEND_CASES.append(("scan_backend", "triton", {}, ("refused", r"scan_backend 'triton' needs a CUDA "
                                                                             r"device .*TRITON_INTERPRET=1")))


@dataclass
class Family:
    cls: type
    data: dict[str, Any]
    base: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "TwoBranchCNN": Family(TwoBranchCNN, dict(kind="hsi_dsm", patch_size=5), dict(width=4)),
    "M3amba": Family(M3amba, dict(kind="hsi_dsm", sampling="tile", patch_size=8, train_stride=8),
                     dict(dims=8, depth=1, d_state=2, ssm_ratio=1.0, drop_path_rate=0.0, clip_config=TINY_CLIP)),
    "DAS2F": Family(DAS2F, dict(kind="ms_pan", patch_size=8),
                    dict(variant="smallxian", d_model=16, d_state=4, dt_rank=4, head_hidden=16)),
    "BDGF": Family(BDGF, dict(kind="hsi_sar", patch_size=5),
                   dict(ddpm=TINY_DDPM, feature_levels=[0, 1], guide_levels={"cnn": 0, "mamba": 1, "transformer": 1},
                        feature_timesteps=[5], feature_tile=8, feature_overlap=4, pretrain_steps=2,
                        pretrain_batch_size=2, pretrain_tile=8, pretrain_lr=1e-2, pretrain_ema_decay=0.0,
                        dim=8, proj_dim=8, mamba_kwargs={"d_state": 2}, transformer_kwargs={"heads": 2})),
    # the unlabelled tiles are a DataModule option since issue 13 (they were BDGFPretrain's tile/tiles_per_epoch)
    "BDGFPretrain": Family(BDGFPretrain, dict(kind="hsi_sar", patch_size=8, allow_even_patch=True,
                                              pretrain_tiles={"tile": 8, "per_epoch": 16}),
                           dict(ddpm=TINY_DDPM)),
}

# Filled in by the session fixture `files` (paths that only exist at run time).
FILE = "<file:{}>"

# family -> [(option, changed value, extra base options for both runs, expected)]; expected is
# "changes", ("refused", regex of the one-line error) or ("xfail", why).
CASES: dict[str, list[tuple[str, Any, dict, Any]]] = {
    "TwoBranchCNN": [
        ("use_modalities", ["hsi"], {}, "changes"),
        ("width", 6, {}, "changes"),
        ("dropout", 0.6, {}, "changes"),
        ("lr", 1e-2, {}, "changes"),
        ("optimizer", "adam", {}, "changes"),
        ("optimizer", "sgd", {}, "changes"),
        ("scheduler", "none", {}, "changes"),
        ("scheduler", "step_decay", {}, "changes"),
        ("warmup_steps", 2, {}, "changes"),
        ("step_decay_gamma", 0.5, {"scheduler": "step_decay"}, "changes"),
    ],
    "M3amba": [
        ("hsi", "dsm", {"aux": "hsi"}, "changes"),
        ("aux", "hsi", {}, "changes"),
        ("dims", 12, {}, "changes"),
        ("depth", 2, {}, "changes"),
        ("d_state", 3, {}, "changes"),
        ("ssm_ratio", 2.0, {}, "changes"),
        ("mlp_ratio", 2.0, {}, "changes"),
        # stochastic depth rises linearly from 0 at the first step (VMamba's rule): depth 1 has none
        ("drop_path_rate", 0.5, {"depth": 2}, "changes"),
        ("clip_config", {**TINY_CLIP, "hidden_size": 24}, {}, "changes"),
        ("clip_model", FILE.format("clip_b"), {"clip_config": None, "clip_model": FILE.format("clip_a")}, "changes"),
        ("clip_model", FILE.format("clip_b"), {}, ("refused", r"clip_model .*clip_config.*not both")),
        ("exchange", "C", {}, "changes"),
        ("exchange", "none", {}, "changes"),
        ("avg_A", False, {}, "changes"),
        ("shared_stream_weights", False, {}, "changes"),
        ("clip_normalize", True, {}, "changes"),
        ("linear_embed_trainable", False, {}, "changes"),
        ("ce_weights", (0.6, 0.2, 0.2), {}, "changes"),
        ("supervised_weight", 2.0, {}, "changes"),
        ("consistency_weight", 1.0, {}, "changes"),
        *SCAN_BACKEND_CASES,
    ],
    "DAS2F": [
        ("variant", "nanjing", {}, "changes"),
        ("stages", 2, {}, "changes"),
        ("ms", "nowhere", {}, ("refused", r"modalities \['nowhere'\] not in the data")),
        ("pan", "nowhere", {}, ("refused", r"modalities \['nowhere'\] not in the data")),
        ("d_model", 32, {}, "changes"),
        ("d_state", 8, {}, "changes"),
        ("dt_rank", 2, {}, "changes"),
        ("mlp_ratio", 2, {}, "changes"),
        ("head_hidden", 32, {}, "changes"),
        ("cross_swap", False, {}, "changes"),
        ("dominant_features", False, {}, "changes"),
        ("fusion", "concat", {}, "changes"),
        *SCAN_BACKEND_CASES,
    ],
    "BDGF": [
        ("ddpm_checkpoint", FILE.format("ddpm"), {}, "changes"),
        ("feature_bank", FILE.format("bank"), {}, "changes"),
        ("feature_bank_split", [2, 3], {"feature_bank": FILE.format("bank")}, "changes"),
        ("ddpm_checkpoint", FILE.format("ddpm"), {"feature_bank": FILE.format("bank")},
         ("refused", "give ddpm_checkpoint or feature_bank, not both")),
        ("ddpm", {**TINY_DDPM, "base_channels": 4}, {}, "changes"),
        ("pretrain_steps", 3, {}, "changes"),
        ("pretrain_batch_size", 3, {}, "changes"),
        ("pretrain_lr", 1e-3, {}, "changes"),
        ("pretrain_tile", 16, {}, "changes"),
        ("pretrain_ema_decay", 0.5, {}, "changes"),
        ("pretrain_grad_clip", 1e-3, {}, "changes"),
        ("pretrain_seed", 1, {}, "changes"),
        ("feature_timesteps", [20], {}, "changes"),
        # the decoder levels extracted into the bank; guide_levels picks among them, and a level no
        # branch reads is refused (it would only cost extraction time)
        ("feature_levels", [0], {}, ("refused", r"guide_levels \{'mamba': 1, 'transformer': 1\} must be among "
                                               r"feature_levels \[0\]")),
        ("feature_levels", [0, 1], {"guide_levels": {"cnn": 0, "mamba": 0, "transformer": 0}},
         ("refused", r"feature_levels \[1\] would be extracted and cached but no branch reads them")),
        ("feature_tile", 16, {}, "changes"),
        ("feature_overlap", 0, {}, "changes"),
        ("feature_seed", 1, {}, "changes"),
        ("timestep_reduction", "concat", {"feature_timesteps": [5, 20]}, "changes"),
        ("guide_levels", {}, {}, "changes"),
        ("branches", ["cnn", "mamba"], {}, "changes"),
        ("dim", 12, {}, "changes"),
        ("proj_dim", 4, {}, "changes"),
        ("cnn_kwargs", {"num_blocks": 2}, {}, "changes"),
        ("mamba_kwargs", {"d_state": 3}, {}, "changes"),
        ("mamba_kwargs", {"d_state": 2, "scan_backend": "gpu"}, {}, ("refused", r"scan_backend must be one of")),
        ("transformer_kwargs", {"heads": 4}, {}, "changes"),
        ("ml", "none", {}, "changes"),
        ("temperature", 4.0, {}, "changes"),
        ("lambda_prob", 3.0, {}, "changes"),
        ("lambda_feat", 3.0, {}, "changes"),
        ("entropy_weight", 1.0, {}, "changes"),
        ("warmup_fraction", 0.0, {}, "changes"),
    ],
    "BDGFPretrain": [
        ("ddpm", {**TINY_DDPM, "base_channels": 4}, {}, "changes"),
        # below the EMA warm-up min(decay, (1 + n) / (10 + n)) of the first updates
        ("ema_decay", 0.05, {}, "changes"),
    ],
}
# Options of FusionTask / FusionClassifier whose effect goes through methods each model may override (the
# loss, parameter_groups): exercised for every model that has them (BDGFPretrain, a FusionTask that trains a
# DDPM without labels, has no loss options).
PER_MODEL = [("weight_decay", 0.5), ("label_smoothing", 0.3), ("class_weights", "per-class")]
REFUSED_PER_MODEL = {
    ("BDGF", "class_weights"): r"class_weights: not supported by BDGF's loss",
}
XFAIL_PER_MODEL: dict[tuple[str, str], str] = {}
# Used only by FusionTask.configure_optimizers (which no model overrides): exercised on TwoBranchCNN.
OPTIMISER_OPTIONS = {"lr", "optimizer", "scheduler", "warmup_steps", "step_decay_gamma"}
LINKED = "linked from the DataModule by the CLI (data.{0} -> model.{0}): the data decides it, not the model section"
SCAN_BACKEND = ("which kernel computes the selective scan, not what it computes: the backends agree within kernel "
                "tolerance (tests/test_selective_scan*.py); the value reaching every scan is tested in "
                "tests/test_{m3amba,das2f}_module.py, values that cannot run here are refused above")
EXEMPT = {
    "*": {"in_channels": LINKED.format("in_channels"), "num_classes": LINKED.format("num_classes"),
          "class_names": "names for per-class metrics and maps only", "patch_size": LINKED.format("patch_size"),
          "dense": LINKED.format("dense") + "; a model that cannot use the sampling refuses it "
                   "(tests/test_m3amba_module.py::test_pixel_sampling_is_refused)"},
    "M3amba": {"compute_guidance_output": "speed only: logits and gradients equal the faithful mode "
                                          "(tests/test_m3amba_network.py)", "scan_backend": SCAN_BACKEND},
    "DAS2F": {"scan_backend": SCAN_BACKEND},
    "BDGF": {"feature_batch_size": "speed/memory only: the batch of tiles in one feature-extraction pass",
             "cache_dir": "where DDPMs and banks are cached (tests/test_bdgf_module.py: cache keys and reuse)"},
}


def _constructor_arguments(cls) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, FusionTask):
            params = inspect.signature(klass.__init__).parameters.values()
            names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names


def _per_model(family: str) -> list[tuple[str, object]]:
    return [(option, value) for option, value in PER_MODEL if option in _constructor_arguments(FAMILIES[family].cls)]


def _cases():
    for family, cases in CASES.items():
        for option, value, extra, expected in cases:
            marks = [pytest.mark.xfail(strict=True, reason=expected[1])] if expected[0] == "xfail" else []
            yield pytest.param(family, option, value, extra, expected, id=f"{family}-{option}-{value!r}"[:80],
                               marks=marks)
    for family in FAMILIES:
        for option, value in _per_model(family):
            expected = "changes"
            if (family, option) in REFUSED_PER_MODEL:
                expected = ("refused", REFUSED_PER_MODEL[family, option])
            elif (family, option) in XFAIL_PER_MODEL:
                expected = ("xfail", XFAIL_PER_MODEL[family, option])
            marks = [pytest.mark.xfail(strict=True, reason=expected[1])] if expected[0] == "xfail" else []
            yield pytest.param(family, option, value, {}, expected, id=f"{family}-{option}", marks=marks)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """The scenes' root, a BDGF cache, a DDPM checkpoint, a feature bank and two tiny CLIP towers."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from rsfusion.lightning_modules.bdgf import pretrain_ddpm

    root = tmp_path_factory.mktemp("options")
    paths = {"root": root / "scenes", "cache": root / "bdgf_cache"}
    dm = _datamodule(paths["root"], FAMILIES["BDGF"].data)
    dm.load()
    pad = dm.scene.pad
    scene = {n: dm.scene.data[n][:, pad:-pad, pad:-pad] for n in dm.in_channels}
    paths["ddpm"] = root / "ddpm.pt"
    torch.save(pretrain_ddpm(scene, TINY_DDPM, steps=2, batch_size=2, tile=8, lr=1e-2, ema_decay=0.0, seed=7),
               paths["ddpm"])
    paths["bank"] = root / "bank.npy"
    np.save(paths["bank"], np.random.default_rng(0).standard_normal((5, 24, 24)).astype(np.float32))
    for name, seed in (("clip_a", 0), ("clip_b", 1)):
        torch.manual_seed(seed)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _resolve(value, files):
    if isinstance(value, str) and value.startswith("<file:"):
        return str(files[value[len("<file:"):-1]])
    if isinstance(value, dict):
        return {k: _resolve(v, files) for k, v in value.items()}
    return value


def _datamodule(root, data):
    return SyntheticDataModule(root=str(root), **SCENE, **data)


def _build(family: str, options: dict, files) -> tuple[FusionClassifier, SyntheticDataModule]:
    spec = FAMILIES[family]
    dm = _datamodule(files["root"], spec.data)
    linked = dict(in_channels=dm.in_channels, num_classes=dm.num_classes, class_names=dm.class_names,
                  patch_size=dm.patch_size, dense=dm.dense)
    if family.startswith("BDGF") and family != "BDGFPretrain":
        linked["cache_dir"] = str(files["cache"])
    options = {**linked, **spec.base, **_resolve(options, files)}
    if options.get("class_weights") == "per-class":
        options["class_weights"] = [0.25 + k for k in range(dm.num_classes)]
    return spec.cls(**options), dm


def _fit(family: str, options: dict, files) -> dict[str, torch.Tensor]:
    """Two seeded optimiser steps; the final weights, buffers and steps per epoch."""
    L.seed_everything(0, verbose=False)
    model, dm = _build(family, options, files)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_train_batches=2, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True)
    trainer.fit(model, dm)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    state["<steps per epoch>"] = torch.tensor(trainer.num_training_batches)
    return state


def _differs(a: dict, b: dict) -> bool:
    return a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


_baselines: dict = {}


def _baseline(family, extra, files):
    key = (family, repr(sorted(extra.items())))
    if key not in _baselines:
        _baselines[key] = _fit(family, extra, files)
    return _baselines[key]


@pytest.mark.parametrize("family, option, value, extra, expected", list(_cases()))
def test_option_changes_training_or_is_refused(family, option, value, extra, expected, files):
    if expected != "changes" and expected[0] == "refused":
        with pytest.raises((InputError, ValueError), match=expected[1]) as err:
            _fit(family, {**extra, option: value}, files)
        assert "\n" not in str(err.value)
        return
    default = _baseline(family, extra, files)
    changed = _fit(family, {**extra, option: value}, files)
    assert _differs(default, changed), f"{family}({option}={value!r}) trains exactly as the default: ignored"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_same_options_train_the_same(family, files):
    """Without this, 'differs' above could be nondeterminism."""
    assert not _differs(_fit(family, {}, files), _fit(family, {}, files))


def test_no_model_overrides_the_optimiser_setup():
    for spec in FAMILIES.values():
        assert spec.cls.configure_optimizers is FusionTask.configure_optimizers, spec.cls.__name__


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_constructor_argument_is_exercised_or_listed(family):
    exercised = {option for option, *_ in CASES[family]} | {option for option, _ in _per_model(family)}
    exercised |= OPTIMISER_OPTIONS
    listed = set(EXEMPT["*"]) | set(EXEMPT.get(family, {}))
    unknown = _constructor_arguments(FAMILIES[family].cls) - exercised - listed
    assert not unknown, (f"{family}: constructor arguments {sorted(unknown)} are neither exercised by "
                         "test_option_changes_training_or_is_refused nor listed in EXEMPT with a reason")
    stale = (exercised | listed) - _constructor_arguments(FAMILIES[family].cls)
    assert not stale, f"{family}: {sorted(stale)} are no longer constructor arguments"
