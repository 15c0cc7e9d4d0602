"""The stage config: one typed tree from which the model, the data pipeline, the DeepSpeed JSON and the run layout are
all derived. Layered as: dataclass defaults -> YAML file -> dotted command-line overrides; the resolved config is
written into the run directory. It imports neither torch nor the engine nor the model zoo (tests/test_layering.py):
what needs them, the model's name and the image side its head takes, is checked by pretrain/engine/config_checks.py.
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from pretrain.data.config import CLASSIFICATION, IMAGE_TEXT, DataConfig
from pretrain.fileio import atomic_write_text
from pretrain.typed_config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

TASK_FORMATS = {"image-text": IMAGE_TEXT, "classification": CLASSIFICATION}
"""The objectives a stage's `task` names (pretrain.engine.tasks.TASKS, kept equal by tests/test_config_checks.py), and
the sample format (data.format) the shards of each hold."""


def train_format(task: str) -> str:
    if task not in TASK_FORMATS:
        raise ConfigError(f"task: unknown task {task!r}; choose from {sorted(TASK_FORMATS)}")
    return TASK_FORMATS[task]


def _positive(section: str, **values) -> None:
    """Each value must be > 0 (None: unset, allowed); the error names the key."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{section}{name} must be > 0, got {value}")


def _non_negative(section: str, **values) -> None:
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{section}{name} must be >= 0, got {value}")


@dataclass
class ModelArgs:
    """The release's InternImage constructor arguments, by its names (a typo is an error, not a silent default). Each
    left unset (None) keeps the value of the model `model.name` names; tests/test_config_checks.py keeps this list
    equal to InternImage.__init__'s. num_classes comes from the task, with_cp from activation_checkpointing."""

    channels: int | None = None
    depths: list[int] | None = None
    groups: list[int] | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float | None = None
    layer_scale: float | None = None
    offset_scale: float | None = None
    post_norm: bool | None = None
    res_post_norm: bool | None = None
    dw_kernel_size: int | None = None
    level2_post_norm: bool | None = None
    level2_post_norm_block_ids: list[int] | None = None
    center_feature_scale: bool | None = None
    use_clip_projector: bool | None = None
    remove_center: bool | None = None
    in_chans: int | None = None
    global_pool: str | None = None


@dataclass
class ModelConfig:
    name: str = "internimage_t"
    """A registered model: internimage_t|s|b|l|xl|h|g (checked by pretrain/engine/config_checks.py)."""
    args: ModelArgs = field(default_factory=ModelArgs)
    """Overrides of the release's hyper-parameters (channels, depths, groups, ...)."""
    pretrained: str | None = None
    """A consolidated backbone (.safetensors or .pth with the release's key names) to start from."""
    activation_checkpointing: bool = False
    """Recompute each InternImage layer in the backward pass (per-layer torch.utils.checkpoint)."""
    compile: bool = False
    """Run each InternImage layer under torch.compile (inductor), DCNv3 kept as its one custom op; ZeRO-3 then gathers
    a layer's parameters as a whole (pretrain/engine/compiled.py). The first steps pay the compilation."""

    def arguments(self) -> dict:
        """create_model's keyword arguments: the ones the config sets."""
        return {k: v for k, v in to_dict(self.args).items() if v is not None}


@dataclass
class TextConfig:
    """The text tower of the image-text stage: open_clip's TextTransformer."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    vocab_size: int = 49408
    embed_dim: int = 768
    """The joint embedding size; the vision tower's head projects to it."""

    def __post_init__(self):
        _positive("text.", width=self.width, layers=self.layers, heads=self.heads, vocab_size=self.vocab_size,
                  embed_dim=self.embed_dim)
        if self.width % self.heads:
            raise ConfigError(f"text.width ({self.width}) must be a multiple of text.heads ({self.heads})")


