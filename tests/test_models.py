import json

import pytest
import timm
import torch

from pretrain.models import create_model, list_models, load_official_checkpoint

RELEASED = {  # parameters at 1000 classes, keys in the state dict
    "internimage_t": (29_918_424, 633),
    "internimage_s": (50_079_880, 751),
    "internimage_b": (97_461_832, 751),
    "internimage_l": (223_334_810, 839),
    "internimage_xl": (334_819_780, 883),
    "internimage_h": (1_089_636_760, 1357),
    "internimage_g": (3_076_373_352, 1295),
}
TINY = dict(channels=16, depths=(1, 1, 3, 1), num_classes=10)
TINY_H = dict(TINY, groups=(2, 4, 8, 16), level2_post_norm_block_ids=[1])
TINY_G = dict(TINY, groups=(2, 4, 8, 16), level2_post_norm_block_ids=[0, 2])


def param_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_parameter_and_key_counts_on_meta_device(name):
    with torch.device("meta"):
        model = create_model(name)
    assert (param_count(model), len(model.state_dict())) == RELEASED[name]
    assert all(p.is_meta for p in model.parameters())


def test_timm_registry_builds_the_family():
    assert set(RELEASED) <= set(timm.list_models("internimage_*"))
    with torch.device("meta"):
        model = timm.create_model("internimage_h", pretrained=False)
    assert param_count(model) == RELEASED["internimage_h"][0]


def test_release_key_names():
    with torch.device("meta"):
        keys = set(create_model("internimage_h").state_dict())
    expected = {
        "patch_embed.norm1.1.weight", "patch_embed.norm2.1.bias", "levels.0.downsample.norm.1.weight",
        "levels.0.downsample.conv.weight", "levels.0.blocks.0.dcn.dw_conv.1.1.weight",
        "levels.0.blocks.0.dcn.center_feature_scale_proj_weight", "levels.0.blocks.0.res_post_norm1.0.weight",
        "levels.2.post_norms.4.0.weight", "levels.3.norm.0.bias", "dcnv3_head_x4.0.weight",
        "dcnv3_head_x3.weight", "clip_projector.cross_dcn.q_bias", "clip_projector.norm1_k.0.weight",
        "fc_norm.0.weight", "head.weight",
    }
    assert expected <= keys
    with torch.device("meta"):
        keys_b = set(create_model("internimage_b").state_dict())
    assert {"conv_head.0.weight", "conv_head.1.0.running_var", "levels.1.blocks.0.gamma2"} <= keys_b
    assert not any(k.startswith("levels.0.norm") for k in keys_b)  # post-norm models have no stage norm


def test_unknown_model_name():
    with pytest.raises(ValueError, match="internimage_t"):
        create_model("internimage_q")


def test_t_forward_and_backward():
    torch.manual_seed(0)
    model = create_model("internimage_t")
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000)
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not missing


@pytest.mark.parametrize("name,overrides", [("internimage_h", TINY_H), ("internimage_g", TINY_G)])
def test_clip_projector_models_forward_and_backward(name, overrides):
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    x = torch.randn(2, 3, 64, 64)
    stages = model.forward_stages(x)
    assert [tuple(f.shape) for f in stages] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    features = model.forward_features(x)  # stage 3 pixel-shuffled to stride 16, plus stage 2, both at 1024 channels
    assert features.shape == (2, 1024, 4, 4) and model.num_features == 1024
    assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size) == (2, 768)
    logits = model.forward_head(features)
    assert logits.shape == (2, 10)
    logits.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_conv_head_models_pool_the_conv_head_output():
    model = create_model("internimage_t", **TINY, groups=(1, 2, 4, 8)).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 192, 2, 2) == (2, model.num_features, 2, 2)  # 1.5 x 8C channels at stride 32
    assert torch.equal(features, model.conv_head(model.forward_stages(x)[3]))
    assert torch.equal(model.forward_head(features, pre_logits=True), features.mean((2, 3)))


