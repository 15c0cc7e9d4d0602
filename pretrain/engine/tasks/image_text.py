"""Image-text contrastive pretraining: a CLIP-style dual encoder (InternImage vision tower, open_clip's text
transformer), symmetric InfoNCE with a learnable temperature, features gathered across ranks with gradients, each rank
scoring only its own rows against the global batch (open_clip's local loss: memory linear in the batch).
Metrics: zero-shot top-1/top-5 on labelled val shards (class names and prompts from eval.zero_shot, each class scored
by its prompts' mean embedding), or, with eval.zero_shot null, image<->text retrieval recall@1/5/10."""
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.engine.distributed import sum_over_ranks
from pretrain.engine.tasks.base import EvaluationError, Task, build_vision_tower, lockstep


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
        # CLIP clamps the temperature so logits stay below 100; exponentiated in fp32, where the loss uses it.
        scale = self.logit_scale.float().clamp(max=math.log(100)).exp()
        return self.encode_image(image), self.encode_text(tokens), scale


class ImageTextTask(Task):
    name = "image-text"
    backbone_prefix = "visual."
    summary = {"zero_shot_top1": "zero_shot_top1"}

    def __init__(self, cfg, world):
        from open_clip.loss import ClipLoss

        super().__init__(cfg, world)
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

    def example_inputs(self, batch_size):
        return (*super().example_inputs(batch_size),
                torch.zeros(batch_size, self.cfg.data.context_length, dtype=torch.long))

    def loss(self, model, batch, dtype):
        image_features, text_features, logit_scale = model(batch["image"].to(dtype), batch["text"])
        # In fp32: bf16 logits over a global batch of thousands lose the small differences the log-softmax ranks by.
        loss = self.loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        return loss, {"logit_scale": logit_scale.detach()}

    @torch.no_grad()
    def evaluate(self, model, loader, dtype):
        if self.cfg.eval.zero_shot is None:
            return self._retrieval(model, loader, dtype)
        return self._zero_shot(model, loader, dtype)

    def _zero_shot(self, model, loader, dtype):
        from pretrain.data import get_tokenizer
        from pretrain.engine.tasks import zero_shot

        spec = self.cfg.eval.zero_shot
        names, prompts = zero_shot.class_names(spec.classes), zero_shot.templates(spec.templates)
        tokenizer = get_tokenizer(self.cfg.data.context_length)
        device = self.world.device
        classifier = []
        for name in names:
            tokens = tokenizer([prompt(name) for prompt in prompts]).to(device)
            classifier.append(F.normalize(model.encode_text(tokens).float().mean(0), dim=-1))
        classifier = torch.stack(classifier, 1)
        counts = {"top1": 0, "top5": 0, "total": 0}
        for batch in lockstep(loader, self.world):
            logits = model.encode_image(batch["image"].to(device, dtype)).float() @ classifier
            labelled = batch["label"] >= 0  # -1: a sample without KEY.cls
            if batch["real"] and labelled.any():
                labels = batch["label"][labelled]
                top5 = logits.cpu()[labelled].topk(min(5, len(names)), dim=-1).indices
                counts["top1"] += (top5[:, 0] == labels).sum().item()
                counts["top5"] += (top5 == labels[:, None]).any(-1).sum().item()
                counts["total"] += len(labels)
        counts = sum_over_ranks(counts, device)
        self._require_samples(counts["total"], "labelled (KEY.cls)")
        return {"zero_shot_top1": counts["top1"] / counts["total"], "zero_shot_top5": counts["top5"] / counts["total"],
                "zero_shot_classes": len(names), "eval_samples": int(counts["total"])}

    def _retrieval(self, model, loader, dtype):
        """Image<->caption recall@1/5/10 over the whole val set, ranked as open_clip's own evaluation ranks them."""
        from open_clip_train.train import get_clip_metrics

        device = self.world.device
        images, texts = [], []
        for batch in lockstep(loader, self.world):
            image_features, text_features, _ = model(batch["image"].to(device, dtype), batch["text"].to(device))
            if batch["real"]:
                captioned = batch["has_text"]  # a labelled sample without KEY.txt has no caption to find
                images.append(image_features.float().cpu()[captioned])
                texts.append(text_features.float().cpu()[captioned])
        images, texts = gather_rows(images), gather_rows(texts)
        self._require_samples(len(images), "image-text")
        metrics = get_clip_metrics(images, texts, logit_scale=1.0)
        return {**{f"{direction}_R@{k}": float(metrics[f"{direction}_R@{k}"])
                   for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)},
                "eval_samples": len(images)}

    def _require_samples(self, count, kind):
        if count == 0:
            raise EvaluationError(f"no {kind} sample to evaluate in data.val {self.cfg.data.val}"
                                  + ("" if self.cfg.eval.zero_shot is None else
                                     "; zero-shot needs labelled val shards (eval.zero_shot: null scores retrieval)"))


def gather_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's rows, in rank order, on every rank."""
    import torch.distributed as dist

    local = torch.cat(parts) if parts else torch.zeros(0)  # cat skips 1-D empties
    if not dist.is_initialized():
        return local
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return torch.cat(everyone)