@dataclass
class OptimConfig:
    RENAMED: ClassVar[dict[str, str]] = {"offset_lr_scale": "dcn_lr_mul"}  # one name, the release's
    lr: float = 1e-3
    """Peak learning rate at the reference batch `lr_batch` (scaled linearly with the global batch)."""
    lr_batch: int = 512
    min_lr: float = 0.0
    """Learning rate at the end of the cosine schedule, as an absolute value."""
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float | None = None
    """The release's layer-wise lr decay: the k-th InternImage layer counted from the last gets lr * layer_decay**k
    (the stem and downsamples follow their neighbouring layers, the heads keep lr); None disables it."""
    dcn_lr_mul: float = 1.0
    """The release's DCN_LR_MUL, by its name: lr multiplier of DCNv3 offset and center-feature-scale parameters (not the
    mask); as in the release it applies only with layer_decay (H/G fine-tuning: 0.1)."""
    grad_clip: float | None = 5.0
    grad_accumulation: int = 1

    def __post_init__(self):
        _positive("optim.", lr=self.lr, lr_batch=self.lr_batch, eps=self.eps, grad_clip=self.grad_clip,
                  grad_accumulation=self.grad_accumulation)
        _non_negative("optim.", min_lr=self.min_lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                      dcn_lr_mul=self.dcn_lr_mul)
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optim.betas must both be in [0, 1), got {list(self.betas)}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class ZeroConfig:
    """DeepSpeed's ZeRO settings (its names). The sizes count elements, and are sized for InternImage-H (1.09B
    parameters, its largest layer, a stage-4 block, 71M) and G (3.08B, 183M) on 80 GB GPUs."""

    stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    """Parameters kept in CPU memory, from zero.Init on (the model is never whole on a GPU)."""
    reduce_bucket_size: int = 200_000_000
    """Gradients reduce-scattered per bucket: 800 MB in fp32 (DeepSpeed's 5e8 would be 2 GB), a whole G layer, and
    6 MB a rank across 128 ranks, so the collective is bandwidth- not latency-bound."""
    stage3_prefetch_bucket_size: int = 200_000_000
    """Parameters gathered ahead of use: the next whole G layer (183M, 400 MB in bf16), so its all-gather overlaps the
    current layer's compute; DeepSpeed's 5e7 is not a quarter of one."""
    stage3_max_live_parameters: int = 1_000_000_000
    """Gathered parameters held at once (2 GB in bf16): the layer in use and the prefetched one fit (2 x 183M), with
    room for the backward's re-gathers; DeepSpeed's default, lowered only where memory is short."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay whole on every rank, never gathered: every norm, bias, layer scale and
    depth-wise convolution (1052 of H's 1357 tensors, 894 of G's 1295) for 5.0M (H) / 4.6M (G) parameters per rank.
    DeepSpeed's default; 1e6 would keep 65M more of H whole to save 120 of 305 gathers, which the prefetch hides."""
    sub_group_size: int = 100_000_000
    """The optimizer steps each rank's partition in groups this large, each with an fp32 copy of its gradients: 400 MB
    where DeepSpeed's 1e9 is 4 GB once a rank holds that much (G on fewer than 4 ranks, a rehearsal); on 128 ranks a
    G partition (24M) is one group either way."""
    communication_data_type: Literal["fp32", "bf16", "fp16"] = "fp32"
    """The dtype gradients are reduce-scattered in. fp32: summed in bf16 across 128 ranks, each partial sum would be
    rounded to 8 bits of mantissa; the fp32 bucket costs twice the bytes on the wire."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other key of DeepSpeed's zero_optimization section, passed on as written (overlap_comm,
    stage3_max_reuse_distance, ...) and checked by DeepSpeed's own DeepSpeedZeroConfig before any rank starts. A key
    this section sets itself is refused: set it by its name here."""

    def __post_init__(self):
        if self.offload_params and self.stage != 3:
            raise ConfigError("zero.offload_params needs zero.stage 3")
        _positive("zero.", reduce_bucket_size=self.reduce_bucket_size,
                  stage3_prefetch_bucket_size=self.stage3_prefetch_bucket_size,
                  stage3_max_live_parameters=self.stage3_max_live_parameters, sub_group_size=self.sub_group_size)
        _non_negative("zero.", stage3_param_persistence_threshold=self.stage3_param_persistence_threshold)


@dataclass
class CudaConfig:
    """Process-wide GPU math settings, applied at start-up (pretrain/engine/backends.py)."""

    tf32: bool = True
    """TF32 tensor cores for fp32 matmuls and convolutions (torch.backends.cuda.matmul / cudnn allow_tf32). What runs
    in fp32 (an fp32 stage, a bf16 stage's fp32 loss) then goes ~8x faster on A100/H100, with a 10-bit mantissa, more
    than bf16's 7; bf16 and fp16 ops are unaffected. false: full fp32 (a precision check)."""
    cudnn_benchmark: bool = True
    """cudnn times its convolution algorithms once per input shape and keeps the fastest: a stage's stem, downsample
    and depth-wise convolutions see one shape each, so the search is paid once."""


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save every this many optimizer steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep: int = 3
    """Keep the newest this many checkpoints."""
    stop_check_every: int = 10
    """Steps between the ranks' joint checks for a stop request (SIGTERM, SIGUSR1, SLURM's USR2): a stop saves
    within this many steps. Each check is a collective that waits for the device, so not every step; SLURM's signal
    comes signal_delay_s (90 s) before the time limit, which must hold this many steps and the save."""
    pause_at: int | None = None
    """Save at this optimizer step and end the stage as a preemption does, the schedule still that of max_steps; the
    same command resumes it and runs on (the rehearsal's save-and-resume; a first look at a long run)."""

    def __post_init__(self):
        _positive("checkpoint.", every=self.every, keep=self.keep, stop_check_every=self.stop_check_every,
                  pause_at=self.pause_at)


