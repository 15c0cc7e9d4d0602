"""The two training objectives behind one small interface: build the model, compute a batch's loss, evaluate.

- image-text: a CLIP-style dual encoder (InternImage vision tower, open_clip's text transformer), symmetric InfoNCE
  with a learnable temperature, features gathered across ranks with gradients, each rank scoring only its own rows
  against the global batch (open_clip's local loss: memory linear in the batch). Metric: zero-shot top-1.
- classification: InternImage with its classifier; label smoothing, optional mixup/cutmix; top-1/top-5.
"""
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import StageConfig
from pretrain.engine.distributed import World, any_rank, sum_over_ranks
from pretrain.models import create_model


def build_vision_tower(cfg: StageConfig, num_classes: int, zero_init):
    """Built inside deepspeed.zero.Init for ZeRO-3, so no rank ever holds the whole tower."""
    with zero_init:
        return create_model(cfg.model.name, **{**cfg.model.args, "num_classes": num_classes,
                                               "with_cp": cfg.model.activation_checkpointing})


class ImageTextModel(nn.Module):
    def __init__(self, visual: nn.Module, text: nn.Module):
        super().__init__()
        self.visual, self.text = visual, text
        # Shape (1,), not a scalar: ZeRO-3 cannot partition 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def encode_image(self, image):
        return F.normalize(self.visual(image), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, image, tokens):
        # CLIP clamps the temperature so logits stay below 100.
        return self.encode_image(image), self.encode_text(tokens), self.logit_scale.clamp(max=math.log(100)).exp()


class ImageTextTask:
    def __init__(self, cfg: StageConfig, world: World):
        from open_clip.loss import ClipLoss

        self.cfg, self.world = cfg, world
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                rank=world.rank, world_size=world.size)

    def build(self, zero_init=nullcontext()):
        from open_clip.transformer import TextTransformer

        text = self.cfg.text
        visual = build_vision_tower(self.cfg, text.embed_dim, zero_init)
        # The text tower is small next to a 1B+ vision tower; it is built whole (same seed on every rank) and
        # partitioned by deepspeed.initialize, which keeps open_clip's own initialisation intact.
        tower = TextTransformer(context_length=self.cfg.data.context_length, vocab_size=text.vocab_size,
                                width=text.width, heads=text.heads, layers=text.layers, output_dim=text.embed_dim)
        return ImageTextModel(visual, tower)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass

    def loss(self, model, batch, dtype):
        image_features, text_features, logit_scale = model(batch["image"].to(dtype), batch["text"])
        loss = self.loss_fn(image_features, text_features, logit_scale)
        return loss, {"logit_scale": logit_scale.item()}

    @torch.no_grad()
    def evaluate(self, model, loader, dtype) -> dict:
        from pretrain.data import get_tokenizer, zero_shot_classes

        class_names, templates = zero_shot_classes()
        tokenizer = get_tokenizer(self.cfg.data.context_length)
        device = self.world.device
        classifier = []
        for name in class_names:
            tokens = tokenizer([t.format(name) for t in templates]).to(device)
            classifier.append(F.normalize(model.encode_text(tokens).float().mean(0), dim=-1))
        classifier = torch.stack(classifier, 1)
        correct = total = 0
        for batch in lockstep(loader, self.world):
            logits = model.encode_image(batch["image"].to(device, dtype)).float() @ classifier
            if batch["real"]:
                correct += (logits.argmax(-1).cpu() == batch["label"]).sum().item()
                total += len(batch["label"])
        counts = sum_over_ranks({"correct": correct, "total": total}, device)
        return {"zero_shot_top1": counts["correct"] / max(1, counts["total"]), "eval_samples": int(counts["total"])}


class ClassificationTask:
    def __init__(self, cfg: StageConfig, world: World):
        from pretrain.data import build_mixup

        self.cfg, self.world = cfg, world
        self.mixup = build_mixup(cfg.data, cfg.num_classes, seed=cfg.seed + world.rank)

    def build(self, zero_init=nullcontext()):
        return build_vision_tower(self.cfg, self.cfg.num_classes, zero_init)

    def state_dict(self) -> dict:
        """The mixup draw counter: with it a resumed run mixes its batches as the uninterrupted one would."""
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
    def evaluate(self, model, loader, dtype) -> dict:
        device = self.world.device
        top1 = top5 = total = 0
        for batch in lockstep(loader, self.world):
            logits = model(batch["image"].to(device, dtype)).float().cpu()
            if batch["real"]:
                best = logits.topk(min(5, logits.shape[-1]), -1).indices
                labels = batch["label"]
                top1 += (best[:, 0] == labels).sum().item()
                top5 += (best == labels[:, None]).any(-1).sum().item()
                total += len(labels)
        counts = sum_over_ranks({"top1": top1, "top5": top5, "total": total}, device)
        n = max(1, counts["total"])
        return {"top1": counts["top1"] / n, "top5": counts["top5"] / n, "eval_samples": int(counts["total"])}


def lockstep(loader, world: World):
    """Yield batches until every rank's loader is exhausted; a rank that runs out early repeats its last batch with
    real=False. Under ZeRO-3 every forward is collective, so all ranks must run the same number of them."""
    iterator, last = iter(loader), None
    while True:
        batch = next(iterator, None)
        if not any_rank(batch is not None, world.device):
            return
        if batch is None:
            if last is None:
                raise RuntimeError(f"rank {world.rank} received no evaluation data; use fewer ranks or more shards")
            yield {**last, "real": False}
        else:
            last = batch
            yield {**batch, "real": True}


def build_task(cfg: StageConfig, world: World):
    return {"image-text": ImageTextTask, "classification": ClassificationTask}[cfg.task](cfg, world)
