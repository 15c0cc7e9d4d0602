"""timm's contract on tiny InternImages: pretrained weights from a local release file, the feature API, the release's
eval transform from the pretrained config, and scripting / fx tracing with the DCNv3 custom op. (timm's own model test
suite runs on internimage_t/_s with tools/timm_model_tests.sh.)"""
import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.models import create_feature_extractor

from pretrain.models import create_model

TINY = dict(channels=16, depths=(1, 1, 3, 1), groups=(2, 4, 8, 16), num_classes=10)
TINY_H = dict(TINY, level2_post_norm_block_ids=[1])
RELEASE_H = "https://huggingface.co/OpenGVLab/InternImage/resolve/main/internimage_h_22kto1k_640.pth"


@pytest.fixture
def release_file(tmp_path):
    """A tiny H saved the way the release saves its checkpoints: the state dict under 'model'."""
    torch.manual_seed(0)
    source = create_model("internimage_h", **TINY_H).eval()
    path = tmp_path / "internimage_h_22kto1k_640.pth"
    torch.save({"model": source.state_dict(), "epoch": 19}, path)
    return source, path


def test_pretrained_loads_a_release_file(release_file):
    source, path = release_file
    model = timm.create_model("internimage_h", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **TINY_H).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), source(x))
    # Another number of classes: everything but the fresh classifier comes from the file.
    other = timm.create_model("internimage_h", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **{**TINY_H, "num_classes": 3}).eval()
    assert torch.equal(other.forward_head(other.forward_features(x), pre_logits=True),
                       source.forward_head(source.forward_features(x), pre_logits=True))
    assert other(x).shape == (1, 3)


def test_pretrained_without_a_file_says_where_the_weights_are():
    with pytest.raises(ValueError, match=f"download {RELEASE_H} and pass pretrained_cfg_overlay=dict"):
        timm.create_model("internimage_h", pretrained=True)


def test_features_only_through_timms_feature_api(release_file):
    source, path = release_file
    model = timm.create_model("internimage_h", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              features_only=True, out_indices=(1, 3), **TINY_H).eval()
    assert model.feature_info.channels() == [32, 128] and model.feature_info.reduction() == [8, 32]
    assert model.feature_info.module_name() == ["levels.1", "levels.3"]
    x = torch.randn(2, 3, 64, 64)
    stages = source.forward_stages(x)
    features = model(x)
    assert len(features) == 2 and torch.equal(features[0], stages[1]) and torch.equal(features[1], stages[3])
    assert not any(n.startswith(("head", "clip_projector", "dcnv3_head")) for n, _ in model.named_parameters())


@pytest.mark.parametrize("name,size", [("internimage_t", 224), ("internimage_l", 384), ("internimage_h", 640),
                                       ("internimage_g", 512)])
def test_pretrained_cfg_gives_the_releases_eval_transform(name, size):
    with torch.device("meta"):
        model = timm.create_model(name)
    config = resolve_data_config(model=model)
    assert config == {"input_size": (3, size, size), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                      "std": (0.229, 0.224, 0.225), "crop_pct": 1.0, "crop_mode": "center"}
    resize, crop = create_transform(**config).transforms[:2]  # the release's TEST.CROP: Resize(size), CenterCrop(size)
    assert (resize.size, crop.size) == (size, (size, size))


def test_forward_api_follows_timm():
    torch.manual_seed(0)
    model = create_model("internimage_h", **TINY_H).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    final, intermediates = model.forward_intermediates(x)
    assert torch.equal(final, features)
    assert all(torch.equal(a, b) for a, b in zip(intermediates, model.forward_stages(x)))
    assert [t.shape[1] for t in model.forward_intermediates(x, indices=2, intermediates_only=True)] == [64, 128]
    pooled = model.forward_head(features, pre_logits=True)
    model.reset_classifier(0)
    assert torch.equal(model(x), pooled) and model.head_hidden_size == 768
    model.reset_classifier(5, "avg")
    assert model(x).shape == (2, 5) and model.head_hidden_size == model.num_features == 1024
    model.reset_classifier(0, "")
    assert torch.equal(model(x), features)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(0, "max")


@pytest.mark.parametrize("name,overrides", [("internimage_h", TINY_H), ("internimage_s", dict(TINY, layer_scale=0.1))])
def test_scripted_and_fx_traced_models_match_eager(name, overrides):
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        traced = create_feature_extractor(model, {"head": "logits"})  # DCNv3 stays one leaf call, as timm registers it
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(traced(x)["logits"], expected)
    assert "pretrain::dcnv3" in str(scripted.inlined_graph)  # the custom op itself, not a Python fallback


def test_pretrain_and_timm_build_through_one_path():
    torch.manual_seed(0)
    ours = create_model("internimage_t", **TINY)
    torch.manual_seed(0)
    theirs = timm.create_model("internimage_t", **TINY)
    assert ours.pretrained_cfg == theirs.pretrained_cfg and ours.pretrained_cfg["architecture"] == "internimage_t"
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    with torch.device("meta"):
        model = create_model("internimage_s", layer_scale=None)  # a None override reaches the model (timm drops them)
    assert model.levels[0].blocks[0].gamma1 is None
