"""The checks of a stage config that need the model zoo, left out of pretrain/config.py so that it imports neither
torch nor the models: the model's name, and the image side its head takes. `load_config` is the stage config's loader
with them (the trainer's); `check_config` adds the files the stage reads, and runs before any rank starts (`pretrain
run`, `pretrain rehearse`), so that a bad value or a missing file is one line naming it, not a traceback from every
rank."""
from pathlib import Path

from pretrain.config import StageConfig, check_files, load_stage_config
from pretrain.models import image_size_multiple, list_models
from pretrain.typed_config import ConfigError


def check_model(cfg: StageConfig) -> None:
    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; choose from {list_models()}")
    multiple = image_size_multiple(cfg.model.name, cfg.model.arguments())
    if cfg.data.image_size % multiple:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be a multiple of {multiple} for "
                          f"{cfg.model.name} (its head fuses the stride-16 and stride-32 maps)")


def check_zero(cfg: StageConfig) -> None:
    """The zero_optimization section the engine will get, zero.extra included, read by DeepSpeed's own config class:
    a misspelt or ill-typed key is one line here, not a traceback from every rank."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    from pretrain.engine.optim import zero_optimization

    section = zero_optimization(cfg, on_gpu=False)
    # DeepSpeed takes many keys under two names (max_live_parameters, stage3_max_live_parameters); one the section
    # sets, given again in extra under its other name, would only be "Extra inputs are not permitted" from pydantic
    other_name = {field.alias: name for name, field in DeepSpeedZeroConfig.model_fields.items() if field.alias}
    other_name |= {name: alias for alias, name in other_name.items()}
    twice = sorted(key for key in cfg.zero.extra if other_name.get(key) in section)
    if twice:
        raise ConfigError(f"zero.extra: {twice} are DeepSpeed's other names for {[other_name[k] for k in twice]}, "
                          "which the zero: section sets itself; set them there by that name")
    try:
        DeepSpeedZeroConfig(**section)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"zero: DeepSpeed refuses its zero_optimization section: {problems}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> StageConfig:
    cfg = load_stage_config(path, overrides)
    check_model(cfg)
    return cfg


def check_config(path: str | Path, overrides: list[str] = (), pretrained_by_schedule: bool = False) -> StageConfig:
    cfg = load_config(path, overrides)
    if cfg.zero.extra:  # the typed keys are checked by their dataclass; importing DeepSpeed prints and takes seconds
        check_zero(cfg)
    return check_files(cfg, pretrained_by_schedule)
