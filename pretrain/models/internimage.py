"""InternImage: large-scale vision foundation models with deformable convolutions (arXiv 2211.05778).

Reproduces the released family T/S/B/L/XL/H/G to the parameter, with the release's state_dict key names so released
checkpoints load without conversion. Activations between blocks are channels-last (N, H, W, C).

The file reads top-down: norms, stem, DCNv3 module, MLP, layer, stage, attention-pooling head, model; then weight
init, the checkpoint loader, the config table, timm's pretrained configs and the `@register_model` factories. Every
module takes `device`/`dtype`, so a model builds on the meta device or inside `deepspeed.zero.Init` for free; the
whole model is TorchScript-able and fx-traceable (DCNv3 is an fx leaf, as timm does for its own custom ops).
"""
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices

from pretrain.ops import dcnv3
from pretrain.zero3 import gathered_for_writing

LN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Norms. The release wraps each norm in an nn.Sequential with permutes around it, so its keys carry an index
# (`norm1.0.weight`, `patch_embed.norm1.1.weight`); these Sequentials have the same layout.


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return x.permute(self.dims)


class ChannelsLastNorm(nn.Sequential):
    """LayerNorm over the last dim of an (N, H, W, C) tensor; keys `<name>.0.*`."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__(nn.LayerNorm(dim, eps=LN_EPS, device=device, dtype=dtype))


class ChannelsFirstNorm(nn.Sequential):
    """(N, C, H, W) in, LayerNorm over C; out (N, H, W, C) when `to_last`, else (N, C, H, W); keys `<name>.1.*`."""

    def __init__(self, dim: int, to_last: bool, device=None, dtype=None):
        layers = [Permute(0, 2, 3, 1), nn.LayerNorm(dim, eps=LN_EPS, device=device, dtype=dtype)]
        super().__init__(*layers, *([] if to_last else [Permute(0, 3, 1, 2)]))


# ---------------------------------------------------------------------------------------------------------------------
# Stem and downsampling


class Stem(nn.Module):
    """Two stride-2 3x3 convs to stride 4: (N, 3, H, W) -> (N, H/4, W/4, C)."""

    def __init__(self, in_chans: int, channels: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_chans, channels // 2, 3, stride=2, padding=1, **dd)
        self.norm1 = ChannelsFirstNorm(channels // 2, to_last=False, **dd)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1, **dd)
        self.norm2 = ChannelsFirstNorm(channels, to_last=True, **dd)

    def forward(self, x):
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """Stride-2 3x3 conv doubling the channels: (N, H, W, C) -> (N, H/2, W/2, 2C)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False, device=device, dtype=dtype)
        self.norm = ChannelsFirstNorm(2 * channels, to_last=True, device=device, dtype=dtype)

    def forward(self, x):
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------------------------------
# The DCNv3 module


