"""InternImage: large-scale vision foundation models with deformable convolutions (arXiv 2211.05778).

Reproduces the released family T/S/B/L/XL/H/G to the parameter, with the release's state_dict key names so released
checkpoints load without conversion. Activations between blocks are channels-last (N, H, W, C).

The file reads top-down: norms, stem, DCNv3 module, MLP, layer, stage, attention-pooling head, model; then weight
init, the checkpoint loader, the config table and the `@register_model` factories.
"""
import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath
from timm.models import register_model

from pretrain.ops import dcnv3

LN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Norms. The release wraps each norm in an nn.Sequential with permutes around it, so its keys carry an index
# (`norm1.0.weight`, `patch_embed.norm1.1.weight`). These wrappers keep those key names and do the permutes in forward.


class ChannelsLastNorm(nn.Sequential):
    """LayerNorm over the last dim of an (N, H, W, C) tensor; keys `<name>.0.*`."""

    def __init__(self, dim: int):
        super().__init__(nn.LayerNorm(dim, eps=LN_EPS))


class ChannelsFirstToLastNorm(nn.Module):
    """(N, C, H, W) in, LayerNorm, (N, H, W, C) out when `to_last`, else back to (N, C, H, W); keys `<name>.1.*`."""

    def __init__(self, dim: int, to_last: bool):
        super().__init__()
        self.to_last = to_last
        # Index 0 is the release's parameter-free permute module; registering None keeps `1` as the norm's key.
        self.register_module("0", None)
        self.register_module("1", nn.LayerNorm(dim, eps=LN_EPS))

    def forward(self, x):
        x = getattr(self, "1")(x.permute(0, 2, 3, 1))
        return x if self.to_last else x.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Stem and downsampling


