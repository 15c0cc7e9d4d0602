"""Where the weights go: ONNX in onnxruntime, and the timm / open_clip `local-dir:` folders `pretrain consolidate`
writes, loaded by timm and open_clip themselves."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from pretrain.config import load_stage_config
from pretrain.export.onnx import export_onnx, relative_error
from pretrain.models import create_model, load_official_checkpoint

DEMO = REPO / "configs/demo/pretrain.yaml"


def demo_model(num_classes):
    cfg = load_stage_config(DEMO)
    return create_model(cfg.model.name, **cfg.model.arguments(), num_classes=num_classes)


@pytest.mark.parametrize("name,size,stages", [("internimage_t", 64, False), ("demo_h", 32, False),
                                              ("demo_h", 32, True)])
def test_onnx_runs_in_onnxruntime_like_pytorch_at_any_batch(tmp_path, name, size, stages):
    torch.manual_seed(0)
    model = (create_model(name, num_classes=10) if name != "demo_h" else demo_model(10)).eval()
    for dcn in (m for m in model.modules() if type(m).__name__ == "DCNv3"):  # non-zero offsets: sampling is exercised
        torch.nn.init.normal_(dcn.offset.weight, std=0.05)
        torch.nn.init.normal_(dcn.mask.weight, std=0.05)
    path = tmp_path / "model.onnx"
    names = export_onnx(model, path, size, stages=stages)  # traced at batch 2
    assert names == (["stage1", "stage2", "stage3", "stage4"] if stages else ["output"])
    assert relative_error(model, path, [torch.randn(n, 3, size, size) for n in (1, 3)], stages=stages) <= 1e-4


@pytest.fixture(scope="module")
def exported(reference_run, reference_weights, tmp_path_factory):
    """The reference run's checkpoint through `pretrain consolidate`, in fp32, and the fp32 weights it holds."""
    run_dir, _ = reference_run
    out = tmp_path_factory.mktemp("export")
    proc = subprocess.run([sys.executable, "-m", "launch", "consolidate", str(run_dir / "checkpoints"), "--out",
                           str(out), "--dtype", "fp32"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())  # the run's own evaluation (2 ranks, shards)
    return out, reference_weights, result


def test_timm_local_dir_builds_the_exported_model(exported):
    import timm

    out, full, _ = exported
    model = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    ours = demo_model(64).eval()
    result = load_official_checkpoint(ours, out / "backbone.pth", strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), ours.forward_features(images))
    assert torch.equal(model.head.weight, full["visual.head.weight"])  # the image-text projection, kept
    assert model.pretrained_cfg["input_size"] == [3, 32, 32] and model.pretrained_cfg["crop_pct"] == 0.875


def held_out_batches(cfg, batch_size=128):
    from PIL import Image
    import io

    from pretrain.data import DeviceBatch
    from pretrain.data.demo import demo_samples
    from pretrain.data.transforms import eval_transform

    transform = eval_transform(cfg.data)
    samples = demo_samples(cfg.data.image_size)["image-text"]["val"]
    pixels = torch.stack([transform(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in samples])
    images = DeviceBatch(cfg.data, torch.device("cpu"), training=False).images(pixels)
    labels = torch.tensor([s["cls"] for s in samples])
    return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
            for i in range(0, len(labels), batch_size)]


def zero_shot_with_open_clip(model, tokenizer, batches):
    import torch.nn.functional as F

    from pretrain.data import zero_shot_classes

    names, templates = zero_shot_classes()
    with torch.no_grad():
        classes = torch.stack([F.normalize(model.encode_text(tokenizer([t.format(n) for t in templates]),
                                                             normalize=True).mean(0), dim=-1) for n in names], 1)
        correct = sum(int((model.encode_image(b["image"], normalize=True) @ classes).argmax(-1).eq(b["label"]).sum())
                      for b in batches)
    return correct / sum(len(b["label"]) for b in batches)


def test_open_clip_loads_the_image_text_export_and_scores_as_we_do(exported, tmp_path):
    import open_clip
    import torch.distributed as dist
    from safetensors.torch import load_file

    from pretrain.engine.distributed import World
    from pretrain.engine.tasks import ImageTextTask

    out, full, result = exported
    folder = f"local-dir:{out / 'open_clip'}"
    model, _, preprocess = open_clip.create_model_and_transforms(folder)  # loads its weights strictly
    model.eval()
    assert model.state_dict().keys() == load_file(str(out / "open_clip/open_clip_model.safetensors")).keys()

    cfg = load_stage_config(DEMO)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        task = ImageTextTask(cfg, World(rank=0, size=1, local_rank=0, device=torch.device("cpu")))
        ours = task.build().eval()
        ours.load_state_dict(full)
        batches = held_out_batches(cfg)
        with torch.no_grad():
            images = batches[0]["image"][:8]
            assert torch.allclose(model.encode_image(images, normalize=True), ours.encode_image(images), atol=1e-6)
        expected = task.evaluate(ours, batches, torch.float32)["zero_shot_top1"]
    finally:
        dist.destroy_process_group()
    accuracy = zero_shot_with_open_clip(model, open_clip.get_tokenizer(folder), batches)
    assert accuracy == expected and abs(accuracy - result["zero_shot_top1"]) <= 1 / 359
