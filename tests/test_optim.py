"""Parameter groups against the release's own optimiser code, parameter by parameter.

`release_lr_decay_keywords` and `release_weight_decay_and_lr` transcribe, rule for rule, `lr_decay_keywords` (spelled
`lr_decay_keywards` before 2023) in the release's classification/models/intern_image.py and `set_weight_decay_and_lr`
(with `build_optimizer`'s no_weight_decay lookup) in classification/optimizer.py, of OpenGVLab/InternImage. They match
names by substring, first key wins, as the release does; ours derives the same from the model's structure.
"""
import math

import pytest
import torch

from conftest import REPO
from pretrain.config import load_stage_config
from pretrain.engine.optim import param_groups, peak_lr, warmup_cosine
from pretrain.typed_config import ConfigError
from pretrain.models import create_model

BASE_LR = 2e-5
H_FINETUNE = REPO / "configs/internimage_h/in1k_640.yaml"  # the release's H/G fine-tuning optimiser settings
DCN_KEYWORDS = ("offset", "attention_weights", "center_feature_scale_proj", "alpha_beta")


def release_lr_decay_keywords(depths, decay_ratio):
    ratios, idx = {}, 0
    for level in (3, 2, 1, 0):
        for j in range(depths[level]):
            ratios[f"levels.{level}.blocks.{depths[level] - j - 1}."] = decay_ratio ** idx
            idx += 1
    ratios["patch_embed"] = ratios["levels.0.blocks.0."]
    for i in range(3):
        ratios[f"levels.{i}.downsample"] = ratios[f"levels.{i + 1}.blocks.0."]
        ratios[f"levels.{i}.norm"] = ratios[f"levels.{i + 1}.blocks.0."]
    return ratios


def release_weight_decay_and_lr(model, depths, weight_decay, base_lr, lr_layer_decay, decay_ratio, dcn_lr_mul):
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    skip_keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else ()
    keywords = release_lr_decay_keywords(depths, decay_ratio)  # the release rebuilds it per parameter; same dict
    result = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip or any(k in name for k in skip_keywords):
            wd = 0.0
        else:
            wd = weight_decay
        if lr_layer_decay:
            ratio = next((v for k, v in keywords.items() if k in name), None)
            lr = base_lr if ratio is None else ratio * base_lr
            if dcn_lr_mul is not None and any(k in name for k in DCN_KEYWORDS):
                lr = dcn_lr_mul * lr
        else:
            lr = base_lr
        result[name] = (lr, wd)
    return result


def ours(model, cfg) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in param_groups(model, cfg, BASE_LR) for p in g["params"]}


@pytest.mark.parametrize("name", ["internimage_t", "internimage_h", "internimage_g"])
@pytest.mark.parametrize("layer_decay", [True, False])
def test_param_groups_are_the_releases(name, layer_decay):
    overrides = [] if layer_decay else ["optim.layer_decay=null"]
    cfg = load_stage_config(H_FINETUNE, overrides)
    assert (cfg.optim.layer_decay, cfg.optim.dcn_lr_mul, cfg.optim.weight_decay) == \
        ((0.9 if layer_decay else None), 0.1, 0.05)
    with torch.device("meta"):
        model = create_model(name)
    depths = [len(level.blocks) for level in model.levels]
    expected = release_weight_decay_and_lr(model, depths, 0.05, BASE_LR, layer_decay, 0.9, 0.1)
    got = ours(model, cfg)
    assert got.keys() == expected.keys()
    wrong = [n for n in expected if got[n][1] != expected[n][1] or not math.isclose(got[n][0], expected[n][0],
                                                                                     rel_tol=1e-12)]
    assert not wrong, [(n, got[n], expected[n]) for n in wrong[:5]]
    if layer_decay:  # the rules the issue singled out, by value
        last, first = f"levels.3.blocks.{depths[3] - 1}.mlp.fc1.weight", "levels.0.blocks.0.mlp.fc1.weight"
        assert got[last][0] == BASE_LR and got[first][0] == pytest.approx(BASE_LR * 0.9 ** (sum(depths) - 1))
        assert got["patch_embed.conv1.weight"][0] == got[first][0]
        assert got["levels.1.downsample.conv.weight"][0] == got["levels.2.blocks.0.mlp.fc1.weight"][0]
        assert got["head.weight"][0] == BASE_LR and got["levels.3.norm.0.weight"][0] == BASE_LR
        assert got["levels.0.blocks.0.dcn.offset.weight"][0] == pytest.approx(0.1 * got[first][0])
        assert got["levels.0.blocks.0.dcn.mask.weight"][0] == got[first][0]  # not multiplied, as in the release
    else:
        assert {lr for lr, _ in got.values()} == {BASE_LR}  # DCN_LR_MUL sits inside the layer-decay branch


