"""The InternImage family. `create_model('internimage_h', **overrides)` with the release's argument names."""
from pretrain.models.internimage import MODEL_CONFIGS, InternImage, load_official_checkpoint


def list_models() -> list[str]:
    return list(MODEL_CONFIGS)


def create_model(name: str, **overrides) -> InternImage:
    """Build `name` with the released hyper-parameters, any of them replaced by `overrides`."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_CONFIGS)}")
    return InternImage(**{**MODEL_CONFIGS[name], **overrides})


__all__ = ["InternImage", "create_model", "list_models", "load_official_checkpoint"]
