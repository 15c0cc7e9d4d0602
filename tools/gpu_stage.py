"""One rank of a stage for tools/gpu_check.py, under torchrun: the real engine, with tests/fault_engine.py's fault when
PRETRAIN_FAULT is set, plus what the check needs and the engine does not log:
  - each step's DeepSpeed loss scale and its count of overflow-skipped steps, as extra values of the step (so they
    land in metrics.jsonl beside the loss);
  - RUN_DIR/engine.json: the optimizer class, ZeRO stage, process-group backend and parameter dtype the run really
    used (a config can ask for fused Adam and NCCL; this says what it got).

    python -m torch.distributed.run --nproc-per-node 1 tools/gpu_stage.py configs/demo/pretrain.yaml run_dir=... ...

The imports stay inside main(): forkserver data workers re-run this script's top level."""
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def engine_facts(trainer) -> dict:
    import torch.distributed as dist

    engine = trainer.engine
    param = next(engine.module.parameters())
    return {"optimizer": type(engine.basic_optimizer).__name__, "zero_stage": engine.zero_optimization_stage(),
            "backend": dist.get_backend(), "device": str(trainer.world.device),
            "param_dtype": str(getattr(param, "ds_tensor", param).dtype).removeprefix("torch.")}


def observe(trainer_class):
    """Wrap Trainer._train_step: its returned dict's numeric extras are averaged and logged with the loss."""
    train_step = trainer_class._train_step

    def observed(self, batches):
        values = train_step(self, batches)
        if not getattr(self, "_facts_written", False) and self.world.is_main:
            (self.run_dir / "engine.json").write_text(json.dumps(engine_facts(self)))
            self._facts_written = True
        values["overflow_steps"] = float(self.engine.skipped_steps)
        values["loss_scale"] = float(getattr(self.engine.optimizer, "loss_scale", 1.0))
        return values

    trainer_class._train_step = observed


def main():
    sys.path.insert(0, str(REPO / "tests"))
    import fault_engine
    from pretrain.engine import trainer

    observe(trainer.Trainer)
    result = fault_engine.run_stage(sys.argv[1], sys.argv[2:])
    if os.environ["RANK"] == "0":
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
