"""M3amba network: the authors' parameter counts, Cross-SS2D semantics (B swap, A averaging, shared
weights), fast vs faithful mode, the masked loss, CLIP loading / freezing and the AdamW groups."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from rsfusion.lightning_modules.networks.m3amba import CrossSS2D, CrossVSSBlock, M3ambaNet

TINY = dict(hsi_channels=5, aux_channels=2, num_classes=3, dims=8, depth=2, d_state=4,
            image_size=6)


def tiny_clip_config():
    return CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, image_size=32, patch_size=16, projection_dim=8)


def tiny_net(**overrides):
    torch.manual_seed(0)
    return M3ambaNet(**{**TINY, "clip_config": tiny_clip_config(), **overrides})


def tiny_inputs(batch=2):
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(batch, 5, 6, 6, generator=generator),
            torch.rand(batch, 2, 6, 6, generator=generator))


def count(params):
    return sum(p.numel() for p in params)


# --- parameter counts of the authors' configurations (meta device) ---------------------------------

@pytest.mark.parametrize("hsi_channels, aux_channels, num_classes, expected, linear_embed", [
    (144, 1, 15, 70_814_543, 441),   # Houston2013
    (64, 2, 11, 70_749_093, 204),    # MUUFL
    (180, 4, 7, 70_835_333, 558),    # Augsburg
])
def test_parameter_counts_match_the_authors_code(hsi_channels, aux_channels, num_classes,
                                                 expected, linear_embed):
    with torch.device("meta"):
        net = M3ambaNet(hsi_channels, aux_channels, num_classes, clip_config=CLIPVisionConfig())
    named = dict(net.named_parameters())
    vssm = [p for n, p in named.items() if not n.startswith(("clip.", "linear_embed_"))]
    assert count(vssm) == expected
    assert count(p for n, p in named.items() if n.startswith("linear_embed_")) == linear_embed
    assert count(net.clip.parameters()) == 87_849_216  # ViT-B/32 image tower
    assert count(net.layers_hsi[0].parameters()) == 2_679_168
    assert count(net.layers_aux[8].parameters()) == 2_679_168
    assert count(net.layers_fused[0].parameters()) == 2_378_112
    assert len(net.layers_hsi) == len(net.layers_aux) == len(net.layers_fused) == 9
    rates = [block.drop_path.drop_prob for block in net.layers_fused]
    assert rates == pytest.approx([0.1 * i / 8 for i in range(9)])


# --- forward -----------------------------------------------------------------------------------

def test_forward_returns_three_logit_maps_and_features():
    net = tiny_net().eval()
    hsi, aux = tiny_inputs()
    with torch.no_grad():
        logits = net(hsi, aux)
        features = net.forward_features(hsi, aux)
    assert [tuple(o.shape) for o in logits] == [(2, 3, 6, 6)] * 3
    assert [tuple(f.shape) for f in features] == [(2, 6, 6, 8)] * 3
    for head_logits, head_from_features in zip(logits, net.forward_head(features)):
        torch.testing.assert_close(head_logits, head_from_features)
    assert not torch.allclose(logits[0], logits[2])
    with pytest.raises(ValueError, match=r"hsi must be \(B, 5, 6, 6\)"):
        net(torch.rand(2, 5, 8, 8), aux)


def test_fast_mode_gives_the_faithful_logits_and_skips_the_guidance_output():
    net = tiny_net(compute_guidance_output=True, drop_path_rate=0.0)
    hsi, aux = tiny_inputs()
    calls = []
    hook = net.layers_hsi[0].op.op.out_proj.register_forward_hook(lambda *args: calls.append(1))
    faithful = net(hsi, aux)
    faithful_calls = len(calls)
    net.compute_guidance_output = False
    fast = net(hsi, aux)
    hook.remove()
    assert faithful_calls == 2 and len(calls) - faithful_calls == 1  # guidance output not computed
    for a, b in zip(faithful, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the gradients of the kept outputs agree too
    grads = []
    for mode in (True, False):
        net.zero_grad()
        net.compute_guidance_output = mode
        sum(o.square().sum() for o in net(hsi, aux)).backward()
        grads.append(net.layers_aux[1].op.ssm_guide.x_proj_weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


# --- Cross-SS2D semantics -------------------------------------------------------------------------

def _cross(**kwargs):
    torch.manual_seed(0)
    return CrossSS2D(6, d_state=4, ssm_ratio=2.0, dt_rank=3, **kwargs)


def _streams():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 4, 6, generator=generator), torch.randn(2, 3, 4, 6, generator=generator)


def test_cross_ss2d_with_identical_streams_reduces_to_ss2d():
    cross = _cross()
    with torch.no_grad():
        for name, param in cross.ssm_guide.named_parameters():
            param.copy_(cross.op.ssm.get_parameter(name))
    p, _ = _streams()
    out_p, out_q = cross(p, p.clone())
    torch.testing.assert_close(out_p, cross.op(p))
    torch.testing.assert_close(out_q, out_p)


def test_b_swap_stream_depends_on_guidance_b_only():
    cross = _cross()
    p, q = _streams()
    reference, _ = cross(p, q)
    assert not torch.allclose(cross(p, q + 0.5 * torch.randn_like(q))[0], reference)
    ssm_q, rank, state = cross.ssm_guide, cross.ssm_guide.dt_rank, cross.ssm_guide.d_state
    with torch.no_grad():  # the guidance stream's delta, C and D do not reach stream p
        ssm_q.dt_projs_weight.mul_(3.0)
        ssm_q.dt_projs_bias.add_(1.0)
        ssm_q.Ds.mul_(-2.0)
        ssm_q.x_proj_weight[:, :rank].mul_(-4.0)
        ssm_q.x_proj_weight[:, rank + state:].mul_(5.0)
    torch.testing.assert_close(cross(p, q)[0], reference)
    with torch.no_grad():  # its B rows do
        ssm_q.x_proj_weight[:, rank:rank + state].mul_(2.0)
    assert not torch.allclose(cross(p, q)[0], reference)


def test_without_exchange_and_averaging_the_stream_ignores_the_guidance():
    cross = _cross(exchange="none", avg_A=False)
    p, q = _streams()
    torch.testing.assert_close(cross(p, q)[0], cross.op(p))
    torch.testing.assert_close(cross(p, torch.randn_like(q), compute_guidance_output=False)[0],
                               cross.op(p))


def test_a_is_the_mean_of_both_streams():
    cross = _cross()
    p, q = _streams()
    reference, _ = cross(p, q)
    a_p, a_q = cross.op.ssm.A_logs.detach().exp(), cross.ssm_guide.A_logs.detach().exp()
    with torch.no_grad():  # move mass from A_q to A_p, keeping (A_p + A_q) / 2
        cross.op.ssm.A_logs.copy_(torch.log(a_p + 0.5 * a_q))
        cross.ssm_guide.A_logs.copy_(torch.log(0.5 * a_q))
    torch.testing.assert_close(cross(p, q, compute_guidance_output=False)[0], reference)
    cross.avg_A = False
    assert not torch.allclose(cross(p, q)[0], reference)


def test_shared_stream_weights_are_the_same_modules():
    torch.manual_seed(0)
    shared = CrossVSSBlock(6, d_state=4, dt_rank=3)
    separate = CrossVSSBlock(6, d_state=4, dt_rank=3, shared_stream_weights=False)
    assert shared.op.guide_body is shared.op.op
    assert shared.op.guide_ssm is not shared.op.op.ssm
    calls = []
    shared.op.op.in_proj.register_forward_hook(lambda module, args, out: calls.append(args[0]))
    p, q = _streams()
    shared(p, q)
    assert len(calls) == 2  # one in_proj weight tensor applied to both streams
    assert separate.op.guide_body is not separate.op.op
    body_and_block = count(separate.op.op.parameters()) - count(separate.op.op.ssm.parameters())
    body_and_block += count(separate.norm.parameters()) * 2 + count(separate.mlp.parameters())
    assert count(separate.parameters()) - count(shared.parameters()) == body_and_block


def test_guidance_side_delta_and_d_get_no_gradient_in_faithful_mode():
    torch.manual_seed(0)
    block = CrossVSSBlock(6, d_state=4, dt_rank=3)
    p, q = _streams()
    out_p, _ = block(p.requires_grad_(), q.requires_grad_())
    out_p.sum().backward()
    guide = block.op.ssm_guide
    assert guide.dt_projs_weight.grad is None and guide.Ds.grad is None
    assert guide.x_proj_weight.grad[:, guide.dt_rank:guide.dt_rank + guide.d_state].abs().sum() > 0
    assert guide.A_logs.grad.abs().sum() > 0 and q.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, name", [({"exchange": "A"}, "exchange"), ({"dims": 0}, "dims"),
                                          ({"drop_path_rate": 1.5}, "drop_path_rate")])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny_net(**kwargs)


# --- CLIP ------------------------------------------------------------------------------------------

def test_clip_loaded_from_a_local_directory_matches_the_in_memory_tower(tmp_path):
    net = tiny_net().eval()
    net.clip.save_pretrained(tmp_path)
    loaded = tiny_net(clip_config=None, clip_model=str(tmp_path)).eval()
    assert isinstance(loaded.clip, CLIPVisionModelWithProjection)
    rgb = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_clip(rgb), net.encode_clip(rgb), rtol=0, atol=0)
    assert loaded.clip.config.projection_dim == 8


def test_a_full_clip_checkpoint_loads_as_the_image_tower(tmp_path):
    """The hub's openai/clip-vit-base-patch32 is a CLIPModel (text + vision) checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    vision = tiny_clip_config().to_dict()
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    full.save_pretrained(tmp_path)
    net = tiny_net(clip_config=None, clip_model=str(tmp_path)).eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.get_image_features(pixel_values=pixels)
        expected = expected if torch.is_tensor(expected) else expected.pooler_output
        torch.testing.assert_close(net.clip(pixel_values=pixels).image_embeds, expected)


