"""Where zero-shot evaluation gets its class names and prompt templates, as eval.zero_shot names them: ImageNet-1K's
1000 class names and CLIP's prompt templates as the installed open_clip ships them, the demo's digits, or a text file
(one class name, or one template with "{}" for the name, per line)."""
from pathlib import Path
from typing import Callable

from pretrain.typed_config import ConfigError


def _lines(path: str, what: str) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as error:
        raise ConfigError(f"eval.zero_shot.{what}: cannot read {path}: {error.strerror}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"eval.zero_shot.{what}: {path} has no names")
    return lines


def class_names(spec: str) -> list[str]:
    """The class names in label order: "imagenet1k", "demo-digits" or a text file, one name per line."""
    if spec == "imagenet1k":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if spec == "demo-digits":
        from pretrain.data.demo import DIGIT_NAMES

        return list(DIGIT_NAMES)
    return _lines(spec, "classes")


def templates(spec: str) -> list[Callable[[str], str]]:
    """Prompt builders, class name -> caption: "openai" (CLIP's 80), "demo-digits" or a text file of "...{}..." lines."""
    if spec == "openai":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "demo-digits":
        from pretrain.data.demo import ZERO_SHOT_TEMPLATES

        return [template.format for template in ZERO_SHOT_TEMPLATES]
    lines = _lines(spec, "templates")
    if not all("{}" in line for line in lines):
        raise ConfigError(f"eval.zero_shot.templates: every line of {spec} needs a {{}} for the class name")
    return [line.format for line in lines]
