"""Optional Weights & Biases logging beside TensorBoard (`logging.wandb: true`). wandb is never required: it is
imported only when enabled, and a config that enables it without the package installed is refused at start-up.
`WANDB_MODE=offline` (read by wandb itself) writes the run under RUN_DIR/wandb/ with no account or network, for
`wandb sync` later."""
import hashlib
from pathlib import Path


def wandb_run_id(run_dir: Path) -> str:
    """One id per run directory, so that a resumed run appends to its wandb run instead of starting another."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class WandbWriter:
    def __init__(self, run_dir: Path, project: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(run_dir), name=Path(run_dir).name, id=wandb_run_id(run_dir),
                              resume="allow", config=config)

    def log(self, step: int, values: dict):
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self):
        self.run.finish()
        # finish() can return before wandb's service process has written the last records to the offline run's
        # .wandb file (seen in CI: config there, history not yet); teardown waits for that process to end.
        self.wandb.teardown()