def test_missing_clip_weights_give_a_one_line_error(tmp_path):
    missing = tmp_path / "no_clip_here"
    with pytest.raises(FileNotFoundError) as info:
        tiny_net(clip_config=None, clip_model=str(missing))
    message = str(info.value)
    assert "\n" not in message and str(missing) in message
    assert "save_pretrained" in message and "huggingface-cli download" in message
    assert info.value.__cause__ is None


@pytest.mark.parametrize("linear_embed_trainable", [True, False])
def test_clip_is_frozen_and_gets_no_gradient(linear_embed_trainable):
    net = tiny_net(linear_embed_trainable=linear_embed_trainable).train()
    assert not net.clip.training and net.layers_hsi[0].training
    assert all(not p.requires_grad for p in net.clip.parameters())
    hsi, aux = tiny_inputs()
    sum(o.sum() for o in net(hsi, aux)).backward()
    assert all(p.grad is None for p in net.clip.parameters())
    embed_grad = net.linear_embed_hsi.weight.grad
    if linear_embed_trainable:
        assert embed_grad is not None and embed_grad.abs().sum() > 0
    else:
        assert embed_grad is None and not net.linear_embed_aux.weight.requires_grad
    assert net.adapter_aux.linear.weight.grad.abs().sum() > 0


def test_clip_normalize_changes_only_the_clip_input():
    net = tiny_net().eval()
    normalized = copy.deepcopy(net)
    normalized.clip_normalize = True
    rgb = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        resized = F.interpolate(rgb, size=(32, 32), mode="bicubic", align_corners=False)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        expected = net.clip(pixel_values=(resized - mean) / std).image_embeds
        torch.testing.assert_close(normalized.encode_clip(rgb), expected)
        assert not torch.allclose(net.encode_clip(rgb), expected)