@register_notrace_module  # fx sees it as one call: the op's argument checks read tensor shapes
class DCNv3(nn.Module):
    """Deformable convolution v3 over (N, H, W, C): offsets and per-point weights come from a depthwise conv of the input."""

    def __init__(self, channels: int, group: int, offset_scale: float = 1.0, kernel_size: int = 3,
                 dw_kernel_size: int | None = None, center_feature_scale: bool = False, remove_center: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if channels % group:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        dd = dict(device=device, dtype=dtype)
        self.channels, self.group, self.group_channels = channels, group, channels // group
        self.kernel_size, self.offset_scale, self.remove_center = kernel_size, offset_scale, remove_center
        self.pad = (kernel_size - 1) // 2
        # The custom op's integer arguments, in the release's order (kernel, stride, pad, dilation, group, channels).
        self.layout = [kernel_size, kernel_size, 1, 1, self.pad, self.pad, 1, 1, group, self.group_channels]
        self.points = kernel_size * kernel_size - int(remove_center)
        dw_kernel_size = dw_kernel_size or kernel_size

        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels, **dd),
            ChannelsFirstNorm(channels, to_last=True, **dd),
            nn.GELU(),
        )
        self.offset = nn.Linear(channels, group * self.points * 2, **dd)
        self.mask = nn.Linear(channels, group * self.points, **dd)
        self.input_proj = nn.Linear(channels, channels, **dd)
        self.output_proj = nn.Linear(channels, channels, **dd)
        self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels, **dd)) \
            if center_feature_scale else None
        self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **dd)) if center_feature_scale else None

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
        # The kernel softmaxes each group's P mask logits itself.
        y = self._sample(value, self.offset(features), self.mask(features))
        if self.center_feature_scale_proj_weight is not None:
            scale = torch.sigmoid(F.linear(features, self.center_feature_scale_proj_weight,
                                           self.center_feature_scale_proj_bias))
            # Each group's scale over its channels; not repeat_interleave, whose ONNX export is a misshapen Tile.
            scale = scale[..., None].expand(-1, -1, -1, -1, self.group_channels).flatten(-2)
            y = y * (1 - scale) + value * scale
        return self.output_proj(y)

    def _sample(self, value, offset, mask_logits):
        if torch.jit.is_scripting():  # TorchScript calls the custom op itself, so it needs the compiled kernels
            return torch.ops.pretrain.dcnv3(value, offset, mask_logits, self.layout, self.offset_scale,
                                            self.remove_center, True)
        k, pad = self.kernel_size, self.pad
        return dcnv3(value, offset, mask_logits, k, k, 1, 1, pad, pad, 1, 1, self.group, self.group_channels,
                     self.offset_scale, self.remove_center, mask_softmax=True)

    def lr_scaled_parameters(self) -> list[str]:
        """What the release's DCN_LR_MUL scales (names with `offset` or `center_feature_scale_proj`; not `mask`)."""
        names = ["offset.weight", "offset.bias"]
        if self.center_feature_scale_proj_weight is not None:
            names += ["center_feature_scale_proj_weight", "center_feature_scale_proj_bias"]
        return names


