"""Schedules: an ordered list of stages, each a stage config plus overrides, run into RUN_DIR/<stage>/.

A schedule YAML has a `stages:` list (and optionally `run_dir:`, the default RUN_DIR); any other YAML is a stage config
and runs as a one-stage plan. Each stage after the first starts from the previous stage's consolidated backbone:
`model.pretrained=RUN_DIR/<prev>/export/backbone.safetensors`, exported from RUN_DIR/<prev>/checkpoints/ when that stage
completes (the last stage too). After every stage, RUN_DIR/summary.json collects each finished stage's result.json.

Command-line overrides apply to every stage, after the schedule's own; `STAGE:key=value` applies to one stage only.
`run_dir=...` on the command line names RUN_DIR (for a stage config, the stage's run_dir).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pretrain.fileio import atomic_write_json
from pretrain.typed_config import apply_overrides, load_yaml, split_override

EXPORT = "export"
BACKBONE = "backbone.safetensors"
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class StagePlan:
    """One stage as it will run: everything a rank process needs, in absolute paths."""

    name: str
    config: str
    overrides: list[str]
    run_dir: str
    index: int = 0
    pretrained_from: str | None = None  # the previous stage's run_dir; its export is made before this stage trains
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def export_dir(self) -> Path:
        return Path(self.run_dir) / EXPORT

    def result_path(self) -> Path:
        return Path(self.run_dir) / "result.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    source: str
    run_dir: str
    stages: list[StagePlan]
    is_schedule: bool

    @property
    def name(self) -> str:
        return Path(self.source).stem


def is_schedule(doc: Any) -> bool:
    return isinstance(doc, dict) and "stages" in doc


def _stage_overrides(raw: Any, where: str) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [f"{k}={_yaml_scalar(v)}" for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return list(raw)
    raise ValueError(f"{where}: overrides must be a mapping or a list of 'key=value' strings")


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _resolve_path(path: str, base: Path) -> str:
    """A stage config's path, relative to the schedule file (so a schedule runs from any directory), or else to
    where the command runs (schedules written with repository-root paths)."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    if (base / p).exists() or not p.exists():
        return str((base / p).resolve())
    return str(p.resolve())


def build_plan(source: str, overrides: list[str], default_runs: str = "runs") -> Plan:
    """Resolve a schedule or stage YAML plus command-line overrides into the stages to run."""
    doc = load_yaml(source)
    base = Path(source).resolve().parent
    common: list[str] = []
    scoped: dict[str, list[str]] = {}
    run_dir = None
    for item in overrides:
        key, value = split_override(item)
        if ":" in key:
            stage, key = key.split(":", 1)
            scoped.setdefault(stage, []).append(f"{key}={value}")
        elif key == "run_dir":
            run_dir = value
        else:
            common.append(item)

    if not is_schedule(doc):
        if scoped:
            raise ValueError(f"STAGE:key=value overrides need a schedule; {source} is a stage config")
        if run_dir is None:
            run_dir = (doc.get("run_dir") if isinstance(doc, dict) else None) or str(Path(default_runs) / Path(source).stem)
        run_dir = str(Path(run_dir).resolve())
        stage = StagePlan(Path(source).stem, str(Path(source).resolve()), common + [f"run_dir={run_dir}"], run_dir)
        return Plan(str(Path(source).resolve()), run_dir, [stage], is_schedule=False)

    stages_doc = doc["stages"]
    if not isinstance(stages_doc, list) or not stages_doc:
        raise ValueError(f"{source}: `stages` must be a non-empty list")
    unknown = set(doc) - {"stages", "run_dir", "description"}
    if unknown:
        raise ValueError(f"{source}: unknown schedule keys {sorted(unknown)} (allowed: stages, run_dir, description)")
    run_dir = str(Path(run_dir or doc.get("run_dir") or Path(default_runs) / Path(source).stem).resolve())
    names = [s.get("name") if isinstance(s, dict) else None for s in stages_doc]
    for stage in scoped:
        if stage not in names:
            raise ValueError(f"override for unknown stage {stage!r}; stages are {names}")
    plans: list[StagePlan] = []
    for i, spec in enumerate(stages_doc):
        where = f"{source}: stages[{i}]"
        if not isinstance(spec, dict) or not spec.get("name") or not spec.get("config"):
            raise ValueError(f"{where}: each stage needs `name` and `config`")
        extra_keys = set(spec) - {"name", "config", "overrides", "slurm"}
        if extra_keys:
            raise ValueError(f"{where}: unknown keys {sorted(extra_keys)} (allowed: name, config, overrides, slurm)")
        name = spec["name"]
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
            raise ValueError(f"{where}: stage name {name!r} must be letters, digits, '_', '-' or '.' (it names a "
                             "folder and a SLURM job)")
        if names.count(name) > 1:
            raise ValueError(f"{where}: stage name {name!r} is used twice")
        stage_dir = str(Path(run_dir) / name)
        stage_over = _stage_overrides(spec.get("overrides"), where) + common + scoped.get(name, [])
        prev = plans[-1].run_dir if plans else None
        managed = [f"run_dir={stage_dir}"]
        if prev is not None:
            managed.append(f"model.pretrained={Path(prev) / EXPORT / BACKBONE}")
        plans.append(
            StagePlan(name, _resolve_path(spec["config"], base), stage_over + managed, stage_dir, i, prev,
                      extra={"slurm": spec.get("slurm") or {}})
        )
    return Plan(str(Path(source).resolve()), run_dir, plans, is_schedule=True)


