"""BDGF stage 3: diffusion-guided CNN / Mamba / Transformer branches (the mutual-learning losses are in
``rsfusion.lightning_modules.losses``).

BDGF (Liu et al., arXiv 2509.23310). From the paper's abstract [P]: diffusion features
hierarchically guide three feature extractors -- CNN, Mamba and Transformer -- through feature
fusion, group channel attention and cross-attention, and the sub-networks learn mutually by
aligning their probability entropy and their feature similarity. Everything else is a
reconstruction [R] or an rsfusion default [D] from docs/models/bdgf.md, and every
number is a constructor/function argument:

- per-branch stem (no weight sharing): per modality Conv3x3 -> D/2 + BN + GELU, concat, Conv1x1
  -> D, D = 64 [D];
- CNN: 3 residual conv blocks, feature fusion (concat + Conv1x1 + BN + GELU + residual) with the
  shallow guide F1 after block 1 [R/D];
- Mamba: 2 pre-norm blocks LN -> SS2D -> residual on the P x P token grid, group channel
  attention (4 groups, SE-style gate from [branch || guide], gated mix, channel shuffle) with
  the middle guide F2 after block 1 [R/D]. The reconstruction's bidirectional 1-D scan over the 121
  tokens is replaced by the suite's shared SS2D (4 cross-scan directions, which include raster
  and reversed raster); SS2D's depthwise conv is 2-D, so d_conv is 3 (odd) instead of 4 [ours];
- Transformer: CLS + learnable position embedding, 2 layers of pre-LN MHSA (4 heads) + MLP
  (64 -> 128 -> 64) each followed by cross-attention (Q = branch tokens, K = V = deep guide F3
  tokens with the same position embedding) [R/D];
- heads: pooled feature z (B, D) -> Dropout 0.1 -> Linear(D -> K); projection MLP (D -> D -> D)
  for the feature-similarity loss [R/D]; prediction = mean of the branch softmaxes [D].
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsfusion.lightning_modules.networks.bdgf_diffusion import check_modality_channels
from rsfusion.lightning_modules.networks.ss2d import SS2D

__all__ = [
    "BRANCHES",
    "DEFAULT_GUIDE_LEVELS",
    "ModalityStem",
    "FeatureFusion",
    "GroupChannelAttention",
    "GuideCrossAttention",
    "CNNBranch",
    "MambaBranch",
    "TransformerBranch",
    "BDGFOutput",
    "BDGFNet",
]

BRANCHES = ("cnn", "mamba", "transformer")
# "hierarchical" guidance [R]: shallow/high-res decoder level -> CNN, middle -> Mamba, deep -> Transformer
DEFAULT_GUIDE_LEVELS = {"cnn": 0, "mamba": 1, "transformer": 2}


def _conv_bn_gelu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.GELU())


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class ModalityStem(nn.Module):
    """Per-modality Conv3x3 + BN + GELU, concatenated, Conv1x1 -> ``dim`` [D].

    forward({name: (B, C_m, P, P)}) -> (B, dim, P, P). ``modality_dim`` defaults to dim // 2.
    """

    def __init__(self, modality_channels: Mapping[str, int], dim: int = 64, modality_dim: int | None = None):
        super().__init__()
        self.modality_channels = check_modality_channels(modality_channels)
        modality_dim = dim // 2 if modality_dim is None else modality_dim
        if dim < 1 or modality_dim < 1:
            raise ValueError(f"dim and modality_dim must be >= 1, got {dim}, {modality_dim}")
        self.convs = nn.ModuleDict({n: _conv_bn_gelu(c, modality_dim, 3) for n, c in self.modality_channels.items()})
        self.mix = nn.Conv2d(modality_dim * len(self.modality_channels), dim, 1)

    def forward(self, modalities: Mapping[str, Tensor]) -> Tensor:
        missing = [n for n in self.modality_channels if n not in modalities]
        if missing:
            raise ValueError(f"modalities is missing {missing}")
        return self.mix(torch.cat([conv(modalities[n]) for n, conv in self.convs.items()], dim=1))


class FeatureFusion(nn.Module):
    """CNN guidance FF(h, g) = h + GELU(BN(Conv1x1([h || g]))) [R/D]. h, g (B, D, P, P) -> (B, D, P, P)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fuse = _conv_bn_gelu(2 * dim, dim, 1)

    def forward(self, h: Tensor, g: Tensor) -> Tensor:
        return h + self.fuse(torch.cat([h, g], dim=1))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle of (B, C, ...) with C = groups * k: channel g*k+i -> i*groups+g."""
    b, c = x.shape[:2]
    return x.reshape(b, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class GroupChannelAttention(nn.Module):
    """Mamba guidance GCA(h, g) [R/D]: per channel group, an SE-style gate from [h_g || g_g].

    h, g (B, D, P, P) are split into ``groups`` groups of D / groups channels; per group
    s = GAP([h_g || g_g]) -> Linear(2D/G -> 2D/(G*reduction)) -> GELU -> Linear(-> D/G) -> sigmoid = w;
    h_g <- h_g * w + g_g * (1 - w); groups concatenated, then channel-shuffled. Output (B, D, P, P).
    The per-group linears are grouped 1x1 convolutions.
    """

    def __init__(self, dim: int, groups: int = 4, reduction: int = 4):
        super().__init__()
        if groups < 1 or dim % groups:
            raise ValueError(f"gca_groups ({groups}) must divide dim ({dim})")
        width = dim // groups
        hidden = max(1, 2 * width // reduction)
        self.groups = groups
        self.gate = nn.Sequential(nn.Conv1d(2 * dim, hidden * groups, 1, groups=groups), nn.GELU(),
                                  nn.Conv1d(hidden * groups, dim, 1, groups=groups), nn.Sigmoid())

    def forward(self, h: Tensor, g: Tensor) -> Tensor:
        b, d = h.shape[:2]
        # interleave so that each conv group sees [h_g || g_g]
        pooled = torch.stack([h.mean(dim=(2, 3)).view(b, self.groups, -1),
                              g.mean(dim=(2, 3)).view(b, self.groups, -1)], dim=2).reshape(b, 2 * d, 1)
        w = self.gate(pooled).view(b, d, 1, 1)
        return channel_shuffle(h * w + g * (1 - w), self.groups)


class GuideCrossAttention(nn.Module):
    """Transformer guidance [R/D]: tokens <- tokens + Dropout(MHA(LN(tokens), LN(guide), LN(guide))).

    tokens (B, N, D), guide tokens (B, L, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, guide: Tensor) -> Tensor:
        kv = self.norm_kv(guide)
        out, _ = self.attn(self.norm_q(tokens), kv, kv, need_weights=False)
        return tokens + self.dropout(out)


