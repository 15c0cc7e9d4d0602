"""Checkpoint files are data, never code. A `.pt` file is a pickle, and unpickling runs whatever callables it names, so
a crafted `rank*_state.pt` or `*_optim_states.pt` could run a command on every rank that resumes from it.

Every load of a checkpoint goes through `weights_only_loads()`: inside it, each `torch.load` in the process, DeepSpeed's
own included (which ask for full unpickling), is forced to torch's weights-only unpickler by the documented
TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, which accepts tensors, plain containers and numbers, plus exactly the classes
DeepSpeed writes into its checkpoints (listed below, found with `torch.serialization.get_unsafe_globals_in_checkpoint`
on fp32, bf16 and fp16 ZeRO-3 checkpoints). Anything else is refused with `UnsafeCheckpointError`, naming the file
and what it tried to load, before any of it runs.
"""
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds more than tensors and DeepSpeed's own state: it was not loaded."""


def deepspeed_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextmanager
def weights_only_loads(where: str | Path):
    """Every torch.load inside is weights-only (with DeepSpeed's classes allowed); `where` (a file or a checkpoint
    folder) names the culprit when a file is refused."""
    # The opposite switch in a user's environment would make torch refuse the pair; it is lifted for the duration.
    previous = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_classes()):
            yield
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(_refusal(Path(where), error)) from None
    finally:
        os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        os.environ.update({name: value for name, value in previous.items() if value is not None})


def load_file(path: str | Path, map_location="cpu"):
    """torch.load of one checkpoint file, weights-only."""
    with weights_only_loads(path):
        return torch.load(path, map_location=map_location, weights_only=True)


def _refusal(where: Path, error: pickle.UnpicklingError) -> str:
    culprits = _unsafe_files(where)
    named = "; ".join(f"{path} references {', '.join(names)}" for path, names in culprits.items())
    reason = named or str(error).strip().splitlines()[0]
    return (f"refused to load {where}: a checkpoint file holds code or objects that are not tensors, plain values or "
            f"DeepSpeed's checkpoint classes ({reason}). Nothing from it was run. If the file is corrupt, resume from "
            f"an older checkpoint; if it was tampered with, treat the run directory as compromised.")


def _unsafe_files(where: Path) -> dict[Path, list[str]]:
    """The files under `where` that reference globals outside the allowlist (read without unpickling anything)."""
    files = [where] if where.is_file() else sorted(where.rglob("*.pt")) if where.is_dir() else []
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in deepspeed_classes()}
    culprits = {}
    for path in files:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as error:  # not a zip checkpoint (legacy format or garbage): say so rather than guess
            names = [f"<unreadable: {type(error).__name__}>"]
        names = [n for n in names if n not in allowed]
        if names:
            culprits[path] = names
    return culprits