@dataclass
class LoggingConfig:
    every: int = 10
    """Write metrics.jsonl / TensorBoard every this many steps."""
    tensorboard: bool = True
    progress_bar: bool = True
    """A tqdm bar on rank 0, drawn only when stderr is a terminal."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for the MFU estimate; None: looked up for known GPUs, else MFU is not reported."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; WANDB_MODE=offline writes RUN_DIR/wandb/ only)."""
    wandb_project: str = "internimage-pretrain"

    def __post_init__(self):
        _positive("logging.", every=self.every, peak_tflops=self.peak_tflops)
        if self.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("logging.wandb needs the wandb package: pip install wandb==0.31.0")


@dataclass
class ZeroShotConfig:
    classes: str = "imagenet1k"
    """Class names in label order: "imagenet1k" (open_clip's), "demo-digits", or a text file, one name per line."""
    templates: str = "openai"
    """Prompt templates: "openai" (CLIP's, from open_clip), "demo-digits", or a text file of "...{}..." lines."""


@dataclass
class EvalConfig:
    every: int | None = None
    """Evaluate every this many steps; None: only at the end."""
    ema: bool = False
    """Evaluate the EMA weights (needs ema_decay)."""
    zero_shot: ZeroShotConfig | None = None
    """Image-text stages: zero-shot classification of labelled val shards with these class names; None: retrieval
    (image->text and text->image recall@1/5/10) on the val shards' captions."""

    def __post_init__(self):
        _positive("eval.", every=self.every)


@dataclass
class DistributedConfig:
    """How long each phase of a stage may last. A rank's collectives wait this long for a silent peer, and the local
    launcher lets a rank go this long (plus a grace) without a heartbeat, before the job ends naming the rank that
    stopped (pretrain/progress.py). The long phases have their own allowance, so that the steps, where a hang is most
    likely, need not wait as long as a save."""

    timeout_s: float = 600.0
    """The allowance of a training step (and of the collectives between phases). A healthy step of G takes seconds;
    its slowest healthy wait is the first batch after a resume, whose loader reads its shuffle buffer back (5,000
    seeked samples per worker at ~4 ms, 20 s; docs/benchmarks.md). 600 s, NCCL's own default, is 30x that, and a hung
    rank costs the job 10 minutes, not the 30 a save needs."""
    checkpoint_timeout_s: float = 1800.0
    """The allowance of a checkpoint's save, and of the start-up, which loads one. Sized for InternImage-G: 3B
    parameters x 14 bytes (bf16 weights, fp32 master copy, two Adam moments) = 42 GB, about 7 minutes at the 100 MB/s a
    contended shared file system gives, and 4x that for a slower one."""
    eval_timeout_s: float = 1800.0
    """The allowance of an evaluation, which beats once, on entry. Sized for a full ImageNet-1k val pass, 50,000 images,
    on a single rank: decoding alone is 4.4 minutes at the ~190 samples/s one core gives (docs/benchmarks.md), and 4x
    that for a loaded file system, beside the model's forward and, zero-shot, the class prompts' text tower."""

    def __post_init__(self):
        _positive("distributed.", timeout_s=self.timeout_s, checkpoint_timeout_s=self.checkpoint_timeout_s,
                  eval_timeout_s=self.eval_timeout_s)

    def allowance_s(self, phase: str) -> float:
        """How long `phase` (a name of pretrain/progress.py's, other than "convert") may last."""
        return {"start": self.checkpoint_timeout_s, "step": self.timeout_s, "save": self.checkpoint_timeout_s,
                "evaluate": self.eval_timeout_s}[phase]