class _Branch(nn.Module):
    """Shared plumbing: stem, optional guide projection, classification head. Subclasses define ``encode``."""

    def __init__(self, modality_channels, guide_channels, num_classes, dim, head_dropout, guide_norm):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if guide_channels is not None and guide_channels < 1:
            raise ValueError(f"guide_channels must be None or >= 1, got {guide_channels}")
        self.dim, self.guided = dim, guide_channels is not None
        self.stem = ModalityStem(modality_channels, dim)
        if self.guided:
            self.guide_proj = _conv_bn_gelu(guide_channels, dim, 1) if guide_norm else nn.Conv2d(guide_channels, dim, 1)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(dim, num_classes))

    def project_guide(self, guide: Tensor | None, like: Tensor) -> Tensor | None:
        if not self.guided:
            return None
        if guide is None:
            raise ValueError(f"{type(self).__name__} is guided: pass its guide feature patch")
        if guide.shape[0] != like.shape[0] or guide.shape[-2:] != like.shape[-2:]:
            raise ValueError(f"guide {tuple(guide.shape)} must match the patch batch/size {tuple(like.shape)}")
        return self.guide_proj(guide)

    def forward(self, modalities: Mapping[str, Tensor], guide: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (logits (B, K), pooled feature z (B, D))."""
        z = self.encode(self.stem(modalities), guide)
        return self.head(z), z


class CNNBranch(_Branch):
    """CNN branch guided by feature fusion with the shallow diffusion features F1 [R/D].

    stem -> conv blocks (3x3 conv, BN, GELU, 3x3 conv, BN, + residual, GELU); FF with
    g1 = GELU(BN(Conv1x1(f1))) after each block index in ``fusion_after`` (1-based, default
    after block 1); GAP -> z (B, D). ``guide_channels=None`` builds the unguided ablation.
    """

    def __init__(self, modality_channels: Mapping[str, int], num_classes: int, guide_channels: int | None = 64,
                 dim: int = 64, num_blocks: int = 3, fusion_after: Sequence[int] = (1,), head_dropout: float = 0.1):
        super().__init__(modality_channels, guide_channels, num_classes, dim, head_dropout, guide_norm=True)
        if num_blocks < 1 or any(not 1 <= i <= num_blocks for i in fusion_after):
            raise ValueError(f"fusion_after must hold block indices in [1, {num_blocks}], got {tuple(fusion_after)}")
        self.blocks = nn.ModuleList(
            nn.Sequential(_conv_bn_gelu(dim, dim, 3), nn.Conv2d(dim, dim, 3, padding=1, bias=False),
                          nn.BatchNorm2d(dim)) for _ in range(num_blocks))
        self.fusion_after = tuple(fusion_after)
        self.fusions = nn.ModuleDict({str(i): FeatureFusion(dim) for i in self.fusion_after} if self.guided else {})

    def encode(self, h: Tensor, guide: Tensor | None) -> Tensor:
        g = self.project_guide(guide, h)
        for i, block in enumerate(self.blocks, start=1):
            h = F.gelu(h + block(h))
            if g is not None and str(i) in self.fusions:
                h = self.fusions[str(i)](h, g)
        return h.mean(dim=(2, 3))


class MambaBranch(_Branch):
    """Mamba branch guided by group channel attention with the middle diffusion features F2 [R/D].

    stem -> tokens (B, P, P, D) -> ``num_blocks`` x [t + SS2D(LN(t))] (the suite's shared SS2D,
    ``d_state``, ``ssm_ratio``, ``d_conv``, ``scan_backend``) with GCA(t, Conv1x1(f2)) after block ``gca_after``
    -> LN -> pooling (``"mean"`` of tokens or the ``"center"`` token) -> z (B, D).
    """

    def __init__(self, modality_channels: Mapping[str, int], num_classes: int, guide_channels: int | None = 128,
                 dim: int = 64, num_blocks: int = 2, d_state: int = 16, ssm_ratio: float = 2.0, d_conv: int = 3,
                 gca_after: int = 1, gca_groups: int = 4, gca_reduction: int = 4, pooling: str = "mean",
                 head_dropout: float = 0.1, scan_backend: str = "auto"):
        super().__init__(modality_channels, guide_channels, num_classes, dim, head_dropout, guide_norm=False)
        if pooling not in ("mean", "center"):
            raise ValueError(f"pooling must be 'mean' or 'center', got {pooling!r}")
        if num_blocks < 1 or not 1 <= gca_after <= num_blocks:
            raise ValueError(f"gca_after must be in [1, num_blocks={num_blocks}], got {gca_after}")
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_blocks))
        self.mixers = nn.ModuleList(SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, d_conv=d_conv,
                                         scan_backend=scan_backend)
                                    for _ in range(num_blocks))
        self.gca = GroupChannelAttention(dim, gca_groups, gca_reduction) if self.guided else None
        self.gca_after, self.pooling = gca_after, pooling
        self.out_norm = nn.LayerNorm(dim)

    def encode(self, h: Tensor, guide: Tensor | None) -> Tensor:
        g = self.project_guide(guide, h)
        t = h.permute(0, 2, 3, 1)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers), start=1):
            t = t + mixer(norm(t))
            if g is not None and i == self.gca_after:
                t = self.gca(t.permute(0, 3, 1, 2), g).permute(0, 2, 3, 1)
        t = self.out_norm(t)
        if self.pooling == "center":
            return t[:, t.shape[1] // 2, t.shape[2] // 2]
        return t.mean(dim=(1, 2))


class TransformerBranch(_Branch):
    """Transformer branch guided by cross-attention to the deep diffusion features F3 [R/D].

    stem -> tokens (B, P*P, D) + position embedding, CLS prepended -> ``num_layers`` x
    [pre-LN MHSA + MLP, then cross-attention with K = V = Conv1x1(f3) tokens + the same position
    embedding] -> LN(CLS) -> z (B, D). ``patch_size`` fixes the position-embedding length.
    """

    def __init__(self, modality_channels: Mapping[str, int], num_classes: int, patch_size: int,
                 guide_channels: int | None = 128, dim: int = 64, num_layers: int = 2, heads: int = 4,
                 mlp_ratio: float = 2.0, dropout: float = 0.1, head_dropout: float = 0.1):
        super().__init__(modality_channels, guide_channels, num_classes, dim, head_dropout, guide_norm=False)
        if patch_size < 1 or num_layers < 1 or dim % heads:
            raise ValueError(f"need patch_size >= 1, num_layers >= 1 and heads ({heads}) dividing dim ({dim})")
        self.patch_size = patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patch_size * patch_size, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        hidden = int(dim * mlp_ratio)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
                                   for _ in range(num_layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                                nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))
                                  for _ in range(num_layers))
        self.cross = (nn.ModuleList(GuideCrossAttention(dim, heads, dropout) for _ in range(num_layers))
                      if self.guided else None)
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(dim)

    def encode(self, h: Tensor, guide: Tensor | None) -> Tensor:
        if h.shape[-2:] != (self.patch_size, self.patch_size):
            raise ValueError(f"patches must be {self.patch_size}x{self.patch_size}, got {tuple(h.shape[-2:])}")
        g = self.project_guide(guide, h)
        tokens = h.flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), tokens], dim=1)
        guide_tokens = None if g is None else g.flatten(2).transpose(1, 2) + self.pos_embed
        for i, (norm, attn, mlp) in enumerate(zip(self.attn_norms, self.attns, self.mlps)):
            q = norm(tokens)
            tokens = tokens + self.dropout(attn(q, q, q, need_weights=False)[0])
            tokens = tokens + mlp(tokens)
            if guide_tokens is not None:
                tokens = self.cross[i](tokens, guide_tokens)
        return self.out_norm(tokens[:, 0])


# ----------------------------------------------------------------------------------------------
# The three-branch network
# ----------------------------------------------------------------------------------------------
@dataclass
class BDGFOutput:
    """Per-branch outputs, each a dict keyed by branch name: logits (B, K), features z (B, D),
    projections u (B, proj_dim) (L2-normalised, for the feature-similarity loss)."""

    logits: dict[str, Tensor]
    features: dict[str, Tensor]
    projections: dict[str, Tensor]


class BDGFNet(nn.Module):
    """Diffusion-guided multi-branch classifier of BDGF [P skeleton, R/D details].

    Args:
        modality_channels: {name: bands} of the raw patches, e.g. {"hsi": 30, "sar": 4}.
        num_classes: K.
        guide_channels: {branch: channels of its guide cube}, default {"cnn": 64, "mamba": 128,
            "transformer": 128} (decoder levels 0/1/2 of the default DDPM). A branch missing from
            the dict, or mapped to None, is built unguided (ablation B).
        patch_size: P (11 [D]).
        branches: which of "cnn", "mamba", "transformer" to build (ablation B).
        dim: D (64 [D]). proj_dim: width of the projection heads (64 [D]).
        cnn_kwargs, mamba_kwargs, transformer_kwargs: extra branch arguments.

    forward(modalities {name: (B, C_m, P, P)}, guides {branch: (B, C_b, P, P)}) -> BDGFOutput.
    """

    def __init__(self, modality_channels: Mapping[str, int], num_classes: int,
                 guide_channels: Mapping[str, int | None] | None = None, patch_size: int = 11,
                 branches: Sequence[str] = BRANCHES, dim: int = 64, proj_dim: int = 64,
                 cnn_kwargs: Mapping | None = None, mamba_kwargs: Mapping | None = None,
                 transformer_kwargs: Mapping | None = None):
        super().__init__()
        if not branches or any(b not in BRANCHES for b in branches) or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {tuple(branches)}")
        if guide_channels is None:
            guide_channels = {"cnn": 64, "mamba": 128, "transformer": 128}
        guide_channels = dict(guide_channels)
        unknown = set(guide_channels) - set(BRANCHES)
        if unknown:
            raise ValueError(f"guide_channels has unknown branches {sorted(unknown)}")
        self.modality_channels = check_modality_channels(modality_channels)
        self.num_classes, self.patch_size = num_classes, patch_size
        self.branches = nn.ModuleDict()
        if "cnn" in branches:
            self.branches["cnn"] = CNNBranch(modality_channels, num_classes, guide_channels.get("cnn"), dim,
                                             **(cnn_kwargs or {}))
        if "mamba" in branches:
            self.branches["mamba"] = MambaBranch(modality_channels, num_classes, guide_channels.get("mamba"), dim,
                                                 **(mamba_kwargs or {}))
        if "transformer" in branches:
            self.branches["transformer"] = TransformerBranch(modality_channels, num_classes, patch_size,
                                                             guide_channels.get("transformer"), dim,
                                                             **(transformer_kwargs or {}))
        self.projectors = nn.ModuleDict({b: nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj_dim))
                                         for b in self.branches})

    @property
    def branch_names(self) -> list[str]:
        return list(self.branches)

    def forward(self, modalities: Mapping[str, Tensor], guides: Mapping[str, Tensor] | None = None) -> BDGFOutput:
        guides = guides or {}
        logits, features, projections = {}, {}, {}
        for name, branch in self.branches.items():
            logits[name], features[name] = branch(modalities, guides.get(name))
            projections[name] = F.normalize(self.projectors[name](features[name]), dim=-1)
        return BDGFOutput(logits, features, projections)

    @staticmethod
    def ensemble_probabilities(logits: Mapping[str, Tensor]) -> Tensor:
        """Mean of the branch softmaxes, (B, K) [D]; argmax gives the prediction."""
        return torch.stack([torch.softmax(z, dim=-1) for z in logits.values()]).mean(dim=0)

    @torch.no_grad()
    def predict_proba(self, modalities: Mapping[str, Tensor], guides: Mapping[str, Tensor] | None = None) -> Tensor:
        """Ensemble class probabilities (B, K) (call ``eval()`` first for inference)."""
        return self.ensemble_probabilities(self(modalities, guides).logits)


# ----------------------------------------------------------------------------------------------
# Mutual learning (docs/models/bdgf.md)
# ----------------------------------------------------------------------------------------------