def _layer(**overrides):
    config = dict(mlp_ratio=4.0, drop_path=0.0, layer_scale=None, post_norm=False, res_post_norm=False,
                  offset_scale=1.0, dw_kernel_size=None, center_feature_scale=False, remove_center=False,
                  with_cp=False)
    from pretrain.models.internimage import InternImageLayer

    return InternImageLayer(16, 2, **{**config, **overrides})


@pytest.mark.parametrize("overrides,form", [
    (dict(layer_scale=0.5, post_norm=True), lambda l, x: (l.gamma1 * l.norm1(l.dcn(x)), lambda y: l.gamma2 * l.norm2(l.mlp(y)))),
    (dict(layer_scale=0.5, res_post_norm=True), lambda l, x: (l.gamma1 * l.dcn(l.norm1(x)), lambda y: l.gamma2 * l.mlp(l.norm2(y)))),
    (dict(post_norm=True), lambda l, x: (l.norm1(l.dcn(x)), lambda y: l.norm2(l.mlp(y)))),
    (dict(res_post_norm=True), lambda l, x: (l.res_post_norm1(l.dcn(l.norm1(x))), lambda y: l.res_post_norm2(l.mlp(l.norm2(y))))),
    (dict(), lambda l, x: (l.dcn(l.norm1(x)), lambda y: l.mlp(l.norm2(y)))),
])
def test_residual_forms_match_the_release(overrides, form):
    torch.manual_seed(0)
    layer = _layer(**overrides)
    for p in layer.parameters():  # move away from the init so every term matters
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 6, 6, 16)
    first, second = form(layer, x)
    y = x + first
    assert torch.allclose(layer(x), y + second(y), atol=1e-6)


def test_center_feature_scale_blends_projection_and_sampled_values():
    from pretrain.models.internimage import DCNv3

    torch.manual_seed(0)
    dcn = DCNv3(16, 2, center_feature_scale=True)
    x = torch.randn(1, 5, 5, 16)
    with torch.no_grad():  # bias -> +inf gives scale 1: the output is output_proj(input_proj(x))
        dcn.center_feature_scale_proj_bias.fill_(50.0)
    assert torch.allclose(dcn(x), dcn.output_proj(dcn.input_proj(x)), atol=1e-5)


def test_load_official_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create_model("internimage_h", **TINY_H).eval()
    torch.manual_seed(1)
    target = create_model("internimage_h", **TINY_H).eval()
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(source(x), target(x))
    path = tmp_path / "release.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)  # the release saves under 'model'
    result = load_official_checkpoint(target, path)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(source(x), target(x))
    wrapped = {"module": {f"module.{k}": v for k, v in source.state_dict().items()}}
    load_official_checkpoint(target, wrapped)
    assert torch.equal(source(x), target(x))


def test_activation_checkpointing_gives_the_same_gradients():
    def grads(with_cp):
        torch.manual_seed(0)
        model = create_model("internimage_h", **TINY_H, drop_path_rate=0.3, with_cp=with_cp).train()
        torch.manual_seed(1)
        model(torch.randn(2, 3, 64, 64)).square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], rtol=1e-5, atol=1e-7), name


def test_set_grad_checkpointing_switches_every_layer():
    model = create_model("internimage_t", **TINY, groups=(1, 2, 4, 8))
    model.set_grad_checkpointing(True)
    assert all(layer.with_cp for layer in model.layers())


def test_zero_init_partitions_parameters_at_construction(torchrun):
    proc = torchrun("zero_init_model.py", "internimage_h", json.dumps(dict(TINY_H, channels=32, groups=(2, 4, 8, 16))))
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["local"] <= report["total"] / 2 + 2 * 1000  # each rank holds half, up to padding
    assert report["max_materialised"] == 0  # no full tensor left on any rank after construction
    assert report["offset_abs_max"] == 0.0 and report["norm_weight_mean"] == 1.0
    assert 0.015 < report["fc1_std"] < 0.025