@dataclass
class StageConfig:
    task: str = "image-text"
    """The objective, a name in TASK_FORMATS: "image-text" (contrastive pretraining) or "classification"
    (fine-tuning)."""
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int | None = None
    """Optimizer steps of the stage; None: from `epochs`."""
    epochs: float | None = None
    """The stage's length in passes over data.samples_per_epoch, counted as the release counts them: whole global
    batches per epoch (its loader drops the last partial batch) times the epochs. Sets max_steps unless given."""
    warmup_epochs: float | None = None
    """Warm-up in epochs, counted the same way; sets optim.warmup_steps."""
    global_batch: int | None = None
    """The global batch the stage is written for (batch_size x ranks x optim.grad_accumulation), checked at start-up;
    epochs and warmup_epochs count steps of it."""
    batch_size: int = 32
    """Micro-batch per rank; the global batch is batch_size * world_size * optim.grad_accumulation."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    num_classes: int = 1000
    """Classification only: the classifier's number of classes."""
    ema_decay: float | None = None
    """Keep an EMA of the weights (each rank of its own ZeRO partition)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(demo_root="data/demo"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    cuda: CudaConfig = field(default_factory=CudaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        _positive("", epochs=self.epochs, warmup_epochs=self.warmup_epochs, global_batch=self.global_batch)
        self._steps_from_epochs()
        _positive("", max_steps=self.max_steps, batch_size=self.batch_size, num_classes=self.num_classes)
        if self.checkpoint.pause_at is not None and self.checkpoint.pause_at >= self.max_steps:
            raise ConfigError(f"checkpoint.pause_at ({self.checkpoint.pause_at}) must be below max_steps "
                              f"({self.max_steps})")
        if not self.run_dir:
            raise ConfigError("run_dir must not be empty")
        trains_on = train_format(self.task)
        if self.data.format != trains_on:
            raise ConfigError(f"data.format ({self.data.format!r}) must be {trains_on!r}, the sample format task "
                              f"{self.task!r} trains on")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.eval.ema and self.ema_decay is None:
            raise ConfigError("eval.ema needs ema_decay")
        if self.task == "classification":
            self.data.num_classes = self.num_classes

    def _steps_from_epochs(self):
        if self.epochs is None and self.warmup_epochs is None:
            if self.max_steps is None:
                raise ConfigError("set max_steps, or epochs (with global_batch and data.samples_per_epoch)")
            return
        if not self.global_batch:
            raise ConfigError("epochs and warmup_epochs need global_batch")
        from pretrain.data.epoch_size import epoch_samples  # reads shard lists with webdataset, which imports torch

        try:
            self.data.samples_per_epoch = epoch_samples(self.data)
        except (OSError, ValueError) as error:
            raise ConfigError(f"epochs and warmup_epochs need the epoch's length: {error}") from None
        steps_per_epoch = self.data.samples_per_epoch // self.global_batch
        if self.max_steps is None:
            if self.epochs is None:
                raise ConfigError("set max_steps or epochs")
            self.max_steps = round(self.epochs * steps_per_epoch)
        elif self.epochs is not None:
            # max_steps shortens (or stretches) the epoch-based run: the schedule keeps its shape, warm-up included,
            # rather than a production warm-up longer than the run.
            steps_per_epoch = self.max_steps / self.epochs
        if self.warmup_epochs is not None:
            warmup = round(self.warmup_epochs * steps_per_epoch)
            if self.optim.warmup_steps not in (0, warmup):
                raise ConfigError(f"optim.warmup_steps ({self.optim.warmup_steps}) disagrees with warmup_epochs "
                                  f"({self.warmup_epochs} = {warmup} steps); set one of them")
            self.optim.warmup_steps = warmup

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"


def load_stage_config(path: str | Path, overrides: list[str] = ()) -> StageConfig:
    """Read a stage YAML, apply `key.path=value` overrides, and validate the result."""
    data = apply_overrides(load_yaml(path), list(overrides))
    trains_on = train_format(data.get("task", StageConfig.task))
    data.setdefault("data", {}).setdefault("format", trains_on)  # said once, by the stage's task
    return from_dict(StageConfig, data)


class MissingFile(ConfigError):
    """A file the stage would read is not there; `config` is the stage config, valid otherwise (what --dry-run shows)."""

    def __init__(self, message: str, config: StageConfig):
        super().__init__(message)
        self.config = config


def check_files(cfg: StageConfig, pretrained_by_schedule: bool = False) -> StageConfig:
    """The files the stage will read: the pretrained weights (unless an earlier stage of the schedule makes them),
    every local shard, and the shard sizes true epochs need; MissingFile names the first file missing."""
    from pretrain.data.epoch_size import disagreement, epoch_sizes
    from pretrain.data.shards import expand_shards

    if cfg.model.pretrained and not pretrained_by_schedule and not Path(cfg.model.pretrained).is_file():
        raise MissingFile(f"model.pretrained: file not found: {cfg.model.pretrained}", cfg)
    patterns = {f"data.train[{i}].shards": source.shards for i, source in enumerate(cfg.data.train)}
    if cfg.data.val:
        patterns["data.val"] = cfg.data.val
    for key, pattern in patterns.items():
        try:
            expand_shards(pattern)
        except (OSError, ValueError) as error:
            raise MissingFile(f"{key}: {error}", cfg) from None
    try:
        epoch_sizes(cfg.data, [expand_shards(source.shards) for source in cfg.data.train])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    warning = disagreement(cfg.data)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return cfg


def save_resolved(config: StageConfig, path: Path):
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
