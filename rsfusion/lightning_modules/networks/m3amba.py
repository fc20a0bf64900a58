"""M3amba: CLIP-driven Mamba for multi-modal remote-sensing classification (Cao et al., arXiv 2503.06446).

Re-implementation of the authors' released network (github kaka-Cao/M3amba @ b7d10e5), dense
prediction on square tiles (32 x 32 in the paper's setup):

* Stage 1, CLIP guidance: per modality a 1x1 "linear embedding" C -> 3, bicubic resize to the CLIP
  input size, the frozen CLIP image tower (projected CLS embedding), an adapter
  Linear(512 -> S*S) -> (B,1,S,S) -> Conv1x1(1 -> C) -> patch embed (Conv1x1(C -> dims) + LN); the two
  adapted maps are summed into the guidance tokens z0.
* Stage 2, Mamba fusion: HSI and auxiliary (LiDAR / SAR) tokens x, y from 1x1 patch embeddings; at
  each of ``depth`` steps x <- CrossVSS_x(x, z), y <- CrossVSS_y(y, z), z <- VSS(x + y).
* Heads: LayerNorm + Conv1x1(dims -> K) on x, y and z.

Tokens are channel-last (B, H, W, C) inside the stacks, like VMamba. The training recipe lives with
the task: :func:`rsfusion.lightning_modules.losses.m3amba_loss` and
:func:`rsfusion.lightning_modules.optim.no_weight_decay_groups`.
"""

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hub_constants
from transformers import CLIPVisionModelWithProjection
from transformers.utils import cached_file

from rsfusion.lightning_modules.networks.layers import DropPath, Mlp, check_scan_backend
from rsfusion.lightning_modules.networks.ss2d import (
    SS2D,
    DirectionalSSM,
    VSSBlock,
    resolve_dt_rank,
    vmamba_init_weights,
)

log = logging.getLogger(__name__)

EXCHANGES = ("B", "C", "none")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CrossSS2D(nn.Module):
    """M3amba's Cross-SS2D: one SS2D body run on a modality stream p and the guidance stream q.

    The body (in_proj, depthwise conv, out_norm, out_proj) is shared by both streams (authors' code;
    ``shared_stream_weights=False`` gives q its own body). Each stream has its own
    :class:`DirectionalSSM` (x_proj, dt_proj, A_logs, Ds). In the scans, A is the mean of both
    streams' A (``avg_A``) and the streams swap their B (``exchange="B"``): stream p scans its own
    u, delta and C with the B computed from q, and vice versa.

    Args:
        d_model, d_state, ssm_ratio, dt_rank, d_conv, conv_bias, dropout: as :class:`SS2D`.
        exchange: "B" (authors), "C" (ablation: swap C instead) or "none" (no exchange).
        avg_A: average the two streams' A (authors: True); False = each its own A.
        shared_stream_weights: share the SS2D body between the streams (authors: True).
        scan_backend: selective-scan backend of both streams' scans (see :class:`DirectionalSSM`).

    ``forward(p, q, compute_guidance_output)`` takes (B, H, W, C) tensors and returns
    (out_p, out_q). With ``compute_guidance_output=False`` only what out_p needs is computed from q
    (the u-half of in_proj, the conv and the B rows of q's x_proj) and out_q is None.
    """

    def __init__(self, d_model, d_state=16, ssm_ratio=2.0, dt_rank="auto", d_conv=3,
                 conv_bias=True, dropout=0.0, exchange="B", avg_A=True,
                 shared_stream_weights=True, scan_backend="auto"):
        super().__init__()
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        self.exchange, self.avg_A = exchange, avg_A
        self.op = SS2D(d_model, d_state, ssm_ratio, dt_rank, d_conv, conv_bias, dropout, scan_backend=scan_backend)
        if shared_stream_weights:
            self.op_guide = None
            self.ssm_guide = DirectionalSSM(self.op.d_inner, d_state, resolve_dt_rank(dt_rank, d_model),
                                            scan_backend=scan_backend)
        else:
            self.op_guide = SS2D(d_model, d_state, ssm_ratio, dt_rank, d_conv, conv_bias, dropout,
                                 scan_backend=scan_backend)

    @property
    def guide_body(self):
        return self.op if self.op_guide is None else self.op_guide

    @property
    def guide_ssm(self):
        return self.ssm_guide if self.op_guide is None else self.op_guide.ssm

    def forward(self, p, q, compute_guidance_output=True):
        ssm_p, ssm_q = self.op.ssm, self.guide_ssm
        A_p, A_q = ssm_p.A(), ssm_q.A()
        A_mean = (A_p + A_q) / 2 if self.avg_A else None
        xs_p, gate_p = self.op.scan_input(p)
        dts_p, B_p, C_p = ssm_p.project(xs_p)

        B_q = C_q = None
        if compute_guidance_output:
            xs_q, gate_q = self.guide_body.scan_input(q)
            dts_q, B_q, C_q = ssm_q.project(xs_q)
        elif self.exchange != "none":
            xs_q, _ = self.guide_body.scan_input(q, with_gate=False)
            if self.exchange == "B":
                B_q = ssm_q.project_B(xs_q)
            else:
                C_q = ssm_q.project_C(xs_q)

        ys_p = ssm_p.scan(xs_p, dts_p,
                          B_q if self.exchange == "B" else B_p,
                          C_q if self.exchange == "C" else C_p,
                          A_mean if self.avg_A else A_p)
        out_p = self.op.merge_output(ys_p, gate_p)
        if not compute_guidance_output:
            return out_p, None
        ys_q = ssm_q.scan(xs_q, dts_q,
                          B_p if self.exchange == "B" else B_q,
                          C_p if self.exchange == "C" else C_q,
                          A_mean if self.avg_A else A_q)
        return out_p, self.guide_body.merge_output(ys_q, gate_q)


