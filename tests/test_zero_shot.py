"""Image-text evaluation in-process, on stand-in encoders whose right answers are known: zero-shot with the config's
class names and prompts, retrieval recall on unlabelled shards, and an error (not 0.0) when nothing is usable."""
import io

import pytest
import torch
import torch.distributed as dist

from PIL import Image

from conftest import CONFIG
from pretrain.config import load_stage_config
from pretrain.data import get_tokenizer, stats
from pretrain.data.decode import NO_LABEL, Skip, collate
from pretrain.data.loader import make_decoder
from pretrain.engine.distributed import World
from pretrain.engine.tasks import ImageTextTask, zero_shot
from pretrain.engine.tasks.image_text import EvaluationError

NAMES = ["cat", "dog", "bird", "horse", "sheep", "cow"]


class KnowsTheClass(torch.nn.Module):
    """Images carry their class c in pixel [0, 0, 0] and score class j by -((j - c) mod 6): c first, c - 1 last; a
    caption is the one-hot of the class name whose token it contains."""

    def __init__(self, context_length):
        super().__init__()
        tokenize = get_tokenizer(context_length)
        self.name_tokens = [int(tokenize([name])[0, 1]) for name in NAMES]

    def encode_image(self, image):
        c = image[:, 0, 0, 0].long()[:, None]
        return -((torch.arange(len(NAMES)) - c) % len(NAMES)).float()

    def encode_text(self, tokens):
        return torch.stack([(tokens == t).any(-1) for t in self.name_tokens], -1).float()

    def forward(self, image, tokens):  # retrieval: the image row i and the caption row i
        return image[:, 0, 0, :4], tokens[:, :4].float(), torch.ones(1)


@pytest.fixture
def task(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    cfg = load_stage_config(CONFIG, [f"eval.zero_shot.classes={names}", "eval.zero_shot.templates=openai",
                                     "data.val=/val/shard-{0000..0003}.tar"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield ImageTextTask(cfg, World(rank=0, size=1, local_rank=0, device=torch.device("cpu")))
    dist.destroy_process_group()


def images_of(labels):
    image = torch.zeros(len(labels), 3, 8, 8)
    image[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float)
    return image


def test_zero_shot_scores_the_configured_classes(task):
    model = KnowsTheClass(task.cfg.data.context_length)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    right = {"image": images_of(labels.tolist()), "label": labels}
    wrong_half = {"image": images_of([1, 2, 3, 1]), "label": torch.tensor([1, 2, 0, 0])}
    unlabelled = {"image": images_of([0, 1]), "label": torch.tensor([-1, -1])}  # not counted
    result = task.evaluate(model, [right, wrong_half, unlabelled], torch.float32)
    assert result == {"zero_shot_top1": 10 / 12, "zero_shot_top5": 11 / 12, "zero_shot_classes": 6,
                      "eval_samples": 12}


def test_no_labelled_sample_is_an_error_naming_the_val_pattern(task):
    model = KnowsTheClass(task.cfg.data.context_length)
    with pytest.raises(EvaluationError, match=r"data.val /val/shard-\{0000..0003\}.tar"):
        task.evaluate(model, [{"image": images_of([0, 1]), "label": torch.tensor([-1, -1])}], torch.float32)


def test_retrieval_recall_on_unlabelled_shards(task):
    task.cfg.eval.zero_shot = None
    one_hot = torch.eye(4)
    image = torch.zeros(4, 3, 1, 4)
    image[:, 0, 0] = one_hot
    # Captions 2 and 3 are swapped: half the pairs are found first, all within five.
    batch = {"image": image, "text": one_hot[[0, 1, 3, 2]].long(), "label": torch.full((4,), -1),
             "has_text": torch.ones(4, dtype=torch.bool)}
    # A labelled sample without a caption: scoring its empty caption would count a pair that does not exist.
    uncaptioned = {"image": image[:1], "text": torch.zeros(1, 4, dtype=torch.long), "label": torch.tensor([3]),
                   "has_text": torch.zeros(1, dtype=torch.bool)}
    result = task.evaluate(KnowsTheClass(task.cfg.data.context_length), [batch, uncaptioned], torch.float32)
    for direction in ("image_to_text", "text_to_image"):
        assert result[f"{direction}_R@1"] == 0.5 and result[f"{direction}_R@5"] == 1.0
    assert result["eval_samples"] == 4
    with pytest.raises(EvaluationError, match="no image-text sample"):
        task.evaluate(KnowsTheClass(task.cfg.data.context_length), [], torch.float32)


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


def test_image_text_val_decodes_imagenet_style_and_laion_style_samples(task):
    """ImageNet-1K val (KEY.jpg + KEY.cls, no caption) is what the production image-text stages score zero-shot on;
    a LAION-style val sample (KEY.txt, no label) is what retrieval scores."""
    decoder = make_decoder(task.cfg.data, train=False)
    imagenet_style = decoder({"__key__": "a", "jpg": jpeg(), "cls": b"417"}, seed=0)
    assert imagenet_style["label"] == 417 and imagenet_style["has_text"] is False
    laion_style = decoder({"__key__": "b", "jpg": jpeg(), "txt": b"a red square"}, seed=0)
    assert laion_style["label"] == NO_LABEL and laion_style["has_text"] is True
    batch = collate([imagenet_style, laion_style])
    assert batch["label"].tolist() == [417, NO_LABEL] and batch["has_text"].tolist() == [False, True]
    with pytest.raises(Skip) as neither:
        decoder({"__key__": "c", "jpg": jpeg()}, seed=0)
    assert neither.value.reason == stats.MISSING_CAPTION


def test_class_names_and_templates_come_from_open_clip_or_a_file(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert zero_shot.class_names("imagenet1k") == list(IMAGENET_CLASSNAMES) and len(IMAGENET_CLASSNAMES) == 1000
    assert [t("x") for t in zero_shot.templates("openai")] == [t("x") for t in OPENAI_IMAGENET_TEMPLATES]
    assert zero_shot.class_names("demo-digits")[3] == "three"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} here\n\nno name\n")
    from pretrain.typed_config import ConfigError
    with pytest.raises(ConfigError, match="needs a {} for the class name"):
        zero_shot.templates(str(prompts))


def test_a_classification_evaluation_of_nothing_is_an_error_not_zero(tmp_path):
    from pretrain.engine.tasks import ClassificationTask

    cfg = load_stage_config(str(CONFIG).replace("pretrain.yaml", "finetune.yaml"), ["data.val=/val/in1k-{0..1}.tar"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        task = ClassificationTask(cfg, World(rank=0, size=1, local_rank=0, device=torch.device("cpu")))
        with pytest.raises(EvaluationError, match=r"data.val /val/in1k-\{0..1\}.tar"):
            task.evaluate(torch.nn.Identity(), [], torch.float32)
    finally:
        dist.destroy_process_group()
