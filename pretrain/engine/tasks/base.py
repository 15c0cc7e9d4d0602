"""What a training objective is to the rest of the system: the `Task` interface, and the pieces objectives share."""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn

from pretrain.data.config import CLASSIFICATION
from pretrain.engine.distributed import World, any_rank
from pretrain.models import create_model

if TYPE_CHECKING:
    from pretrain.config import StageConfig


class Task:
    """One objective, and the only code that knows it: the trainer, the memory estimate, the export and the schedule
    summary ask it, never the objective's name. A new objective is a subclass in a file of its own, registered in
    tasks/__init__.py, with the sample format its training shards hold in pretrain/config.py's TASK_FORMATS."""

    name: ClassVar[str]
    eval_format: ClassVar[str] = CLASSIFICATION
    """The format of its evaluation shards."""
    backbone_prefix: ClassVar[str] = ""
    """Where the InternImage backbone sits in the model's state dict: what is exported and what a stage starts from."""
    summary: ClassVar[dict[str, str]] = {}
    """Result keys the schedule summary shows, by their name there; later stages' win."""

    def __init__(self, cfg: StageConfig, world: World):
        self.cfg, self.world = cfg, world

    def build(self, zero_init=nullcontext()) -> nn.Module:
        raise NotImplementedError

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.backbone_prefix.rstrip("."))

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Inputs of the model's forward, for the FLOP count and the memory estimate."""
        size = self.cfg.data.image_size
        return (torch.zeros(batch_size, 3, size, size),)

    def loss(self, model: nn.Module, batch: dict, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss and any other figures to log, as tensors: the trainer reads them on log steps only. The
        batch is on the device, its image normalised (and randomly erased where configured) by data.DeviceBatch."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, dtype: torch.dtype) -> dict[str, float]:
        """`loader`: evaluation batches whose images are on the device and normalised (data.DeviceLoader), their
        other tensors on the host; iterated through `lockstep`."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class EvaluationError(RuntimeError):
    """Nothing usable was evaluated: reporting 0.0 would pass a broken val set off as an untrained model."""


def build_vision_tower(cfg: StageConfig, num_classes: int, zero_init):
    """Built inside deepspeed.zero.Init for ZeRO-3, so no rank ever holds the whole tower."""
    with zero_init:
        return create_model(cfg.model.name, **cfg.model.arguments(), num_classes=num_classes,
                            with_cp=cfg.model.activation_checkpointing)


def lockstep(loader, world: World):
    """Yield batches until every rank's loader is exhausted; a rank that runs out early repeats its last batch with
    real=False, and one that had nothing to read (fewer val shards than ranks) runs the loader's placeholder batch.
    Under ZeRO-3 every forward is collective, so all ranks must run the same number of them."""
    iterator, last = iter(loader), None
    while True:
        batch = next(iterator, None)
        if not any_rank(batch is not None, world.device):
            return
        if batch is None:
            yield {**(last if last is not None else loader.placeholder()), "real": False}
        else:
            last = batch
            yield {**batch, "real": True}
