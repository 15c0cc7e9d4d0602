"""The training loop of one stage. Every concern lives in its own module; this file only wires them together:
config -> distributed world -> task (model, loss, eval) -> DeepSpeed engine -> data -> checkpoints -> metrics."""
import dataclasses
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from pretrain.config import StageConfig, save_resolved
from pretrain.data.stats import NOT_SKIPS, skipped_total
from pretrain.engine import preemption
from pretrain.engine.backends import apply_cuda_settings, startup_line
from pretrain.engine.checkpoint import CheckpointManager, convert_for_resume
from pretrain.engine.compiled import compile_layers
from pretrain.engine.config_checks import load_config
from pretrain.engine.distributed import (World, abort, any_rank, collective_timeout, init_distributed, mean_over_ranks,
                                         seed_everything, shutdown, sum_counts_over_ranks)
from pretrain.engine.ema import PartitionedEMA, whole_ema
from pretrain.engine.metrics import MetricsLogger, device_peak_tflops, peak_memory_per_rank, train_flops_per_sample
from pretrain.engine.optim import deepspeed_config, param_groups, peak_lr, scheduler_factory, zero_optimization
from pretrain.engine.precision import DTYPES
from pretrain.engine.tasks import build_task
from pretrain.engine.weights import load_backbone, load_fp32_masters, read_state_dict
from pretrain.fileio import atomic_write_json
from pretrain.progress import Progress
from pretrain.zero3 import is_partitioned

def run_stage(config_path: str, overrides: list[str] = ()) -> dict:
    """Run (or resume) one stage in this process, one rank of the job described by the env:// variables."""
    # torch 2.14 deprecates the collectives DeepSpeed and open_clip call; the warning would repeat on every log step.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(torch\.distributed|all_gather).*deprecated")
    cfg = load_config(config_path, overrides)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    Progress(cfg.run_dir, rank).beat(0, "convert", math.inf)  # as long as it takes: no peer waits on it
    convert_for_resume(cfg.checkpoint_dir, rank, world_size)
    world = init_distributed(cfg.distributed.timeout_s)
    try:
        result = Trainer(cfg, world).fit()
    except BaseException:
        abort()  # never a collective on the way out: the other ranks may be dead or blocked in one
        raise
    shutdown()
    return result


def build_model(task, cfg: StageConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The task's model in the run's precision. Under ZeRO-3 its towers are built inside zero.Init, which partitions
    them in the dtype its config names; what the task builds outside it (the image-text text tower, the temperature)
    is cast here, since DeepSpeed casts nothing in a model that zero.Init has touched and ZeRO-3 needs one dtype.
    Buffers go to `device` here too: DeepSpeed then skips module.to(device) and moves parameters only, so the text
    tower's attention mask would stay on the CPU while the tokens are on the GPU."""
    import deepspeed

    if cfg.zero.stage != 3:
        return task.build(nullcontext())
    zero_init = deepspeed.zero.Init(config_dict_or_path={
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "zero_optimization": zero_optimization(cfg, device.type == "cuda"),
        "bf16": {"enabled": cfg.precision == "bf16"}, "fp16": {"enabled": cfg.precision == "fp16"}})
    model = task.build(zero_init)
    for param in model.parameters():
        if not is_partitioned(param):
            param.data = param.data.to(dtype)
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to(device))
    return model