class Mlp(nn.Module):
    def __init__(self, channels: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------------------------
# Layer and stage


class InternImageLayer(nn.Module):
    """DCNv3 + MLP with residuals. The release's five residual forms, branch f being the DCN or the MLP:
    layer scale + post-norm (S/B/L/XL): x + gamma*norm(f(x)); layer scale: x + gamma*f(norm(x)) (res_post_norm is
    ignored); post-norm (G): x + norm(f(x)); res-post-norm (H): x + res_post_norm(f(norm(x))); T: x + f(norm(x))."""

    def __init__(self, channels: int, group: int, mlp_ratio: float, drop_path: float, layer_scale: float | None,
                 post_norm: bool, res_post_norm: bool, offset_scale: float, dw_kernel_size: int | None,
                 center_feature_scale: bool, remove_center: bool, with_cp: bool, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.post_norm, self.with_cp = post_norm, with_cp
        self.norm1 = ChannelsLastNorm(channels, **dd)
        self.dcn = DCNv3(channels, group, offset_scale, dw_kernel_size=dw_kernel_size,
                         center_feature_scale=center_feature_scale, remove_center=remove_center, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = ChannelsLastNorm(channels, **dd)
        self.mlp = Mlp(channels, int(channels * mlp_ratio), **dd)
        with_scale = layer_scale is not None
        self.gamma1 = nn.Parameter(torch.full((channels,), float(layer_scale), **dd)) if with_scale else None
        self.gamma2 = nn.Parameter(torch.full((channels,), float(layer_scale), **dd)) if with_scale else None
        self.res_post_norm1 = ChannelsLastNorm(channels, **dd) if res_post_norm else None
        self.res_post_norm2 = ChannelsLastNorm(channels, **dd) if res_post_norm else None

    def _token_mixing(self, x):
        if self.post_norm:
            y = self.norm1(self.dcn(x))
        else:
            y = self.dcn(self.norm1(x))
            if self.gamma1 is None and self.res_post_norm1 is not None:
                y = self.res_post_norm1(y)
        if self.gamma1 is not None:
            y = self.gamma1 * y
        return y

    def _channel_mixing(self, x):
        if self.post_norm:
            y = self.norm2(self.mlp(x))
        else:
            y = self.mlp(self.norm2(x))
            if self.gamma2 is None and self.res_post_norm2 is not None:
                y = self.res_post_norm2(y)
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return y

    def _forward(self, x):
        x = x + self.drop_path(self._token_mixing(x))
        return x + self.drop_path(self._channel_mixing(x))

    def forward(self, x):
        if self.with_cp and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class InternImageStage(nn.Module):
    """`depth` layers, optional post-norms after chosen layers, an optional final norm, then an optional downsample."""

    def __init__(self, channels: int, depth: int, group: int, drop_path: Sequence[float], downsample: bool,
                 post_norm: bool, center_feature_scale: bool, post_norm_block_ids: Sequence[int] | None,
                 device=None, dtype=None, **layer_kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.blocks = nn.ModuleList(
            InternImageLayer(channels, group, drop_path=drop_path[i], post_norm=post_norm,
                             center_feature_scale=center_feature_scale, **layer_kwargs, **dd)
            for i in range(depth)
        )
        self.post_norm_block_ids = list(post_norm_block_ids or [])
        self.post_norms = nn.ModuleList(ChannelsLastNorm(channels, **dd) for _ in self.post_norm_block_ids)
        # The release builds this norm only for pre-norm or center-feature-scale models (T, H, G).
        self.norm = ChannelsLastNorm(channels, **dd) if not post_norm or center_feature_scale else nn.Identity()
        self.downsample = Downsample(channels, **dd) if downsample else None

    def forward(self, x):
        """Returns (stage output before downsampling, input of the next stage)."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            for k, post_norm in enumerate(self.post_norms):  # TorchScript cannot index a ModuleList by a variable
                if self.post_norm_block_ids[k] == i:
                    x = post_norm(x)
        x = self.norm(x)
        if self.downsample is not None:
            return x, self.downsample(x)
        return x, x


# ---------------------------------------------------------------------------------------------------------------------
# The H/G head: attention pooling whose query is the mean token


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys and values; q/k/v biases are separate parameters (release keys)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False, **dd)
        self.k = nn.Linear(dim, dim, bias=False, **dd)
        self.v = nn.Linear(dim, dim, bias=False, **dd)
        self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.k_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.proj = nn.Linear(dim, out_dim, **dd)

    def _heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, q, k, v):
        # Calling the bias-free Linear modules (rather than F.linear on their weights) lets ZeRO-3's hooks gather them.
        q, k, v = (self._heads(self.q(q) + self.q_bias), self._heads(self.k(k) + self.k_bias),
                   self._heads(self.v(v) + self.v_bias))
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        x = (attn @ v).transpose(1, 2).flatten(2)
        return self.proj(x)


class AttentionPooling(nn.Module):
    """(N, L, dim) tokens -> (N, out_dim): one query, the mean token, attends over all tokens."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1_q = ChannelsLastNorm(dim, **dd)
        self.norm1_k = ChannelsLastNorm(dim, **dd)
        self.norm1_v = ChannelsLastNorm(dim, **dd)
        self.cross_dcn = CrossAttention(dim, num_heads, out_dim, **dd)

    def forward(self, x):
        query = self.norm1_q(x.mean(1, keepdim=True))
        return self.cross_dcn(query, self.norm1_k(x), self.norm1_v(x)).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# The model


class InternImage(nn.Module):
    """InternImage backbone and classifier, with timm's model interface.

    `forward_stages` gives the four stage outputs (N, C_i, H/2^(i+2), W/2^(i+2)) that detection and segmentation necks
    take. `forward_features` gives the unpooled map the head pools: the conv head's output (T/S/B/L/XL, stride 32) or
    the fused stride-16 map of stages 2 and 3 (H/G). `forward_head` pools it (global average, or H/G's attention
    pooling) into the pre-logits and applies the classifier.
    """

    CLIP_EMBED_DIM, PRETRAIN_EMBED_DIM, ATTN_POOL_HEADS = 768, 1024, 16
    CONV_HEAD_SCALE = 1.5

    def __init__(self, channels: int = 64, depths: Sequence[int] = (4, 4, 18, 4), groups: Sequence[int] = (4, 8, 16, 32),
                 num_classes: int = 1000, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 layer_scale: float | None = None, offset_scale: float = 1.0, post_norm: bool = False,
                 res_post_norm: bool = False, dw_kernel_size: int | None = None, level2_post_norm: bool = False,
                 level2_post_norm_block_ids: Sequence[int] | None = None, center_feature_scale: bool = False,
                 use_clip_projector: bool = False, remove_center: bool = False, with_cp: bool = False,
                 in_chans: int = 3, global_pool: str | None = None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_chans = in_chans
        stage_channels = [channels * 2 ** i for i in range(len(depths))]
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"levels.{i}")
                             for i, c in enumerate(stage_channels)]
        self.grad_checkpointing = with_cp

        self.patch_embed = Stem(in_chans, channels, **dd)
        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.levels = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.levels.append(InternImageStage(
                stage_channels[i], depth, groups[i], drop_path[first:first + depth],
                downsample=i < len(depths) - 1, post_norm=post_norm, center_feature_scale=center_feature_scale,
                post_norm_block_ids=level2_post_norm_block_ids if (i == 2 and level2_post_norm) else None,
                mlp_ratio=mlp_ratio, layer_scale=layer_scale, res_post_norm=res_post_norm, offset_scale=offset_scale,
                dw_kernel_size=dw_kernel_size, remove_center=remove_center, with_cp=with_cp, **dd,
            ))

        self.conv_head = self.dcnv3_head_x4 = self.dcnv3_head_x3 = self.clip_projector = self.fc_norm = None
        if use_clip_projector:
            embed = self.PRETRAIN_EMBED_DIM
            self.dcnv3_head_x4 = nn.Sequential(nn.Conv2d(stage_channels[-1], embed * 4, 1, **dd), nn.PixelShuffle(2))
            self.dcnv3_head_x3 = nn.Conv2d(stage_channels[-2], embed, 1, **dd)
            self.clip_projector = AttentionPooling(embed, self.ATTN_POOL_HEADS, self.CLIP_EMBED_DIM, **dd)
            self.fc_norm = ChannelsLastNorm(self.CLIP_EMBED_DIM, **dd)
            self.num_features = embed
        else:
            self.num_features = int(stage_channels[-1] * self.CONV_HEAD_SCALE)
            self.conv_head = nn.Sequential(nn.Conv2d(stage_channels[-1], self.num_features, 1, bias=False, **dd),
                                           nn.Sequential(nn.BatchNorm2d(self.num_features, **dd)), nn.GELU())
        self.global_pool = "attn" if use_clip_projector else "avg"
        self._set_classifier(num_classes, global_pool)
        self.apply(init_weights)

    # -- timm's model interface

    def forward_stages(self, x) -> list[torch.Tensor]:
        """The stage outputs before each downsample, channels-first (the release's `forward_features_seq_out`)."""
        x = self.patch_embed(x)
        outputs = []
        for level in self.levels:
            out, x = level(x)
            outputs.append(out.permute(0, 3, 1, 2))
        return outputs

    def forward_features(self, x) -> torch.Tensor:
        return self._head_input(self.forward_stages(x))

    def _head_input(self, stages: list[torch.Tensor]) -> torch.Tensor:
        if self.conv_head is not None:
            return self.conv_head(stages[-1])
        if self.dcnv3_head_x4 is not None and self.dcnv3_head_x3 is not None:
            return self.dcnv3_head_x4(stages[-1]) + self.dcnv3_head_x3(stages[-2])
        return stages[-1]  # pruned for features: the last kept stage

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        elif self.global_pool == "attn" and self.clip_projector is not None and self.fc_norm is not None:
            x = self.fc_norm(self.clip_projector(x.flatten(2).transpose(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API over the stage outputs. Each stage ends in its own norm, so `norm` changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError(f"InternImage intermediates are NCHW, got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self.levels), indices)
        levels = self.levels[:max_index + 1] if stop_early else self.levels
        x = self.patch_embed(x)
        stages = []
        for level in levels:
            out, x = level(x)
            stages.append(out.permute(0, 3, 1, 2))
        intermediates = [stages[i] for i in take]
        if intermediates_only:
            return intermediates
        return (self._head_input(stages) if len(stages) == len(self.levels) else stages[-1]), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the chosen stage outputs do not need: later stages, the last kept downsample, the head."""
        take, max_index = feature_take_indices(len(self.levels), indices)
        if max_index < len(self.levels) - 1:
            self.levels = self.levels[:max_index + 1]
            self.levels[-1].downsample = None
            prune_head = True  # the head is built for the last stage
        if prune_head:
            self.conv_head = self.dcnv3_head_x4 = self.dcnv3_head_x3 = self.clip_projector = self.fc_norm = None
            self.num_features = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self._set_classifier(num_classes, global_pool)
        init_weights(self.head)

    def _set_classifier(self, num_classes: int, global_pool: str | None):
        pools = ("avg", "") + (("attn",) if self.clip_projector is not None else ())
        if global_pool is not None and global_pool not in pools:
            raise ValueError(f"global_pool must be one of {pools}, got {global_pool!r}")
        self.global_pool = self.global_pool if global_pool is None else global_pool
        self.num_classes = num_classes
        self.head_hidden_size = self.CLIP_EMBED_DIM if self.global_pool == "attn" else self.num_features
        reference = self.patch_embed.conv1.weight  # the new classifier follows the model's device and dtype
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=reference.device, dtype=reference.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for layer in self.layers():
            layer.with_cp = enable

    def group_matcher(self, coarse: bool = False):
        """timm's interface, on which its layer-wise decay (`param_groups_layer_decay`) is built: a parameter's (or
        module's) place in layer_order, or with coarse its stage; the heads and the rest after every layer."""
        places = {prefix: stage if coarse else i for i, (stage, prefixes) in enumerate(self.layer_order())
                  for prefix in prefixes}

        def place(name: str) -> float:
            prefixes = itertools.accumulate(name.split("."), lambda head, part: f"{head}.{part}")  # a, a.b, a.b.c
            return next((places[prefix] for prefix in prefixes if prefix in places), math.inf)

        return place

    def layers(self) -> list[InternImageLayer]:
        return [block for level in self.levels for block in level.blocks]

    # -- the release's optimiser rules

    def layer_order(self) -> list[tuple[int, list[str]]]:
        """The layers from input to output, each as (its stage, the modules it holds), grouped as the release's
        layer-wise decay groups them (`lr_decay_keywords` in its intern_image.py): the stem with the first layer, the
        downsample and norm of stage i with stage i+1's first layer; the heads, the last stage's norm and the level-2
        post-norms in none. The one order lr_ratios and timm's group_matcher both count."""
        order = [(i, [f"levels.{i}.blocks.{j}"])
                 for i, level in enumerate(self.levels) for j in range(len(level.blocks))]
        order[0][1].insert(0, "patch_embed")
        first_of_next = 0
        for i, level in enumerate(self.levels[:-1]):
            first_of_next += len(level.blocks)
            order[first_of_next][1].extend(f"levels.{i}.{part}" for part in ("downsample", "norm")
                                           if getattr(level, part) is not None)
        return order

    def lr_ratios(self, layer_decay: float, dcn_lr_mul: float = 1.0) -> dict[str, float]:
        """lr ratio per parameter name under the release's layer-wise decay (applied by its `set_weight_decay_and_lr`):
        the k-th layer of layer_order counted from the last gets layer_decay**k; parameters in no layer keep ratio 1
        (absent here). The DCN multiplier scales the offset and center-feature-scale parameters on top."""
        order = self.layer_order()
        ratios = {}
        for i, (_, prefixes) in enumerate(order):
            for prefix in prefixes:
                ratios.update({f"{prefix}.{name}": layer_decay ** (len(order) - 1 - i)
                               for name, _ in self.get_submodule(prefix).named_parameters()})
        for prefix, module in self.named_modules():
            if isinstance(module, DCNv3):
                for name in module.lr_scaled_parameters():
                    ratios[f"{prefix}.{name}"] *= dcn_lr_mul
        return ratios

    # -- released weights (timm's custom_load hook)

    def load_pretrained(self, path: str):
        """Load a released checkpoint. A classifier of another shape (or none, num_classes=0) keeps its fresh
        initialisation, as timm does for a new number of classes; every other tensor must match."""
        own = self.state_dict()
        state = {k: v for k, v in release_state_dict(path).items()
                 if not k.startswith("head.") or (k in own and own[k].shape == v.shape)}
        result = self.load_state_dict(state, strict=False)
        mismatched = result.unexpected_keys + [k for k in result.missing_keys if not k.startswith("head.")]
        if mismatched:
            raise KeyError(f"{path} does not fit this model: {len(mismatched)} keys differ, e.g. {mismatched[:5]}")


def init_weights(module: nn.Module):
    """The release's init: trunc-normal(0.02) Linear weights, zero biases, unit norms; DCNv3's own init on top
    (`apply` visits children first, so DCNv3.reset_parameters overrides its Linears' generic init)."""
    if isinstance(module, (nn.Linear, nn.LayerNorm, DCNv3)):
        # Under deepspeed.zero.Init parameters are partitioned as soon as each submodule is built, so initialising
        # them afterwards needs this module's gathered (one small module at a time, never the whole model).
        with gathered_for_writing(list(module.parameters())):
            _init_module(module)


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


def release_state_dict(path_or_state_dict) -> dict[str, torch.Tensor]:
    """A released checkpoint's weights: the state dict itself or the one under 'model'/'module'/'state_dict' (the
    release's and DeepSpeed's saves), with DDP's `module.` prefixes removed."""
    state = path_or_state_dict
    if isinstance(state, (str, Path)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_official_checkpoint(model: InternImage, path_or_state_dict, strict: bool = True):
    """Load a released InternImage checkpoint (a path or a state dict): the key names are the release's, so no
    mapping is needed. Returns load_state_dict's report of missing and unexpected keys."""
    return model.load_state_dict(release_state_dict(path_or_state_dict), strict=strict)


# ---------------------------------------------------------------------------------------------------------------------
# The family: released hyper-parameters and evaluation settings


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

RELEASE_WEIGHTS = "https://huggingface.co/OpenGVLab/InternImage/resolve/main/"


def _cfg(release_file: str, image_size: int, stride: int) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, image_size, image_size),
        "pool_size": (image_size // stride, image_size // stride),
        # The release evaluates with its TEST.CROP: resize the short side to the input size, centre-crop, bicubic.
        "crop_pct": 1.0, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1", "classifier": "head",
        # The weights stay where the release publishes them; timm hands a local copy to InternImage.load_pretrained.
        "origin_url": RELEASE_WEIGHTS + release_file, "custom_load": True,
        "license": "mit", "paper_ids": "arXiv:2211.05778",
    }


default_cfgs = generate_default_cfgs({
    "internimage_t.in1k": _cfg("internimage_t_1k_224.pth", 224, 32),
    "internimage_s.in1k": _cfg("internimage_s_1k_224.pth", 224, 32),
    "internimage_b.in1k": _cfg("internimage_b_1k_224.pth", 224, 32),
    "internimage_l.in22k_ft_in1k": _cfg("internimage_l_22kto1k_384.pth", 384, 32),
    "internimage_xl.in22k_ft_in1k": _cfg("internimage_xl_22kto1k_384.pth", 384, 32),
    "internimage_h.joint_in22k_ft_in1k": _cfg("internimage_h_22kto1k_640.pth", 640, 16),
    "internimage_g.joint_in22k_ft_in1k": _cfg("internimage_g_22kto1k_512.pth", 512, 16),
})


def create_internimage(variant: str, pretrained: bool = False, **kwargs) -> InternImage:
    """The one path that builds every InternImage, for timm.create_model and pretrain.models.create_model alike."""
    # A file given in the overlay would reset custom_load (timm's rule for its own formats); the release's is ours.
    overlay = {"custom_load": True, **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay)
        if not cfg.file:
            raise ValueError(f"{variant}: the released weights are not bundled; download {cfg.origin_url} and pass "
                             f"pretrained_cfg_overlay=dict(file=PATH)")
    return build_model_with_cfg(InternImage, variant, pretrained, pretrained_cfg_overlay=overlay,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
                                **{**MODEL_CONFIGS[variant], **kwargs})


@register_model
def internimage_t(pretrained: bool = False, **kwargs) -> InternImage:
    return create_internimage("internimage_t", pretrained, **kwargs)


@register_model
def internimage_s(pretrained: bool = False, **kwargs) -> InternImage:
    return create_internimage("internimage_s", pretrained, **kwargs)


@register_model
def internimage_b(pretrained: bool = False, **kwargs) -> InternImage:
    return create_internimage("internimage_b", pretrained, **kwargs)


@register_model
def internimage_l(pretrained: bool = False, **kwargs) -> InternImage:
    return create_internimage("internimage_l", pretrained, **kwargs)


@register_model
def internimage_xl(pretrained: bool = False, **kwargs) -> InternImage:
    return create_internimage("internimage_xl", pretrained, **kwargs)


@register_model
def internimage_h(pretrained: bool = False, **kwargs) -> InternImage:
    return create_internimage("internimage_h", pretrained, **kwargs)


@register_model
def internimage_g(pretrained: bool = False, **kwargs) -> InternImage:
    return create_internimage("internimage_g", pretrained, **kwargs)