class CrossVSSBlock(nn.Module):
    """The authors' two-input VSS block around :class:`CrossSS2D`, pre-norm, channel-last:

        p <- p + DropPath(CrossSS2D(LN(p), LN(q))_p);  p <- p + DropPath(MLP(LN2(p)))   (same for q)

    LN, LN2 and the MLP are shared by both streams when ``shared_stream_weights`` (authors).
    Parameter count for C = 384 with M3amba's settings: 2,679,168.
    ``forward(p, q, compute_guidance_output=True) -> (p_out, q_out or None)``, all (B, H, W, C).
    """

    def __init__(self, hidden_dim, drop_path=0.0, d_state=16, ssm_ratio=2.0, dt_rank="auto",
                 d_conv=3, conv_bias=True, ssm_dropout=0.0, mlp_ratio=4.0, mlp_drop=0.0,
                 exchange="B", avg_A=True, shared_stream_weights=True, scan_backend="auto"):
        super().__init__()
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.norm = nn.LayerNorm(hidden_dim)
        self.op = CrossSS2D(hidden_dim, d_state, ssm_ratio, dt_rank, d_conv, conv_bias,
                            ssm_dropout, exchange, avg_A, shared_stream_weights, scan_backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), mlp_drop)
        if shared_stream_weights:
            self.norm_guide = self.norm2_guide = self.mlp_guide = None
        else:
            self.norm_guide = nn.LayerNorm(hidden_dim)
            self.norm2_guide = nn.LayerNorm(hidden_dim)
            self.mlp_guide = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), mlp_drop)
        self.apply(vmamba_init_weights)

    def guidance_modules(self):
        """(norm, norm2, mlp) applied to the guidance stream: the shared ones, or its own."""
        if self.mlp_guide is None:
            return self.norm, self.norm2, self.mlp
        return self.norm_guide, self.norm2_guide, self.mlp_guide

    def forward(self, p, q, compute_guidance_output=True):
        norm_q, norm2_q, mlp_q = self.guidance_modules()
        out_p, out_q = self.op(self.norm(p), norm_q(q), compute_guidance_output)
        p = p + self.drop_path(out_p)
        p = p + self.drop_path(self.mlp(self.norm2(p)))
        if out_q is None:
            return p, None
        q = q + self.drop_path(out_q)
        q = q + self.drop_path(mlp_q(norm2_q(q)))
        return p, q


