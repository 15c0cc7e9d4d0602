"""`pretrain rehearse`: every stage of a schedule on its own data paths, the model shrunk to a tiny one of the same
style, a few steps per stage with a pause half-way (a save and the stage's end, as a preemption) and a resume by the
same command, a bounded evaluation, each stage's export and the hand-off to the next, on
this machine's local launcher. The data each stage names is checked first (pretrain/preflight.py). The record goes to
RUN_DIR/rehearsal.json, RUN_DIR a `-rehearsal` sibling of the schedule's own run_dir unless run_dir= names one."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from launch.local import run_plan
from launch.schedule import Plan, build_plan, read_result, write_summary
from launch.worker import DEFAULT_ENGINE
from pretrain.fileio import atomic_write_json

SMALLEST_IMAGE = 32  # the smallest side every InternImage takes (H/G need a multiple of 32)
MICRO_BATCH = 2


def shrink(model_name: str, nproc: int, steps: int) -> list[str]:
    """Overrides for a tiny model of the same style (residual form, head and DCNv3 options, num_classes kept), the
    smallest image, a one-layer text tower and a global batch the ranks give, a few steps with a pause half-way."""
    from pretrain.models.internimage import MODEL_CONFIGS

    overrides = ["model.args.channels=16", "model.args.depths=[1,1,1,1]", "model.args.groups=[1,2,4,8]",
                 f"data.image_size={SMALLEST_IMAGE}", "data.workers=0", "text.width=32", "text.layers=1",
                 "text.heads=2", f"batch_size={MICRO_BATCH}", f"global_batch={MICRO_BATCH * nproc}",
                 "optim.grad_accumulation=1", f"max_steps={steps}", f"checkpoint.every={steps // 2}",
                 f"checkpoint.pause_at={steps // 2}",
                 "logging.every=1", "logging.tensorboard=false", "logging.progress_bar=false"]
    if MODEL_CONFIGS[model_name].get("level2_post_norm_block_ids"):
        overrides.append("model.args.level2_post_norm_block_ids=[0]")  # the one block of the shrunk stage 3
    return overrides


def rehearsal_plan(source: str, overrides: list[str], nproc: int, steps: int) -> Plan:
    """The schedule's plan with every stage shrunk (each keeps its own model family) and its val set bounded to
    one shard, in the rehearsal's run directory."""
    from pretrain.config import load_stage_config
    from pretrain.data.shards import expand_shards

    plan = build_plan(source, overrides)
    if not any(o.startswith("run_dir=") for o in overrides):
        plan = build_plan(source, overrides + [f"run_dir={plan.run_dir}-rehearsal"])
    for stage in plan.stages:
        cfg = load_stage_config(stage.config, stage.overrides)
        bounded_val = [f"data.val={expand_shards(cfg.data.val)[0]}"] if cfg.data.val else []
        stage.overrides[:0] = shrink(cfg.model.name, nproc, steps) + bounded_val  # the user's overrides win
    return plan


def on_the_shards_epoch(plan: Plan) -> None:
    """Each stage's epoch set to the samples its shards hold, where every one has a size (the configured epoch is
    checked against that count first): an epoch far longer than the rehearsal's few shards would make each stream's
    state of true epochs a list of every pass over them, saved and loaded at every checkpoint."""
    from pretrain.config import load_stage_config
    from pretrain.data.epoch_size import counted_samples

    for stage in plan.stages:
        counted, _ = counted_samples(load_stage_config(stage.config, stage.overrides).data)
        if counted:
            stage.overrides.insert(0, f"data.samples_per_epoch={counted}")  # the user's overrides still win


def zero_shot_class_count(cfg) -> int | None:
    """How many classes the image-text stage's zero-shot evaluation scores (None: classification, or retrieval)."""
    if cfg.task != "image-text" or cfg.eval.zero_shot is None:
        return None
    from pretrain.engine.tasks.zero_shot import class_names

    return len(class_names(cfg.eval.zero_shot.classes))