class Trainer:
    def __init__(self, cfg: StageConfig, world: World):
        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if world.is_main:
            save_resolved(cfg, self.run_dir / "config.yaml")
        preemption.install_handlers()
        self.progress, self.step = Progress(self.run_dir, world.rank), 0
        with self._phase("start"):  # loads the checkpoint it resumes from
            self._build()

    def _build(self):
        import deepspeed

        from pretrain.data import DeviceBatch, build_train_loader

        cfg, world = self.cfg, self.world
        apply_cuda_settings(cfg.cuda)
        self.task = build_task(cfg, world)
        self.dtype = DTYPES[cfg.precision]
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep, world.rank, world.size,
                                             self.task.backbone_prefix)

        self.ignored_checkpoints = []
        tag = self.checkpoints.resume_tag(report=self._report_ignored)
        universal = tag is not None and self.checkpoints.needs_universal(tag)
        if universal:
            tag = self.checkpoints.prepare_universal(tag)

        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = build_model(self.task, cfg, self.dtype, world.device)
        if cfg.model.compile:
            compile_layers(self.task.backbone(model))
        pretrained = read_state_dict(cfg.model.pretrained) if cfg.model.pretrained and tag is None else None
        if pretrained is not None:
            load_backbone(self.task.backbone(model), pretrained, cfg.model.pretrained)

        base_lr = peak_lr(cfg, world.size)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg, base_lr),
            config=deepspeed_config(cfg, base_lr, world.device.type == "cuda", universal),
            lr_scheduler=scheduler_factory(cfg, base_lr))
        if pretrained is not None:
            load_fp32_masters(self.task.backbone(self.engine.module), pretrained)
            del pretrained  # the whole backbone in host memory on every rank, no longer needed
        if world.is_main:
            print(f"[rank 0] {startup_line(world.device, self.engine.basic_optimizer, cfg.precision)}",
                  file=sys.stderr, flush=True)
        self.checkpoints.attach(self.engine)
        self.loader = build_train_loader(cfg.data, rank=world.rank, world_size=world.size,
                                         batch_size=cfg.batch_size, seed=cfg.seed)
        self.device_batch = DeviceBatch(cfg.data, world.device, training=True)
        self.ema = PartitionedEMA(self.engine.module, cfg.ema_decay) if cfg.ema_decay else None
        # Everything a rank checkpoints beside DeepSpeed's own state, each with state_dict/load_state_dict. A new
        # stateful part is one line here.
        self.stateful = {"loader": self.loader, "task": self.task}
        if self.ema is not None:
            self.stateful["ema"] = self.ema
        self.resumed_from, self.data_resumed = tag, None
        if tag is not None:
            self._restore(tag)
        else:
            seed_everything(cfg.seed * 1000 + world.rank + 1)  # ranks differ from here on (drop path, mixup)

    def _report_ignored(self, message: str):
        print(f"[rank 0] {message}", file=sys.stderr, flush=True)
        self.ignored_checkpoints.append(message)

    def _restore(self, tag: str):
        self.step, rank_state = self.checkpoints.load(self.engine, tag)
        if rank_state is None:  # another world size: the per-rank parts are put together and split anew
            seed_everything(self.cfg.seed * 1000 + self.world.rank + 1 + self.step)
            # the data streams are resharded from every old rank's loader state: the epoch goes on where it stood
            self.data_resumed = self.loader.reshard(self.checkpoints.saved_rank_states(tag, "loader"))
            if self.ema is not None:
                self.ema.load_whole(whole_ema(self.checkpoints.saved_rank_states(tag, "ema")), self.world.rank)
            return
        missing = sorted(set(self.stateful) - set(rank_state))
        if missing:
            raise RuntimeError(f"checkpoint {tag} holds no state for {missing} (saved by a run configured otherwise, "
                               "e.g. without ema_decay); resume with the settings it was saved with")
        for name, part in self.stateful.items():
            part.load_state_dict(rank_state[name])

    # -- the loop

    def fit(self) -> dict:
        cfg = self.cfg
        metrics = MetricsLogger(self.run_dir, self.world.is_main, cfg.max_steps, self.step,
                                cfg.logging.tensorboard, cfg.logging.progress_bar,
                                cfg.logging.wandb_project if cfg.logging.wandb else None, cfg.to_dict())
        for message in self.ignored_checkpoints:
            metrics.event("checkpoint_ignored", message=message)
        if self.resumed_from is not None:
            metrics.event("resume", step=self.step, checkpoint=self.resumed_from, world_size=self.world.size,
                          **({"data": self.data_resumed} if self.data_resumed else {}))
        elif cfg.model.pretrained:
            metrics.event("pretrained", step=0, path=str(Path(cfg.model.pretrained).resolve()))
        flops = self._flops_per_sample()
        batches, window, start_step = iter(self.loader), _Window(), self.step
        try:
            while self.step < cfg.max_steps:
                pause = self.step == cfg.checkpoint.pause_at and self.step > start_step  # alike on every rank
                if pause or self.step % cfg.checkpoint.stop_check_every == 0 and \
                        any_rank(preemption.stop_requested(), self.world.device):
                    self._save()
                    metrics.event("paused" if pause else "preempted", step=self.step)
                    return {"status": "preempted", "metrics": {"step": self.step}}
                self.progress.beat(self.step, "step", cfg.distributed.allowance_s("step"))
                window.add(self._train_step(batches))
                self.step += 1
                metrics.advance()
                if self.step % cfg.logging.every == 0 or self.step == cfg.max_steps:
                    metrics.log(self.step, self._report(window, flops))
                    window = _Window()
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.max_steps:
                    self._save()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.max_steps:
                    metrics.log(self.step, self.evaluate())
            result = {"step": self.step, **self.evaluate()}
            metrics.log(self.step, result)
            result["headline"] = {shown: result[key] for key, shown in self.task.summary.items() if key in result}
            if self.world.is_main:
                atomic_write_json(self.run_dir / "result.json", result)
            return {"status": "completed", "metrics": result}
        finally:
            batches.close()  # shuts the data workers down now, not at interpreter exit
            metrics.close()

    def _train_step(self, batches) -> dict:
        losses, skipped, extra = [], {}, {}
        for _ in range(self.cfg.optim.grad_accumulation):
            batch = next(batches)
            for reason, count in batch.get("skipped", {}).items():
                skipped[reason] = skipped.get(reason, 0) + count
            loss, extra = self.task.loss(self.engine, self.device_batch(batch), self.dtype)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())  # a tensor: reading it would wait for the device, and is left to log steps
        if not self.engine.was_step_applied():
            # DeepSpeed skipped the update (an fp16 overflow, or any non-finite gradient norm) and with it the lr
            # schedule's step, while this step still counts towards max_steps: the schedule is kept at self.step.
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return {"loss": torch.stack(losses).mean(), "skipped": skipped, "samples": len(losses) * self.cfg.batch_size,
                **extra}

    def _report(self, window: "_Window", flops_per_sample: float) -> dict:
        device = self.world.device
        averaged = mean_over_ranks({"loss": window.mean("loss"), **window.extras()}, device)
        skipped = sum_counts_over_ranks(window.skipped)
        samples_per_s = window.samples * self.world.size / max(window.elapsed(), 1e-9)
        # The largest group's lr: under layer decay group 0 (the stem) runs at a tiny fraction of the schedule's lr.
        report = {**averaged, "lr_peak": max(self.scheduler.get_last_lr()), "samples_per_s": samples_per_s,
                  "skipped": skipped_total(skipped),
                  **{k if k in NOT_SKIPS else f"skipped/{k}": v for k, v in skipped.items()},
                  "peak_memory_mb": peak_memory_per_rank(device),
                  "tflops_per_device": flops_per_sample * samples_per_s / self.world.size / 1e12}
        peak = device_peak_tflops(device, self.cfg.logging.peak_tflops)
        if peak:
            report["mfu"] = report["tflops_per_device"] / peak
        return report

    def _flops_per_sample(self) -> float:
        return train_flops_per_sample(self.task.build, self.task.example_inputs(1))

    # -- the long phases, checkpoints and evaluation

    @contextmanager
    def _phase(self, name: str):
        """A phase with an allowance of its own: its heartbeat says so on entry, and its collectives wait as long for a
        peer; the step's timeout holds again after it."""
        allowance_s = self.cfg.distributed.allowance_s(name)
        self.progress.beat(self.step, name, allowance_s)
        with collective_timeout(allowance_s, after_s=self.cfg.distributed.timeout_s):
            yield

    def _save(self):
        with self._phase("save"):
            self.checkpoints.save(self.engine, self.step,
                                  {name: part.state_dict() for name, part in self.stateful.items()})

    def evaluate(self) -> dict:
        from pretrain.data import DeviceBatch, DeviceLoader, build_eval_loader

        if self.cfg.data.val is None and self.cfg.data.demo_root is None:
            return {}
        data = dataclasses.replace(self.cfg.data, format=self.task.eval_format)
        with self._phase("evaluate"):
            loader = DeviceLoader(build_eval_loader(data, rank=self.world.rank, world_size=self.world.size,
                                                    batch_size=self.cfg.batch_size),
                                  DeviceBatch(data, self.world.device, training=False))
            self.engine.eval()
            try:
                # Compiled layers run eagerly here: each evaluation's last, partial batch is a new shape to compile for.
                with self.ema.swapped_in() if (self.ema and self.cfg.eval.ema) else nullcontext(), \
                        torch.compiler.set_stance("force_eager"):
                    return self.task.evaluate(self.engine.module, loader, self.dtype)
            finally:
                self.engine.train()


class _Window:
    """Accumulates the steps between two log lines."""

    def __init__(self):
        self.start, self.steps, self.samples, self.skipped, self.values = time.time(), 0, 0, {}, {}

    def add(self, step: dict):
        self.steps += 1
        self.samples += step.pop("samples")
        for reason, count in step.pop("skipped").items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        for key, value in step.items():
            self.values.setdefault(key, []).append(value)

    def mean(self, key: str) -> float:
        return sum(self.values[key]) / len(self.values[key])

    def extras(self) -> dict:
        return {k: self.mean(k) for k in self.values if k != "loss"}

    def elapsed(self) -> float:
        return time.time() - self.start