class PatchEmbed(nn.Module):
    """Conv(C -> dims, k = s = 1) + LayerNorm: (B, C, H, W) -> channel-last tokens (B, H, W, dims)."""

    def __init__(self, in_channels, dims):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dims, kernel_size=1)
        self.norm = nn.LayerNorm(dims)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ClipAdapter(nn.Module):
    """The authors' "Adapter": a global CLIP embedding (B, E) -> guidance tokens (B, S, S, dims).

    Linear(E -> S*S) reshaped to (B, 1, S, S), Conv1x1(1 -> C), then :class:`PatchEmbed`(C -> dims).
    No activation, bottleneck or residual (as the authors' code; the two 1x1 convs are kept although
    they compose to one affine map, so the parameter count matches).
    """

    def __init__(self, embed_dim, image_size, in_channels, dims):
        super().__init__()
        self.image_size = image_size
        self.linear = nn.Linear(embed_dim, image_size * image_size)
        self.conv = nn.Conv2d(1, in_channels, kernel_size=1)
        self.patch_embed = PatchEmbed(in_channels, dims)

    def forward(self, embedding):
        spatial = self.linear(embedding).view(-1, 1, self.image_size, self.image_size)
        return self.patch_embed(self.conv(spatial))


class ClassifierHead(nn.Module):
    """LayerNorm + Conv1x1(dims -> K): tokens (B, H, W, dims) -> logits (B, K, H, W)."""

    def __init__(self, dims, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(dims)
        self.conv = nn.Conv2d(dims, num_classes, kernel_size=1)

    def forward(self, x):
        return self.conv(self.norm(x).permute(0, 3, 1, 2))


def load_clip_vision_tower(clip_model="openai/clip-vit-base-patch32", clip_config=None):
    """The CLIP image tower (``transformers.CLIPVisionModelWithProjection``).

    ``clip_config`` (a ``CLIPVisionConfig``) builds a randomly initialised tower (tests, meta-device
    counting). Otherwise ``clip_model`` is a local directory, or a hub name: read from the Hugging Face
    cache (``HF_HOME``), and on first use fetched into it when the machine is online (not under
    ``HF_HUB_OFFLINE=1``), the download logged with its size and revision.
    """
    if clip_config is not None:
        return CLIPVisionModelWithProjection(clip_config)
    with contextlib.suppress(OSError):  # not in the cache (or not a directory): fetched below, or refused
        return CLIPVisionModelWithProjection.from_pretrained(clip_model, local_files_only=True)
    if not _is_hub_name(clip_model) or _hub_offline():
        why = "and HF_HUB_OFFLINE is set" if _is_hub_name(clip_model) else "(not a hub name: a missing directory)"
        raise FileNotFoundError(
            f"CLIP weights {clip_model!r} not found locally {why}: pass clip_model=<directory written by "
            f"save_pretrained>, or fill the Hugging Face cache beforehand "
            f"(`huggingface-cli download openai/clip-vit-base-patch32`), or pass clip_config= "
            f"for a randomly initialised tower") from None
    fetch_from_hub(clip_model)
    return CLIPVisionModelWithProjection.from_pretrained(clip_model, local_files_only=True)


def _is_hub_name(name: str) -> bool:
    """``org/name`` (or ``name``), not a filesystem path."""
    return not Path(name).expanduser().is_absolute() and not name.startswith((".", "~")) and name.count("/") <= 1


def _hub_offline() -> bool:
    return hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def fetch_from_hub(repo: str) -> None:
    """Download a tower's config and weights file into the Hugging Face cache, logging what, how big and where."""
    try:
        info = HfApi().model_info(repo, files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        weights = next((name for name in WEIGHT_FILES if name in sizes), None)
        if weights is None:
            raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in the repository")
        log.info("CLIP weights %s (revision %s): downloading config.json and %s (%.1f MiB) into %s", repo, info.sha,
                 weights, (sizes[weights] or 0) / 2 ** 20, hub_constants.HF_HUB_CACHE)
        for name in ("config.json", weights):
            hf_hub_download(repo, name, revision=info.sha)
    except Exception as err:  # noqa: BLE001 - connection, HTTP, repository and file errors of the hub client
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise FileNotFoundError(f"CLIP weights {repo!r}: not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) "
                                f"and the hub download failed ({type(err).__name__}: {first}); set HF_HUB_OFFLINE=1 "
                                "and fill the cache by hand, or pass clip_model=<local directory>") from None


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def clip_weights_source(clip_model: str) -> dict | None:
    """Where a pretrained tower's weights come from: ``{"source", "file", "revision", "sha256"}`` (the
    local weights file ``from_pretrained`` reads, its hub revision if any, its SHA-256), or None when no
    single weights file can be found (e.g. sharded weights)."""
    for name in WEIGHT_FILES:
        path = cached_file(clip_model, name, local_files_only=True, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path is not None:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
            revision = Path(path).parent.name if "snapshots" in Path(path).parts else None
            return {"source": clip_model, "file": name, "revision": revision, "sha256": digest.hexdigest()}
    return None


class M3ambaNet(nn.Module):
    """M3amba (CLIP-driven Mamba) for dense multi-modal classification of square tiles.

    Args (authors' values from their VSSM / test.py; [ours] marks rsfusion defaults):
        hsi_channels: HSI bands C_h (Houston2013 144, MUUFL 64, Augsburg 180).
        aux_channels: bands of the second modality C_a (LiDAR 1, MUUFL LiDAR 2, Augsburg SAR 4).
        num_classes: K (15, 11, 7).
        dims: token width (384).
        depth: number of fusion steps, each 2 Cross-VSS blocks + 1 VSS block (9).
        d_state, ssm_ratio, dt_rank, d_conv: SS2D settings (16, 2.0, "auto" = ceil(dims/16), 3).
        mlp_ratio: MLP width of every block (4.0).
        drop_path_rate: stochastic depth, linear from 0 to this over the steps (0.1).
        image_size: tile side S; inputs must be (B, C, S, S) (32).
        clip_model: local directory or cached hub name of the CLIP image tower
            ("openai/clip-vit-base-patch32"; the authors load OpenAI's ViT-B-32.pt, same weights).
        clip_config: a ``CLIPVisionConfig`` to build a random tower instead (tests); None = load.
        exchange: what Cross-SS2D swaps between stream and guidance: "B" (authors), "C", "none".
        avg_A: average A over the two streams of a Cross-SS2D (authors: True).
        compute_guidance_output: True = faithful mode, each Cross block also computes the guidance
            stream's output and discards it, as the authors' code does; False [ours, default]
            computes only what the kept outputs need (identical logits, ~40 % fewer FLOPs).
        shared_stream_weights: Cross blocks share norms, SS2D body and MLP between stream and
            guidance (authors: True).
        clip_normalize: apply CLIP's mean/std to the resized input (authors: False).
        linear_embed_trainable: train the C -> 3 linear embeddings by back-propagating through the
            frozen CLIP [ours: True; the authors' training code is unavailable, their checkpoint
            stores these convs]. False freezes them and runs CLIP under no_grad.
        scan_backend: ``backend`` of every selective scan ("auto" [default: RSFUSION_SCAN_BACKEND if
            set, else the fastest that runs], "torch", "triton", "cuda"; checked at construction).

    ``forward(hsi (B, C_h, S, S), aux (B, C_a, S, S))`` returns the logits
    ``(hsi_logits, aux_logits, fused_logits)``, each (B, K, S, S); the authors predict from the
    last one. ``forward_features`` returns the three channel-last token maps (B, S, S, dims) before
    the heads, ``forward_head`` maps them to logits.
    """

    def __init__(self, hsi_channels=144, aux_channels=1, num_classes=15, dims=384, depth=9,
                 d_state=16, ssm_ratio=2.0, dt_rank="auto", d_conv=3, mlp_ratio=4.0,
                 drop_path_rate=0.1, image_size=32, clip_model="openai/clip-vit-base-patch32",
                 clip_config=None, exchange="B", avg_A=True, compute_guidance_output=False,
                 shared_stream_weights=True, clip_normalize=False, linear_embed_trainable=True,
                 scan_backend="auto"):
        super().__init__()
        check_scan_backend(scan_backend)
        for name, value in (("hsi_channels", hsi_channels), ("aux_channels", aux_channels),
                            ("num_classes", num_classes), ("dims", dims), ("depth", depth),
                            ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.image_size = image_size
        self.compute_guidance_output = compute_guidance_output
        self.clip_normalize = clip_normalize
        self.linear_embed_trainable = linear_embed_trainable

        self.linear_embed_hsi = nn.Conv2d(hsi_channels, 3, kernel_size=1)
        self.linear_embed_aux = nn.Conv2d(aux_channels, 3, kernel_size=1)
        self.clip = load_clip_vision_tower(clip_model, clip_config)
        self.clip.requires_grad_(False)
        self.clip.eval()
        if not linear_embed_trainable:
            self.linear_embed_hsi.requires_grad_(False)
            self.linear_embed_aux.requires_grad_(False)
        self.clip_input_size = self.clip.config.image_size
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

        clip_dim = self.clip.config.projection_dim
        self.adapter_hsi = ClipAdapter(clip_dim, image_size, hsi_channels, dims)
        self.adapter_aux = ClipAdapter(clip_dim, image_size, aux_channels, dims)
        self.patch_embed_hsi = PatchEmbed(hsi_channels, dims)
        self.patch_embed_aux = PatchEmbed(aux_channels, dims)

        ssm = dict(d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv,
                   mlp_ratio=mlp_ratio, scan_backend=scan_backend)
        cross = dict(ssm, exchange=exchange, avg_A=avg_A, shared_stream_weights=shared_stream_weights)
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.layers_hsi = nn.ModuleList(CrossVSSBlock(dims, rate, **cross) for rate in rates)
        self.layers_aux = nn.ModuleList(CrossVSSBlock(dims, rate, **cross) for rate in rates)
        self.layers_fused = nn.ModuleList(VSSBlock(dims, rate, **ssm) for rate in rates)

        self.head_hsi = ClassifierHead(dims, num_classes)
        self.head_aux = ClassifierHead(dims, num_classes)
        self.head_fused = ClassifierHead(dims, num_classes)
        for name, child in self.named_children():
            if name != "clip":  # never re-initialise the pretrained tower
                child.apply(vmamba_init_weights)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen: always in inference mode
        return self

    def encode_clip(self, rgb):
        """A 3-channel tile (B, 3, S, S) -> bicubic resize to CLIP's input size -> CLIP -> (B, E)."""
        rgb = F.interpolate(rgb, size=(self.clip_input_size, self.clip_input_size),
                            mode="bicubic", align_corners=False)
        if self.clip_normalize:
            rgb = (rgb - self.clip_mean) / self.clip_std
        return self.clip(pixel_values=rgb).image_embeds

    def clip_guidance(self, hsi, aux):
        """The initial guidance tokens z0 (B, S, S, dims) = adapted CLIP(hsi) + adapted CLIP(aux)."""
        with torch.set_grad_enabled(self.linear_embed_trainable and torch.is_grad_enabled()):
            emb_hsi = self.encode_clip(self.linear_embed_hsi(hsi))
            emb_aux = self.encode_clip(self.linear_embed_aux(aux))
        return self.adapter_hsi(emb_hsi) + self.adapter_aux(emb_aux)

    def _check_inputs(self, hsi, aux):
        expected = (self.linear_embed_hsi.in_channels, self.linear_embed_aux.in_channels)
        for name, x, channels in (("hsi", hsi, expected[0]), ("aux", aux, expected[1])):
            if x.dim() != 4 or x.shape[1] != channels or x.shape[2:] != (self.image_size,) * 2:
                raise ValueError(f"{name} must be (B, {channels}, {self.image_size}, "
                                 f"{self.image_size}), got {tuple(x.shape)}")
        if hsi.shape[0] != aux.shape[0]:
            raise ValueError(f"hsi and aux batch sizes differ: {hsi.shape[0]} vs {aux.shape[0]}")

    def forward_features(self, hsi, aux):
        """-> channel-last token maps (x_hsi, y_aux, z_fused), each (B, S, S, dims)."""
        self._check_inputs(hsi, aux)
        z = self.clip_guidance(hsi, aux)
        x, y = self.patch_embed_hsi(hsi), self.patch_embed_aux(aux)
        for block_x, block_y, block_z in zip(self.layers_hsi, self.layers_aux, self.layers_fused):
            # The guidance stream's own update is discarded (authors); z is rebuilt from x + y.
            x, _ = block_x(x, z, self.compute_guidance_output)
            y, _ = block_y(y, z, self.compute_guidance_output)
            z = block_z(x + y)
        return x, y, z

    def forward_head(self, features):
        """(x, y, z) token maps -> (hsi_logits, aux_logits, fused_logits), each (B, K, S, S)."""
        x, y, z = features
        return self.head_hsi(x), self.head_aux(y), self.head_fused(z)

    def forward(self, hsi, aux):
        return self.forward_head(self.forward_features(hsi, aux))