def resolved_config(stage: StagePlan, validate: bool = True) -> dict[str, Any]:
    """The stage's config after overrides, validated by the engine's loader (validate=False: the raw YAML with the
    dotted overrides applied, for stand-in engines in tests)."""
    if validate:
        from pretrain.config import load_stage_config

        return load_stage_config(stage.config, list(stage.overrides)).to_dict()
    return apply_overrides(load_yaml(stage.config), list(stage.overrides))


def ensure_export(stage: StagePlan, consolidate: Callable[..., Any], *, is_leader: bool = True,
                  timeout_s: float = 1800.0) -> Path | None:
    """Make RUN_DIR/<prev>/export/ from the previous stage's checkpoints, once (atomically, by renaming a temp dir).

    The leader consolidates; other ranks wait for the directory to appear. Returns the export dir, or None for a
    stage that starts from scratch.
    """
    if stage.pretrained_from is None:
        return None
    prev = Path(stage.pretrained_from)
    export = prev / EXPORT
    if (export / BACKBONE).exists():
        return export
    if not is_leader:
        deadline = time.monotonic() + timeout_s
        while not (export / BACKBONE).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {export} to be exported by rank 0")
            time.sleep(0.5)
        return export
    if not (prev / "checkpoints").is_dir():
        raise FileNotFoundError(f"stage {stage.name!r} starts from {prev.name!r}, but {prev / 'checkpoints'} does not "
                                f"exist (did {prev.name!r} run?)")
    return export_stage(prev, consolidate)


def export_stage(run_dir: Path, consolidate: Callable[..., Any]) -> Path:
    """RUN_DIR/export/ from the stage's own checkpoints, written to a temp dir and renamed into place."""
    prev, export, ckpt = run_dir, run_dir / EXPORT, run_dir / "checkpoints"
    if (export / BACKBONE).exists():
        return export
    tmp = prev / f".{EXPORT}.tmp-{os.getpid()}"
    weights = reported_weights(run_dir)
    print(f"[{run_dir.name}] exporting the {weights} weights: the ones its evaluation reported", flush=True)
    consolidate(str(ckpt), str(tmp), dtype="fp16", weights=weights)
    if not (tmp / BACKBONE).exists():
        raise RuntimeError(f"consolidate({ckpt}) did not write {tmp / BACKBONE}")
    try:
        os.rename(tmp, export)
    except OSError:
        if not (export / BACKBONE).exists():
            raise
    return export


def reported_weights(run_dir: Path) -> str:
    """"ema" when the stage evaluated its EMA (eval.ema in the config it ran with), else "live": a stage hands on the
    weights whose metric it reported."""
    try:
        ran_with = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except FileNotFoundError:  # a stand-in engine that writes no resolved config
        return "live"
    return "ema" if (ran_with.get("eval") or {}).get("ema") else "live"


def read_result(stage: StagePlan) -> dict[str, Any] | None:
    """The stage's result.json, or None while it has not finished. An unreadable one (a copy cut short, say) counts as
    not finished: running the stage again resumes from its last checkpoint and writes it anew."""
    try:
        with open(stage.result_path()) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        print(f"[{stage.name}] ignoring {stage.result_path()} ({error}): the stage will run again from its last "
              "checkpoint", file=sys.stderr, flush=True)
        return None


def write_summary(plan: Plan) -> dict[str, Any]:
    """RUN_DIR/summary.json: each finished stage's metrics, and at the top level the headline figures each stage's task
    chose (its result's "headline"; a later stage's win), and under "headlines" each stage's own, by stage name (two
    fine-tuning stages both report finetune_top1)."""
    stages: dict[str, Any] = {}
    headlines: dict[str, Any] = {}
    summary: dict[str, Any] = {"schedule": plan.source, "run_dir": plan.run_dir, "stages": stages,
                               "headlines": headlines}
    for stage in plan.stages:
        result = read_result(stage)
        stages[stage.name] = {
            "config": stage.config,
            "run_dir": stage.run_dir,
            "pretrained": str(Path(stage.pretrained_from) / EXPORT / BACKBONE) if stage.pretrained_from else None,
            "status": "completed" if result is not None else "not finished",
            "metrics": result,
        }
        if result is not None:
            headlines[stage.name] = result.get("headline", {})
            summary.update(headlines[stage.name])
    summary["complete"] = all(s["status"] == "completed" for s in stages.values())
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(plan.run_dir) / "summary.json", summary)
    return summary