class Stem(nn.Module):
    """Two stride-2 3x3 convs to stride 4: (N, 3, H, W) -> (N, H/4, W/4, C)."""

    def __init__(self, in_chans: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, channels // 2, 3, stride=2, padding=1)
        self.norm1 = ChannelsFirstToLastNorm(channels // 2, to_last=False)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1)
        self.norm2 = ChannelsFirstToLastNorm(channels, to_last=True)

    def forward(self, x):
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """Stride-2 3x3 conv doubling the channels: (N, H, W, C) -> (N, H/2, W/2, 2C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = ChannelsFirstToLastNorm(2 * channels, to_last=True)

    def forward(self, x):
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------------------------------
# The DCNv3 module


class DCNv3(nn.Module):
    """Deformable convolution v3 over (N, H, W, C): offsets and per-point weights come from a depthwise conv of the input."""

    def __init__(self, channels: int, group: int, offset_scale: float = 1.0, kernel_size: int = 3,
                 dw_kernel_size: int | None = None, center_feature_scale: bool = False, remove_center: bool = False):
        super().__init__()
        if channels % group:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        self.channels, self.group, self.group_channels = channels, group, channels // group
        self.kernel_size, self.offset_scale, self.remove_center = kernel_size, offset_scale, remove_center
        self.points = kernel_size * kernel_size - int(remove_center)
        dw_kernel_size = dw_kernel_size or kernel_size

        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels),
            ChannelsFirstToLastNorm(channels, to_last=True),
            nn.GELU(),
        )
        self.offset = nn.Linear(channels, group * self.points * 2)
        self.mask = nn.Linear(channels, group * self.points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.center_feature_scale = center_feature_scale
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))

    def reset_parameters(self):
        """The release's init: offsets and mask logits start at zero, i.e. a plain 3x3 grid with uniform weights."""
        for linear in (self.offset, self.mask):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x):
        value = self.input_proj(x)
        features = self.dw_conv(x.permute(0, 3, 1, 2))  # from the raw input, as in the release
        offset = self.offset(features)
        mask_logits = self.mask(features)  # the kernel softmaxes each group's P logits itself (mask_softmax=True)
        pad = (self.kernel_size - 1) // 2
        y = dcnv3(value, offset, mask_logits, self.kernel_size, self.kernel_size, 1, 1, pad, pad, 1, 1,
                  self.group, self.group_channels, self.offset_scale, self.remove_center, mask_softmax=True)
        if self.center_feature_scale:
            scale = torch.sigmoid(F.linear(features, self.center_feature_scale_proj_weight,
                                           self.center_feature_scale_proj_bias))
            scale = scale.repeat_interleave(self.group_channels, dim=-1)
            y = y * (1 - scale) + value * scale
        return self.output_proj(y)


class Mlp(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------------------------
# Layer and stage


class InternImageLayer(nn.Module):
    """DCNv3 + MLP with residuals; the residual form depends on layer_scale / post_norm / res_post_norm (see forward)."""

    def __init__(self, channels: int, group: int, mlp_ratio: float, drop_path: float, layer_scale: float | None,
                 post_norm: bool, res_post_norm: bool, offset_scale: float, dw_kernel_size: int | None,
                 center_feature_scale: bool, remove_center: bool, with_cp: bool):
        super().__init__()
        self.post_norm, self.with_cp = post_norm, with_cp
        self.norm1 = ChannelsLastNorm(channels)
        self.dcn = DCNv3(channels, group, offset_scale, dw_kernel_size=dw_kernel_size,
                         center_feature_scale=center_feature_scale, remove_center=remove_center)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = ChannelsLastNorm(channels)
        self.mlp = Mlp(channels, int(channels * mlp_ratio))
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((channels,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((channels,), float(layer_scale)))
        self.res_post_norm = res_post_norm
        if res_post_norm:
            self.res_post_norm1 = ChannelsLastNorm(channels)
            self.res_post_norm2 = ChannelsLastNorm(channels)

    def residual_branches(self):
        """The two residual branches (token mixing, channel mixing) in the form the config selects."""
        dcn, mlp, norm1, norm2 = self.dcn, self.mlp, self.norm1, self.norm2
        if self.layer_scale and self.post_norm:  # S, B, L, XL
            return (lambda x: self.gamma1 * norm1(dcn(x))), (lambda x: self.gamma2 * norm2(mlp(x)))
        if self.layer_scale:  # res_post_norm is ignored here, as in the release
            return (lambda x: self.gamma1 * dcn(norm1(x))), (lambda x: self.gamma2 * mlp(norm2(x)))
        if self.post_norm:  # G
            return (lambda x: norm1(dcn(x))), (lambda x: norm2(mlp(x)))
        if self.res_post_norm:  # H
            return (lambda x: self.res_post_norm1(dcn(norm1(x)))), (lambda x: self.res_post_norm2(mlp(norm2(x))))
        return (lambda x: dcn(norm1(x))), (lambda x: mlp(norm2(x)))  # T

    def _forward(self, x):
        token_mixing, channel_mixing = self.residual_branches()
        x = x + self.drop_path(token_mixing(x))
        return x + self.drop_path(channel_mixing(x))

    def forward(self, x):
        if self.with_cp and torch.is_grad_enabled() and x.requires_grad:
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class InternImageStage(nn.Module):
    """`depth` layers, optional post-norms after chosen layers, an optional final norm, then an optional downsample."""

    def __init__(self, channels: int, depth: int, group: int, drop_path: Sequence[float], downsample: bool,
                 post_norm: bool, center_feature_scale: bool, post_norm_block_ids: Sequence[int] | None,
                 **layer_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(
            InternImageLayer(channels, group, drop_path=drop_path[i], post_norm=post_norm,
                             center_feature_scale=center_feature_scale, **layer_kwargs)
            for i in range(depth)
        )
        self.post_norm_block_ids = list(post_norm_block_ids or [])
        if self.post_norm_block_ids:
            self.post_norms = nn.ModuleList(ChannelsLastNorm(channels) for _ in self.post_norm_block_ids)
        self.has_norm = not post_norm or center_feature_scale
        if self.has_norm:
            self.norm = ChannelsLastNorm(channels)
        self.downsample = Downsample(channels) if downsample else None

    def forward(self, x):
        """Returns (stage output before downsampling, input of the next stage)."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(i)](x)
        if self.has_norm:
            x = self.norm(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


# ---------------------------------------------------------------------------------------------------------------------
# The H/G head: attention pooling whose query is the mean token


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys and values; q/k/v biases are separate parameters (release keys)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def _heads(self, x, linear, bias):
        # Calling the bias-free Linear module (rather than F.linear on its weight) lets ZeRO-3's module hooks gather it.
        b, n, _ = x.shape
        return (linear(x) + bias).view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, q, k, v):
        q, k, v = self._heads(q, self.q, self.q_bias), self._heads(k, self.k, self.k_bias), self._heads(v, self.v, self.v_bias)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        x = (attn @ v).transpose(1, 2).flatten(2)
        return self.proj(x)


class AttentionPooling(nn.Module):
    """(N, L, dim) tokens -> (N, out_dim): one query, the mean token, attends over all tokens."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.norm1_q = ChannelsLastNorm(dim)
        self.norm1_k = ChannelsLastNorm(dim)
        self.norm1_v = ChannelsLastNorm(dim)
        self.cross_dcn = CrossAttention(dim, num_heads, out_dim)

    def forward(self, x):
        query = self.norm1_q(x.mean(1, keepdim=True))
        return self.cross_dcn(query, self.norm1_k(x), self.norm1_v(x)).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# The model


class InternImage(nn.Module):
    """InternImage backbone and classifier.

    `forward_features` returns the four stage outputs (N, C_i, H/2^(i+2), W/2^(i+2)) for dense prediction;
    `forward_head` turns them into logits (or, with num_classes=0, the pooled embedding).
    """

    CLIP_EMBED_DIM, PRETRAIN_EMBED_DIM, ATTN_POOL_HEADS = 768, 1024, 16
    CONV_HEAD_SCALE = 1.5

    def __init__(self, channels: int = 64, depths: Sequence[int] = (4, 4, 18, 4), groups: Sequence[int] = (4, 8, 16, 32),
                 num_classes: int = 1000, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 layer_scale: float | None = None, offset_scale: float = 1.0, post_norm: bool = False,
                 res_post_norm: bool = False, dw_kernel_size: int | None = None, level2_post_norm: bool = False,
                 level2_post_norm_block_ids: Sequence[int] | None = None, center_feature_scale: bool = False,
                 use_clip_projector: bool = False, remove_center: bool = False, with_cp: bool = False,
                 in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.use_clip_projector = use_clip_projector
        self.stage_channels = [channels * 2 ** i for i in range(len(depths))]
        self.num_features = self.stage_channels[-1]
        self.grad_checkpointing = with_cp

        self.patch_embed = Stem(in_chans, channels)
        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.levels = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.levels.append(InternImageStage(
                self.stage_channels[i], depth, groups[i], drop_path[first:first + depth],
                downsample=i < len(depths) - 1, post_norm=post_norm, center_feature_scale=center_feature_scale,
                post_norm_block_ids=level2_post_norm_block_ids if (i == 2 and level2_post_norm) else None,
                mlp_ratio=mlp_ratio, layer_scale=layer_scale, res_post_norm=res_post_norm, offset_scale=offset_scale,
                dw_kernel_size=dw_kernel_size, remove_center=remove_center, with_cp=with_cp,
            ))

        if use_clip_projector:
            self.head_dim = self.CLIP_EMBED_DIM
            self.dcnv3_head_x4 = nn.Sequential(nn.Conv2d(self.num_features, self.PRETRAIN_EMBED_DIM * 4, 1),
                                               nn.PixelShuffle(2))
            self.dcnv3_head_x3 = nn.Conv2d(self.num_features // 2, self.PRETRAIN_EMBED_DIM, 1)
            self.clip_projector = AttentionPooling(self.PRETRAIN_EMBED_DIM, self.ATTN_POOL_HEADS, self.CLIP_EMBED_DIM)
            self.fc_norm = ChannelsLastNorm(self.CLIP_EMBED_DIM)
        else:
            self.head_dim = int(self.num_features * self.CONV_HEAD_SCALE)
            self.conv_head = nn.Sequential(nn.Conv2d(self.num_features, self.head_dim, 1, bias=False),
                                           nn.Sequential(nn.BatchNorm2d(self.head_dim)), nn.GELU())
        self.head = nn.Linear(self.head_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    # -- the shared interface (timm-style)

    def forward_features(self, x) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        outputs = []
        for level in self.levels:
            out, x = level(x)
            outputs.append(out.permute(0, 3, 1, 2))
        return outputs

    def forward_head(self, features: list[torch.Tensor], pre_logits: bool = False):
        if self.use_clip_projector:
            x = self.dcnv3_head_x4(features[3]) + self.dcnv3_head_x3(features[2])
            x = self.fc_norm(self.clip_projector(x.flatten(2).transpose(1, 2)))
        else:
            x = self.conv_head(features[3]).mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for layer in self.layers():
            layer.with_cp = enable

    def layers(self) -> list[InternImageLayer]:
        return [block for level in self.levels for block in level.blocks]

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_weights(self.head)

    def group_matcher(self, coarse: bool = False):
        """Parameter-name patterns ordered from input to output (timm's interface, used for layer-wise lr decay)."""
        return {
            "stem": r"^patch_embed",
            "blocks": r"^levels\.(\d+)" if coarse else [
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^levels\.(\d+)\.(post_norms|norm|downsample)", (99999,)),
            ],
        }

    def no_weight_decay_keywords(self) -> set[str]:
        return {"gamma1", "gamma2", "norm", "bias", "center_feature_scale_proj"}


def init_weights(module: nn.Module):
    """The release's init: trunc-normal(0.02) Linear weights, zero biases, unit norms; DCNv3's own init on top
    (`apply` visits children first, so DCNv3.reset_parameters overrides its Linears' generic init)."""
    if isinstance(module, (nn.Linear, nn.LayerNorm, DCNv3)):
        with _gathered_for_init(module):
            _init_module(module)


def _gathered_for_init(module: nn.Module):
    """Under deepspeed.zero.Init parameters are partitioned as soon as each submodule is built, so initialising them
    afterwards needs that module's parameters gathered (one small module at a time, never the whole model)."""
    params = list(module.parameters())
    if not hasattr(params[0], "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _init_module(module: nn.Module):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, DCNv3):
        module.reset_parameters()


# ---------------------------------------------------------------------------------------------------------------------
# Released checkpoints


def load_official_checkpoint(model: InternImage, path_or_state_dict, strict: bool = True):
    """Load a released InternImage checkpoint: a state dict, or one under 'model'/'module' (DeepSpeed/EMA saves).

    The key names are the release's, so no mapping is needed. A checkpoint trained for another number of classes loads
    with strict=False after `reset_classifier`; the returned object lists what did not match.
    """
    state = path_or_state_dict
    if isinstance(state, (str, Path)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return model.load_state_dict(state, strict=strict)


# ---------------------------------------------------------------------------------------------------------------------
# The family: released hyper-parameters


def _level2_ids(step: int, depth: int) -> list[int]:
    return list(range(step - 1, depth, step))


MODEL_CONFIGS = {
    "internimage_t": dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), offset_scale=1.0,
                          drop_path_rate=0.1),
    "internimage_s": dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), offset_scale=1.0,
                          layer_scale=1e-5, post_norm=True, drop_path_rate=0.4),
    "internimage_b": dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), offset_scale=1.0,
                          layer_scale=1e-5, post_norm=True, drop_path_rate=0.5),
    "internimage_l": dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), offset_scale=2.0,
                          layer_scale=1e-5, post_norm=True, drop_path_rate=0.1),
    "internimage_xl": dict(channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96), offset_scale=2.0,
                           layer_scale=1e-5, post_norm=True, drop_path_rate=0.2),
    "internimage_h": dict(channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80), offset_scale=1.0,
                          res_post_norm=True, dw_kernel_size=5, level2_post_norm=True,
                          level2_post_norm_block_ids=_level2_ids(6, 32), center_feature_scale=True,
                          use_clip_projector=True, drop_path_rate=0.2),
    "internimage_g": dict(channels=512, depths=(2, 2, 48, 4), groups=(16, 32, 64, 128), offset_scale=1.0,
                          post_norm=True, dw_kernel_size=5, level2_post_norm=True,
                          level2_post_norm_block_ids=_level2_ids(6, 48), center_feature_scale=True,
                          use_clip_projector=True, drop_path_rate=0.4),
}


def _create(name: str, **overrides) -> InternImage:
    # timm.create_model passes its pretrained-config plumbing; released weights are loaded explicitly instead.
    for timm_only in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        overrides.pop(timm_only, None)
    return InternImage(**{**MODEL_CONFIGS[name], **overrides})


@register_model
def internimage_t(**kwargs) -> InternImage:
    return _create("internimage_t", **kwargs)


@register_model
def internimage_s(**kwargs) -> InternImage:
    return _create("internimage_s", **kwargs)


@register_model
def internimage_b(**kwargs) -> InternImage:
    return _create("internimage_b", **kwargs)


@register_model
def internimage_l(**kwargs) -> InternImage:
    return _create("internimage_l", **kwargs)


@register_model
def internimage_xl(**kwargs) -> InternImage:
    return _create("internimage_xl", **kwargs)


@register_model
def internimage_h(**kwargs) -> InternImage:
    return _create("internimage_h", **kwargs)


@register_model
def internimage_g(**kwargs) -> InternImage:
    return _create("internimage_g", **kwargs)