def test_center_feature_scale_weight_decays_like_the_release():
    with torch.device("meta"):
        model = create_model("internimage_h")
    got = ours(model, load_stage_config(H_FINETUNE))
    assert got["levels.0.blocks.0.dcn.center_feature_scale_proj_weight"][1] == 0.05  # 2-D: decayed
    assert got["levels.0.blocks.0.dcn.center_feature_scale_proj_bias"][1] == 0.0
    assert got["levels.0.blocks.0.norm1.0.weight"][1] == 0.0 and got["head.bias"][1] == 0.0


def test_ratios_reach_the_vision_tower_of_an_image_text_model():
    from pretrain.engine.optim import lr_ratios
    from pretrain.engine.tasks import ImageTextModel

    with torch.device("meta"):
        tower = create_model("internimage_t", channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), num_classes=8)
        model = ImageTextModel(tower, torch.nn.Linear(4, 8))
    ratios = lr_ratios(model, 0.5, 0.1)
    assert ratios == {f"visual.{k}": v for k, v in tower.lr_ratios(0.5, 0.1).items()}
    assert ratios["visual.levels.3.blocks.0.mlp.fc2.weight"] == 1.0
    assert ratios["visual.patch_embed.conv2.bias"] == 0.5 ** 4


@pytest.mark.parametrize("name", ["internimage_t", "internimage_h"])
def test_timm_s_layer_decay_counts_the_layers_the_release_s_rule_counts(name):
    """Both read InternImage.layer_order; timm counts the parameters in no layer (the heads, H's level-2 post-norms)
    as one more layer after the last, so each layer's scale is one decay step below the release's ratio."""
    import timm.optim

    with torch.device("meta"):
        model = create_model(name, channels=16, depths=(1, 1, 3, 1), groups=(1, 2, 4, 8), num_classes=8,
                             **({"level2_post_norm_block_ids": [2]} if name == "internimage_h" else {}))
    ratios = model.lr_ratios(0.5)
    names = {id(param): n for n, param in model.named_parameters()}
    timm_scales = {names[id(param)]: group["lr_scale"] for group in timm.optim.param_groups_layer_decay(
        model, layer_decay=0.5) for param in group["params"]}
    assert {n: scale for n, scale in timm_scales.items() if n in ratios} == {n: r * 0.5 for n, r in ratios.items()}
    unlayered = set(timm_scales) - set(ratios)
    assert {n.split(".")[0] for n in unlayered} >= {"head"} and {timm_scales[n] for n in unlayered} == {1.0}
    assert ratios["levels.1.downsample.conv.weight"] == ratios["levels.2.blocks.0.norm1.0.weight"] == 0.5 ** 3


def test_warmup_then_cosine_to_the_floor():
    assert [warmup_cosine(s, 4, 10, 0.1) for s in (0, 3)] == [0.25, 1.0]
    assert warmup_cosine(7, 4, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(10, 4, 10, 0.1) == pytest.approx(0.1)


PRETRAIN_H = REPO / "configs/internimage_h/pretrain_laion_yfcc_cc12m.yaml"


def test_steps_and_warmup_follow_from_epochs_and_the_global_batch():
    cfg = load_stage_config(PRETRAIN_H)
    per_epoch = 427_000_000 // 32_768  # whole global batches, as the release's drop_last loader counts them
    assert (per_epoch, cfg.max_steps, cfg.optim.warmup_steps) == (13_031, 30 * 13_031, 13_031)
    assert load_stage_config(PRETRAIN_H, ["max_steps=8"]).max_steps == 8  # a given max_steps wins: smoke tests
    with pytest.raises(ConfigError, match=r"optim.warmup_steps \(10\) disagrees with warmup_epochs \(1.0 = 13031"):
        load_stage_config(PRETRAIN_H, ["optim.warmup_steps=10"])
    with pytest.raises(ConfigError, match="epochs and warmup_epochs need global_batch"):
        load_stage_config(PRETRAIN_H, ["global_batch=null"])


def test_a_world_that_misses_the_declared_global_batch_stops_at_start_up():
    cfg = load_stage_config(PRETRAIN_H)
    assert peak_lr(cfg, 128) == 5e-4  # 16 nodes x 8 GPUs x 256 pairs
    with pytest.raises(ConfigError, match="global_batch is 32768, but batch_size 256 x 64 ranks x optim.grad_accum"):
        peak_lr(cfg, 64)