def check_stages(plan: Plan, nproc: int) -> tuple[list[str], list[str]]:
    """Problems (each fails the rehearsal) and warnings, from every stage's config and data, before anything runs."""
    from pretrain.engine.config_checks import check_config
    from pretrain.data.epoch_size import disagreement
    from pretrain.engine.optim import global_batch
    from pretrain.preflight import check_stage

    problems, warnings = [], []
    for stage in plan.stages:
        try:
            cfg = check_config(stage.config, stage.overrides, stage.pretrained_from is not None)
            global_batch(cfg, nproc)
        except (OSError, ValueError) as error:
            problems.append(f"stage {stage.name} ({stage.config}): {error}")
            continue
        problems += check_stage(stage.name, cfg, zero_shot_class_count(cfg))
        warning = disagreement(cfg.data)
        if warning:
            warnings.append(f"stage {stage.name}: {warning}")
    return problems, warnings


def export_last(plan: Plan, log) -> None:
    """Each stage's export is made by the next one's hand-off; the last stage's, here."""
    from launch.schedule import StagePlan, ensure_export
    from pretrain.engine.consolidate import consolidate

    last = plan.stages[-1]
    ensure_export(StagePlan("export", last.config, [], last.run_dir, pretrained_from=last.run_dir), consolidate)
    log(f"[{last.name}] exported to {last.export_dir}")


def events(stage, name: str) -> list[dict]:
    """The stage's metrics.jsonl records of event `name`, oldest first."""
    path = Path(stage.run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == name]


def run_paused_and_resumed(plan: Plan, stage, nproc: int, engine: str, log) -> tuple[int, str | None]:
    """Run the stage (it pauses half-way, saved), then the same again, which must resume from that save and finish.
    The exit status and, when it did not, why."""
    one_stage = Plan(plan.source, plan.run_dir, [stage], True)
    code = run_plan(one_stage, nproc, engine, log)
    paused = events(stage, "paused")
    if not paused:
        return code, None if code else "ran to its end without the pause at checkpoint.pause_at"
    log(f"[{stage.name}] paused at step {paused[-1]['step']}; running it again, which must resume there")
    code = run_plan(one_stage, nproc, engine, log)
    resumed = [r["step"] for r in events(stage, "resume")]
    if code == 0 and resumed != [paused[-1]["step"]]:
        return 1, f"did not resume from the pause at step {paused[-1]['step']} (resumed at: {resumed})"
    return code, None


def rehearse(source: str, overrides: list[str], nproc: int, steps: int, engine: str = DEFAULT_ENGINE,
             log=print) -> int:
    """0 when every check and every stage passed; the record in RUN_DIR/rehearsal.json either way."""
    plan = rehearsal_plan(source, overrides, nproc, steps)
    problems, warnings = check_stages(plan, nproc)
    record = {"schedule": plan.source, "run_dir": plan.run_dir, "nproc": nproc, "steps": steps,
              "problems": problems, "warnings": warnings, "stages": {}}
    on_the_shards_epoch(plan)
    for stage in plan.stages if not problems else []:
        start = time.monotonic()
        code, why = run_paused_and_resumed(plan, stage, nproc, engine, log)
        if code == 0 and stage is plan.stages[-1]:
            export_last(plan, log)
        result = read_result(stage)
        record["stages"][stage.name] = {"status": "passed" if code == 0 else f"failed (exit {code})",
                                        "seconds": round(time.monotonic() - start, 1),
                                        "resumed_at": [r["step"] for r in events(stage, "resume")], "result": result}
        if code:
            problems.append(f"stage {stage.name}: {why or f'failed (exit status {code}); its log is above'}")
            break
    record["passed"] = not problems
    if record["stages"]:
        write_summary(plan)  # each stage's run wrote a summary of itself alone
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(plan.run_dir) / "rehearsal.json", record)
    print(table(plan, record), flush=True)
    for line in problems:
        print(f"rehearsal: {line}", file=sys.stderr, flush=True)
    return 0 if record["passed"] else 1


def table(plan: Plan, record: dict) -> str:
    rows = [f"rehearsal of {plan.source} in {plan.run_dir}: {'PASSED' if record['passed'] else 'FAILED'}",
            f"{'stage':<12} {'status':<16} {'seconds':>8}  headline"]
    for stage in plan.stages:
        entry = record["stages"].get(stage.name, {"status": "not run", "seconds": 0, "result": None})
        headline = (entry["result"] or {}).get("headline", {})
        rows.append(f"{stage.name:<12} {entry['status']:<16} {entry['seconds']:>8}  {headline}")
    return "\n".join(rows)
