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


__all__ = ["InternImage", "create_model", "list_models", "load_official_checkpoint", "release_state_dict"]
