"""Classification fine-tuning: InternImage with its classifier; label smoothing, optional mixup/cutmix (whose draws
are checkpointed, so a resumed run mixes as the uninterrupted one would). Metrics: top-1/top-5."""
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from pretrain.engine.distributed import sum_over_ranks
from pretrain.engine.tasks.base import EvaluationError, Task, build_vision_tower, lockstep


class ClassificationTask(Task):
    name = "classification"
    summary = {"top1": "finetune_top1"}

    def __init__(self, cfg, world):
        from pretrain.data import build_mixup

        super().__init__(cfg, world)
        self.mixup = build_mixup(cfg.data, cfg.num_classes, seed=cfg.seed + world.rank)

    def build(self, zero_init=nullcontext()):
        return build_vision_tower(self.cfg, self.cfg.num_classes, zero_init)

    def state_dict(self) -> dict:
        return {"mixup": self.mixup.state_dict()} if self.mixup is not None else {}

    def load_state_dict(self, state: dict):
        if self.mixup is not None:
            self.mixup.load_state_dict(state["mixup"])

    def loss(self, model, batch, dtype):
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)  # soft targets, label smoothing folded in
            loss = torch.sum(-targets * F.log_softmax(model(images.to(dtype)).float(), -1), -1).mean()
        else:
            loss = F.cross_entropy(model(images.to(dtype)).float(), labels,
                                   label_smoothing=self.cfg.data.augment.label_smoothing)
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model, loader, dtype):
        device = self.world.device
        top1 = top5 = total = loss = 0
        for batch in lockstep(loader, self.world):
            logits = model(batch["image"].to(device, dtype)).float().cpu()
            if batch["real"]:
                best = logits.topk(min(5, logits.shape[-1]), -1).indices
                labels = batch["label"]
                top1 += (best[:, 0] == labels).sum().item()
                top5 += (best == labels[:, None]).any(-1).sum().item()
                total += len(labels)
                loss += F.cross_entropy(logits, labels, reduction="sum").item()
        counts = sum_over_ranks({"top1": top1, "top5": top5, "total": total, "loss": loss}, device)
        if counts["total"] == 0:
            raise EvaluationError(f"no labelled (KEY.cls) sample to evaluate in data.val {self.cfg.data.val}")
        n = counts["total"]
        return {"top1": counts["top1"] / n, "top5": counts["top5"] / n, "val_loss": counts["loss"] / n,
                "eval_samples": int(n)}
