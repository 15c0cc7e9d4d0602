"""The InternImage family. `create_model('internimage_h', **overrides)` with the release's argument names."""
from pretrain.models.internimage import (MODEL_CONFIGS, InternImage, create_internimage, load_official_checkpoint,
                                         release_state_dict)


def list_models() -> list[str]:
    return list(MODEL_CONFIGS)


def create_model(name: str, **overrides) -> InternImage:
    """Build `name` with the released hyper-parameters, any of them replaced by `overrides` (the same path as
    `timm.create_model(name, **overrides)`, except that None-valued overrides are kept rather than dropped)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_CONFIGS)}")
    return create_internimage(name, **overrides)


def image_size_multiple(name: str, overrides: dict) -> int:
    """What the input's side must be a multiple of: H/G's attention-pooling head adds the stride-16 map to the
    upsampled stride-32 one, which only match when the side divides by 32."""
    arguments = {**MODEL_CONFIGS[name], **overrides}
    return 32 if arguments.get("use_clip_projector") else 1


__all__ = ["InternImage", "create_model", "image_size_multiple", "list_models", "load_official_checkpoint", "release_state_dict"]
