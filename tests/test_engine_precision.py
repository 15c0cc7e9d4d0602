"""The trainer's engine on two CPU ranks, built as a GPU run builds it (build_model under zero.Init, the pretrained
backbone, deepspeed.initialize), in a bf16 ZeRO-3 stage: where every tensor ends up, what the fp32 masters hold of a
pretrained backbone, and the lr schedule across a step DeepSpeed skips.

The skipped step is injected as an infinite loss: DeepSpeed's ZeRO-3 optimizer takes a non-finite gradient norm for an
overflow in every precision and skips the update and the schedule's step as it does on an fp16 loss-scale overflow
(DeepSpeedEngine._take_model_step); fp16 itself has no CPU kernels here."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import CONFIG, FAST, records
from launch.rendezvous import free_port
from pretrain.config import load_stage_config
from pretrain.engine.optim import peak_lr, warmup_cosine

OVERFLOW_STEP, MAX_STEPS = 2, 4
RANKS = 2  # ZeRO-3 pads the last rank's partition of a parameter whose size two does not divide


def pretrained_backbone(path):
    """A backbone export of the demo model whose fp32 weights bf16 cannot hold: each is off the bf16 grid."""
    from safetensors.torch import save_file

    from pretrain.engine.distributed import World
    from pretrain.engine.tasks import build_task
    from pretrain.engine.weights import CLASSIFIER_PREFIX

    task = build_task(load_stage_config(CONFIG), World(rank=0, size=1, local_rank=0, device=torch.device("cpu")))
    backbone = task.backbone(task.build())
    generator = torch.Generator().manual_seed(1)
    state = {name: t + 1e-3 * torch.randn(t.shape, generator=generator)
             for name, t in backbone.state_dict().items() if not name.startswith(CLASSIFIER_PREFIX)}
    save_file(state, str(path))
    return state


def one_rank(rank: int, port: int, work):
    """Build the trainer, record its tensors, then train MAX_STEPS steps with an overflow at OVERFLOW_STEP."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.engine.config_checks import load_config
    from pretrain.engine.distributed import init_distributed
    from pretrain.engine.trainer import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(RANKS), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = load_config(CONFIG, [*FAST, f"run_dir={work / 'run'}", "precision=bf16", f"max_steps={MAX_STEPS}",
                               f"model.pretrained={work / 'backbone.safetensors'}"])
    trainer = Trainer(cfg, init_distributed(timeout_s=60))
    engine, module = trainer.engine, trainer.engine.module
    backbone = dict(trainer.task.backbone(module).named_parameters())
    with deepspeed.zero.GatheredParameters(list(backbone.values())):
        weights = {name: p.detach().clone() for name, p in backbone.items()}
    seen = {"engine_device": engine.device,
            "params": {name: (p.ds_tensor.device, p.ds_tensor.dtype) for name, p in module.named_parameters()},
            "buffers": {name: (b.device, b.dtype) for name, b in module.named_buffers()},
            "masters": {name: safe_get_full_fp32_param(p) for name, p in backbone.items()}, "weights": weights}

    real_loss = trainer.task.loss

    def overflowing_loss(model, batch, dtype):
        loss, extra = real_loss(model, batch, dtype)
        return (loss * math.inf if trainer.step + 1 == OVERFLOW_STEP else loss), extra

    trainer.task.loss = overflowing_loss
    trainer.fit()
    seen.update(step=trainer.step, schedule_steps=trainer.scheduler.last_epoch, skipped=engine.skipped_steps)
    if rank == 0:
        torch.save(seen, work / "seen.pt")


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    work = tmp_path_factory.mktemp("engine_precision")
    state = pretrained_backbone(work / "backbone.safetensors")
    mp.spawn(one_rank, args=(free_port(), work), nprocs=RANKS, join=True)
    return {**torch.load(work / "seen.pt", weights_only=False), "file": state, "run_dir": work / "run"}


def test_every_parameter_and_buffer_is_on_the_engines_device(seen):
    """On CPU ranks every device is the CPU, so only the partitioning and the dtypes can fail here; that the buffers
    reach a GPU is tests/test_build_model_placement.py's."""
    device = seen["engine_device"]
    assert "text.attn_mask" in seen["buffers"] and "text.token_embedding.weight" in seen["params"]
    assert {name for name, (d, _) in {**seen["params"], **seen["buffers"]}.items() if d != device} == set()
    assert {dtype for _, dtype in seen["params"].values()} == {torch.bfloat16}


def test_the_fp32_masters_hold_the_pretrained_backbone_bit_for_bit(seen):
    file, masters, weights = seen["file"], seen["masters"], seen["weights"]
    assert masters.keys() - {k for k in masters if k.startswith("head.")} == file.keys()
    assert all(not torch.equal(t, t.bfloat16().float()) for t in file.values())  # a bf16 round trip would show
    assert any(t.numel() % RANKS for t in file.values())  # and so would a padded last partition cut short
    assert [k for k in file if not torch.equal(masters[k].view(file[k].shape), file[k])] == []
    # what the forward pass uses: the masters in the run's precision
    assert [k for k in file if not torch.equal(weights[k], file[k].bfloat16())] == []


def test_a_skipped_step_keeps_the_lr_schedule_at_the_trainers_step(seen):
    assert seen["skipped"] == 1  # DeepSpeed skipped the update
    assert seen["step"] == seen["schedule_steps"] == MAX_STEPS
    logged = {r["step"]: r["lr_peak"] for r in records(seen["run_dir"]) if "lr_peak" in r}
    cfg = load_stage_config(CONFIG, FAST)
    base_lr = peak_lr(cfg, world_size=RANKS)
    expected = {s: base_lr * warmup_cosine(s, cfg.optim.warmup_steps, MAX_STEPS, cfg.optim.min_lr / base_lr)
                for s in range(1, MAX_STEPS + 1)}
    assert logged == pytest.approx(expected, rel=1e-6)
