"""DAS²F: Diff-Attention Aware State Space Fusion (Ma et al., arXiv 2504.16665) as pure nn.Modules.

Re-implementation of the authors' ``model_nanjing.py`` (2 CMDA stages) and ``model_smallxian.py``
(1 stage) from github AVKSKVL/DAS-F-Model, following docs/models/das2f.md. Tags in the
docstrings say where each default comes from: [C] the authors' code (exact), [G] the same author's
sibling repo BMoAMamba, [D] a default chosen for rsfusion (an ablation switch, off the paper path).

Graph (shapes at the authors' geometry, MS 4x16x16 / PAN 1x64x64, d_model 64)::

    ms  (B,4,h,h)   -up x4-> conv4/4 + LN       -> m0 (B,h,h,64)
    pan (B,1,4h,4h) -1x1 -> 4-> conv4/4 + LN    -> p0 (B,h,h,64)
    stage s:  m_f = SPVM_ms(m), p_f = SPVM_pan(p), (m_c, p_c) = CrossSPVM(m, p)
              dominant d_m = PS2(m_f - m_c), d_p = PS2(p_f - p_c)     each (B,4h*h,16)
              the next stage gets the common features (m_c, p_c)
    fused f = PS2((m_c + p_c) / 2) of the last stage, then f = AALF_s(d_m_s, d_p_s, f) for the
    stages from the deepest to the shallowest; logits = Linear(Linear(flatten(f))).

Differences from the authors' code that do not change the maths: the four scan directions (and,
in the cross branch, both modalities) go through one grouped ``selective_scan`` call instead of
one call per direction; the AALF outer product is computed in its equal scalar form alpha * B;
the patch geometry follows the ``ms_patch_size`` argument instead of hard-coded reshapes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsfusion.kernels import cross_merge, cross_scan, selective_scan
from rsfusion.lightning_modules.networks.layers import (
    NUM_DIRECTIONS,
    Mlp,
    check_scan_backend,
    directional_ssm_parameters,
    mamba_init_,
    project_directions,
)

__all__ = ["DAS2FNet", "VARIANTS", "pixel_shuffle_tokens"]

# The authors' two nets, by the name of their file (model_<name>.py): number of CMDA stages.
VARIANTS = {"nanjing": 2, "smallxian": 1}

PAN_TO_MS = 4  # PAN resolution / MS resolution; also the stem patch and the SPVM unfold factor
FUSION_SHUFFLE = 2  # PS2: pixel-shuffle factor applied to every map before fusion


def pixel_shuffle_tokens(x, factor):
    """Channel-last pixel shuffle: (B, H, W, C) -> (B, H*factor, W*factor, C / factor²).

    Channel ``c * factor² + i * factor + j`` of token (h, w) becomes channel ``c`` of pixel
    (factor*h + i, factor*w + j), i.e. ``F.pixel_shuffle`` on the channel-first view. With factor 4
    this is SPVM's space-preserving unfold, with factor 2 the PS2 step before fusion.
    """
    return F.pixel_shuffle(x.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1)


class SpvmParameters(nn.Module):
    """One modality's SPVM parameter set θ (everything of an SPVM core except ``out_norm``).

    Holds the gate projection, the space-preserving local conv, the re-patchify conv + BN, the
    per-direction projections W_x (K, R+2N, d) and W_dt (K, d, R), the Δ-bias, A_log (K*d, N), D
    (K*d,) and the output projection. The module is split into the steps of the core so that the
    cross branch can combine one modality's scan input with the other's scan parameters.
    """

    def __init__(self, d_model, d_state, dt_rank, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4):
        super().__init__()
        unfolded = d_model // PAN_TO_MS ** 2
        self.d_model, self.d_state, self.dt_rank = d_model, d_state, dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.in_proj = nn.Linear(d_model, d_model, bias=False)  # gate only, no SSM branch [C]
        self.local_conv = nn.Conv2d(unfolded, unfolded, 3, padding=1, groups=unfolded)
        self.patch_conv = nn.Conv2d(unfolded, d_model, PAN_TO_MS, stride=PAN_TO_MS)
        self.patch_norm = nn.BatchNorm2d(d_model)
        (self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias, self.A_log,
         self.D) = directional_ssm_parameters(d_model, d_state, dt_rank, flat_dt_bias=True)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self):
        """VMamba ``mamba_init`` [C] (see :func:`~rsfusion.lightning_modules.networks.layers.mamba_init_`)."""
        mamba_init_(self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias, self.A_log, self.D,
                    self.dt_min, self.dt_max, self.dt_init_floor)

    def gate(self, u):
        """z = SiLU(W_in u): (B, H, W, d) -> (B, H, W, d)."""
        return F.silu(self.in_proj(u))

    def scan_inputs(self, u):
        """Unfold, local conv, re-patchify and cross-scan the normed tokens u (B, H, W, d).

        Returns ``xs`` (B, K*d, L), ``delta`` (B, K*d, L) before bias/softplus, and the grouped
        ``B``, ``C`` (B, K, N, L), with L = H*W and channel index k*d + c for direction k.
        """
        batch, height, width, _ = u.shape
        x = pixel_shuffle_tokens(u, PAN_TO_MS).permute(0, 3, 1, 2)  # (B, d/16, 4H, 4W)
        x = F.silu(self.local_conv(x))
        x = self.patch_norm(self.patch_conv(x))  # (B, d, H, W)
        xs = cross_scan(x)  # (B, K, d, L)
        delta, b, c = project_directions(xs, self.x_proj_weight, self.dt_proj_weight, self.d_state)
        length = height * width
        return (xs.reshape(batch, -1, length), delta.reshape(batch, -1, length),
                b.contiguous(), c.contiguous())

    def scan_constants(self):
        """A = -exp(A_log) (K*d, N), D (K*d,), Δ-bias (K*d,)."""
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj_bias.float()

    def output(self, y, z):
        """W_out (y ⊙ z): (B, H, W, d) -> (B, H, W, d)."""
        return self.out_proj(y * z)


def scan_fp32(u, delta, A, B, C, D, delta_bias, backend="auto"):
    """Grouped selective scan with Δ-softplus, run in fp32 whatever the autocast dtype (
    bf16 autocast is fine for linears and convs, the scan stays fp32). Returns (B, D, L) fp32."""
    with torch.autocast(device_type=u.device.type, enabled=False):
        return selective_scan(u.float(), delta.float(), A, B.float(), C.float(), D=D,
                              delta_bias=delta_bias, delta_softplus=True, backend=backend)


def merge_directions(y, height, width, out_norm):
    """Sum the K scan outputs y (B, K*d, L) back to the map and LayerNorm: -> (B, H, W, d)."""
    batch = y.shape[0]
    merged = cross_merge(y.view(batch, NUM_DIRECTIONS, -1, height, width))  # (B, d, L)
    return out_norm(merged.transpose(1, 2)).view(batch, height, width, -1)


class Spvm(nn.Module):
    """Space-Preserving Visual Mamba core on normed tokens u (B, H, W, d) -> (B, H, W, d). [C]

    z = SiLU(W_in u); x = BN(Conv_p(SiLU(DWConv3x3(pixel_shuffle_4(u))))); y = SS2D(x) with the
    four directions in one grouped selective scan; out = W_out(LN(y) ⊙ z).
    """

    def __init__(self, d_model, d_state, dt_rank, scan_backend="auto", **dt_init):
        super().__init__()
        self.scan_backend = check_scan_backend(scan_backend)
        self.params = SpvmParameters(d_model, d_state, dt_rank, **dt_init)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, u):
        _, height, width, _ = u.shape
        z = self.params.gate(u)
        xs, delta, b, c = self.params.scan_inputs(u)
        a, d, delta_bias = self.params.scan_constants()
        y = scan_fp32(xs, delta, a, b, c, d, delta_bias, self.scan_backend)
        return self.params.output(merge_directions(y, height, width, self.out_norm), z)


class SpvmBlock(nn.Module):
    """Pre-norm SPVM block: y = x + SPVM(LN(x)); out = y + MLP(LN(y)), one shared LN. [C]"""

    def __init__(self, d_model, d_state, dt_rank, mlp_ratio=4, scan_backend="auto", **dt_init):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.spvm = Spvm(d_model, d_state, dt_rank, scan_backend, **dt_init)
        self.mlp = Mlp(d_model, d_model * mlp_ratio)

    def forward(self, x):
        x = x + self.spvm(self.norm(x))
        return x + self.mlp(self.norm(x))


class CrossSpvm(nn.Module):
    """CMDA cross branch: each modality is scanned with the other modality's SSM. [C]

    Both modalities compute their own scan input xs and their own (Δ, B, C) from their own
    W_x/W_dt. With ``swap=True`` (authors') the MS values are scanned with PAN's Δ, B, C, A, D and
    Δ-bias and vice versa, so each output is the other modality's "hidden attention" applied to
    this modality's values: the common feature. ``swap=False`` [D] scans each modality with its
    own parameters (an ablation; the module then has no cross-modal path). Both modalities run in
    one grouped selective scan (G = 2K). Each output is merged, normed by the shared out_norm,
    gated by its own z, projected by its own W_out, added to the un-normed input and passed
    through its own MLP (pre-norm with the one shared LN).

    Inputs m, p: (B, H, W, d) -> common features (m_c, p_c), each (B, H, W, d).
    """

    def __init__(self, d_model, d_state, dt_rank, mlp_ratio=4, swap=True, scan_backend="auto", **dt_init):
        super().__init__()
        self.swap = swap
        self.scan_backend = check_scan_backend(scan_backend)
        self.norm = nn.LayerNorm(d_model)
        self.ms = SpvmParameters(d_model, d_state, dt_rank, **dt_init)
        self.pan = SpvmParameters(d_model, d_state, dt_rank, **dt_init)
        self.out_norm = nn.LayerNorm(d_model)
        self.mlp_ms = Mlp(d_model, d_model * mlp_ratio)
        self.mlp_pan = Mlp(d_model, d_model * mlp_ratio)

    def forward(self, m, p):
        _, height, width, _ = m.shape
        m_normed, p_normed = self.norm(m), self.norm(p)
        xs_m, delta_m, b_m, c_m = self.ms.scan_inputs(m_normed)
        xs_p, delta_p, b_p, c_p = self.pan.scan_inputs(p_normed)
        const_m, const_p = self.ms.scan_constants(), self.pan.scan_constants()
        if self.swap:
            (delta_m, b_m, c_m, const_m), (delta_p, b_p, c_p, const_p) = (
                (delta_p, b_p, c_p, const_p), (delta_m, b_m, c_m, const_m))
        # Channels [0, K*d) carry MS values, [K*d, 2K*d) PAN values; group g = direction/modality.
        a, d, delta_bias = (torch.cat(pair) for pair in zip(const_m, const_p))
        y = scan_fp32(torch.cat([xs_m, xs_p], 1), torch.cat([delta_m, delta_p], 1), a,
                      torch.cat([b_m, b_p], 1), torch.cat([c_m, c_p], 1), d, delta_bias, self.scan_backend)
        y_m, y_p = y.chunk(2, dim=1)
        m = m + self.ms.output(merge_directions(y_m, height, width, self.out_norm),
                               self.ms.gate(m_normed))
        p = p + self.pan.output(merge_directions(y_p, height, width, self.out_norm),
                                self.pan.gate(p_normed))
        return m + self.mlp_ms(self.norm(m)), p + self.mlp_pan(self.norm(p))


class CmdaStage(nn.Module):
    """Cross-Modal Diff-Attention stage on m, p (B, H, W, d). [C]

    Returns a dict with the common features ``ms_common``/``pan_common`` (the cross branch's
    outputs, passed to the next stage) and, when ``dominant_features`` is on, the self-branch
    outputs ``ms_self``/``pan_self`` and the dominant features ``ms_dominant = ms_self -
    ms_common`` (likewise for PAN). ``dominant_features=False`` [D] builds no self branches.
    """

    def __init__(self, d_model, d_state, dt_rank, mlp_ratio=4, cross_swap=True,
                 dominant_features=True, scan_backend="auto", **dt_init):
        super().__init__()
        self.dominant_features = dominant_features
        if dominant_features:
            self.self_ms = SpvmBlock(d_model, d_state, dt_rank, mlp_ratio, scan_backend, **dt_init)
            self.self_pan = SpvmBlock(d_model, d_state, dt_rank, mlp_ratio, scan_backend, **dt_init)
        self.cross = CrossSpvm(d_model, d_state, dt_rank, mlp_ratio, cross_swap, scan_backend, **dt_init)

    def forward(self, m, p):
        m_c, p_c = self.cross(m, p)
        features = {"ms_common": m_c, "pan_common": p_c}
        if self.dominant_features:
            m_f, p_f = self.self_ms(m), self.self_pan(p)
            features.update(ms_self=m_f, pan_self=p_f, ms_dominant=m_f - m_c, pan_dominant=p_f - p_c)
        return features


class AttentionAwareFusion(nn.Module):
    """AALF ``Fusion(A, B)`` on (B, P, c) maps -> (B, P, c). [C]

    G = σ(W_g [A ; B] + b_g) gates A per pixel and channel; the authors then average the per-pixel
    c×c outer product (A ⊙ G)_i B_j over i, which equals α ⊙ B with the scalar influence
    coefficient α = mean_c(A ⊙ G). This computes the cheap α ⊙ B form.
    """

    def __init__(self, channels):
        super().__init__()
        self.gate = nn.Linear(2 * channels, channels)

    def coefficient(self, a, b):
        """α = mean_c(A ⊙ σ(W_g [A ; B] + b_g)): (B, P, 1)."""
        gate = torch.sigmoid(self.gate(torch.cat([a, b], dim=-1)))
        return (a * gate).mean(dim=-1, keepdim=True)

    def forward(self, a, b):
        return self.coefficient(a, b) * b


class Aalf(nn.Module):
    """Attention-Aware Linear Fusion (authors' ``Block2``): rescales the common map f pixel-wise
    with coefficients from the dominant maps. One LN shared by all four normalisations. [C]

    out = Fusion₂(LN(Fusion₁(LN(d_ms), LN(d_pan))), LN(f)); all maps (B, P, c) -> (B, P, c).
    """

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.dominant = AttentionAwareFusion(channels)
        self.common = AttentionAwareFusion(channels)

    def forward(self, d_ms, d_pan, f):
        x = self.dominant(self.norm(d_ms), self.norm(d_pan))
        return self.common(self.norm(x), self.norm(f))


class ConcatFusion(nn.Module):
    """Ablation of AALF [D]: per pixel, LN over the concatenation [f ; d_ms_S ; d_pan_S ; ... ;
    d_ms_1 ; d_pan_1] then Linear back to c channels, so the head keeps its size.

    ``maps``: list of (B, P, c) -> (B, P, c).
    """

    def __init__(self, channels, num_maps):
        super().__init__()
        self.norm = nn.LayerNorm(channels * num_maps)
        self.proj = nn.Linear(channels * num_maps, channels)

    def forward(self, maps):
        return self.proj(self.norm(torch.cat(maps, dim=-1)))


class PatchStem(nn.Module):
    """Patchify (B, C, 4h, 4w) with a 4×4/stride-4 conv, channel-last + LN -> (B, h, w, d). [C]"""

    def __init__(self, in_channels, d_model):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d_model, PAN_TO_MS, stride=PAN_TO_MS)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class DAS2FNet(nn.Module):
    """DAS²F network: forward(ms (B, C_ms, h, h), pan (B, C_pan, 4h, 4h)) -> logits (B, K).

    Args (defaults are the authors' [C] unless tagged otherwise):
        num_classes: K, the number of land-cover classes (take it from the label map).
        ms_channels: MS bands, 4 [C].
        pan_channels: PAN bands, 1 [C].
        ms_patch_size: MS patch side h, 16 [C]; the PAN patch must be 4h. Sets the head's input
            size h² · d_model.
        pan_patch_size: optional PAN patch side, only checked against 4 · ms_patch_size.
        stages: number of CMDA stages, 2 [C, "nanjing"]; the "smallxian" net has 1 [C] (``VARIANTS``,
            :meth:`from_variant`).
        d_model: token width, 64 [C]; must be divisible by 16 (the 4×4 unfold).
        d_state: SSM state size N, 24 [C].
        dt_rank: rank R of the Δ projection, 24 [C] (not VMamba's ceil(d/16)).
        mlp_ratio: MLP hidden width / d_model, 4 [C].
        head_hidden: width of the first head linear, 1024 [C]; the head has no nonlinearity [C].
        cross_swap: scan each modality with the other's SSM parameters in the cross branch, True
            [C]; False [D] is the "no swap" ablation.
        dominant_features: compute the self branches and dominant features and fuse with them,
            True [C]; False [D] classifies the averaged common map of the last stage directly
            (no self branches, no fusion module).
        fusion: "aalf" [C] or "concat" [D] (see :class:`ConcatFusion`); needs dominant features.
        dt_min, dt_max, dt_init_floor: Δ-bias initialisation range, 1e-3, 1e-1, 1e-4 [C].
        scan_backend: ``backend`` of every selective scan ("auto" [default: RSFUSION_SCAN_BACKEND if
            set, else the fastest that runs], "torch", "triton", "cuda"; checked at construction).

    Initialisation: ``xavier_uniform_`` on every Conv2d/Linear weight [G]; biases, norms and the
    raw SSM parameters keep their own init (see :meth:`SpvmParameters.reset_ssm_parameters`).
    BatchNorm inside SPVM means training batches need ≥ 2 samples.
    """

    def __init__(self, num_classes, ms_channels=4, pan_channels=1, ms_patch_size=16,
                 pan_patch_size=None, stages=2, d_model=64, d_state=24, dt_rank=24, mlp_ratio=4,
                 head_hidden=1024, cross_swap=True, dominant_features=True, fusion="aalf",
                 dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, scan_backend="auto"):
        super().__init__()
        check_scan_backend(scan_backend)
        positive = dict(num_classes=num_classes, ms_channels=ms_channels, pan_channels=pan_channels,
                        ms_patch_size=ms_patch_size, stages=stages, d_model=d_model,
                        d_state=d_state, dt_rank=dt_rank, mlp_ratio=mlp_ratio,
                        head_hidden=head_hidden)
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DAS2FNet: {name} must be a positive int, got {value!r}")
        if pan_patch_size is not None and pan_patch_size != PAN_TO_MS * ms_patch_size:
            raise ValueError(f"DAS2FNet: pan_patch_size must be {PAN_TO_MS} x ms_patch_size = "
                             f"{PAN_TO_MS * ms_patch_size}, got {pan_patch_size}")
        if d_model % PAN_TO_MS ** 2:
            raise ValueError(f"DAS2FNet: d_model must be divisible by {PAN_TO_MS ** 2} for the "
                             f"space-preserving {PAN_TO_MS}x{PAN_TO_MS} unfold, got {d_model}")
        if fusion not in ("aalf", "concat"):
            raise ValueError(f"DAS2FNet: fusion must be 'aalf' or 'concat', got {fusion!r}")
        if fusion != "aalf" and not dominant_features:
            raise ValueError(f"DAS2FNet: fusion={fusion!r} fuses dominant features, so it needs "
                             "dominant_features=True")
        self.num_classes, self.ms_patch_size, self.fusion = num_classes, ms_patch_size, fusion
        self.ms_channels, self.pan_channels = ms_channels, pan_channels
        self.dominant_features = dominant_features
        fused_channels = d_model // FUSION_SHUFFLE ** 2
        dt_init = dict(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)

        self.pan_lift = nn.Conv2d(pan_channels, PAN_TO_MS, 1)  # authors' "R1"
        self.ms_stem = PatchStem(ms_channels, d_model)
        self.pan_stem = PatchStem(PAN_TO_MS, d_model)
        self.stages = nn.ModuleList(
            CmdaStage(d_model, d_state, dt_rank, mlp_ratio, cross_swap, dominant_features, scan_backend, **dt_init)
            for _ in range(stages))
        if dominant_features and fusion == "aalf":
            self.fusions = nn.ModuleList(Aalf(fused_channels) for _ in range(stages))
        elif dominant_features:
            self.fusions = ConcatFusion(fused_channels, 1 + 2 * stages)
        grid = FUSION_SHUFFLE * ms_patch_size
        self.head = nn.Sequential(nn.Linear(grid * grid * fused_channels, head_hidden),
                                  nn.Linear(head_hidden, num_classes))
        self.init_weights()

    @classmethod
    def from_variant(cls, variant, num_classes, stages=None, **kwargs):
        """One of the authors' nets by name (see ``VARIANTS``); ``stages`` overrides its stage count."""
        if variant not in VARIANTS:
            raise ValueError(f"DAS2FNet: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        return cls(num_classes, stages=stages or VARIANTS[variant], **kwargs)

    def init_weights(self):
        """``xavier_uniform_`` on every Conv2d and Linear weight [G]; everything else keeps its init."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)

    def _check_inputs(self, ms, pan):
        h = self.ms_patch_size
        expected_ms = (self.ms_channels, h, h)
        expected_pan = (self.pan_channels, PAN_TO_MS * h, PAN_TO_MS * h)
        if ms.dim() != 4 or tuple(ms.shape[1:]) != expected_ms:
            raise ValueError(f"DAS2FNet: ms must be (B, {', '.join(map(str, expected_ms))}) "
                             f"(ms_patch_size={h}), got {tuple(ms.shape)}")
        if pan.dim() != 4 or tuple(pan.shape[1:]) != expected_pan:
            raise ValueError(f"DAS2FNet: pan must be (B, {', '.join(map(str, expected_pan))}) "
                             f"({PAN_TO_MS} x ms_patch_size), got {tuple(pan.shape)}")
        if ms.shape[0] != pan.shape[0]:
            raise ValueError(f"DAS2FNet: ms and pan batch sizes differ: {ms.shape[0]} vs {pan.shape[0]}")

    def forward_features(self, ms, pan):
        """Run stems, CMDA stages and fusion; return the intermediate features as a dict.

        Keys: ``stages``, a list (shallow to deep) of per-stage dicts with channel-last (B, h, h, d)
        maps ``ms_common``, ``pan_common`` and, with dominant features on, ``ms_self``,
        ``pan_self``, ``ms_dominant``, ``pan_dominant``; and ``fused``, the (B, 4h², d/4) map the
        head reads (pixel-major over the 2h×2h PS2 grid, channel fastest).
        """
        self._check_inputs(ms, pan)
        m = self.ms_stem(F.interpolate(ms, scale_factor=PAN_TO_MS, mode="bilinear",
                                       align_corners=False))
        p = self.pan_stem(self.pan_lift(pan))
        stage_features = []
        for stage in self.stages:
            features = stage(m, p)
            stage_features.append(features)
            m, p = features["ms_common"], features["pan_common"]

        def ps2(x):
            return pixel_shuffle_tokens(x, FUSION_SHUFFLE).flatten(1, 2)

        fused = ps2((m + p) / 2)
        if self.dominant_features:
            deep_first = stage_features[::-1]
            dominant = [(ps2(s["ms_dominant"]), ps2(s["pan_dominant"])) for s in deep_first]
            if self.fusion == "aalf":
                for aalf, (d_ms, d_pan) in zip(self.fusions[::-1], dominant):
                    fused = aalf(d_ms, d_pan, fused)
            else:
                fused = self.fusions([fused] + [d for pair in dominant for d in pair])
        return {"stages": stage_features, "fused": fused}

    def forward(self, ms, pan, return_features=False):
        """ms (B, C_ms, h, h), pan (B, C_pan, 4h, 4h) -> logits (B, K) [, features dict]."""
        features = self.forward_features(ms, pan)
        logits = self.head(features["fused"].flatten(1))
        return (logits, features) if return_features else logits
