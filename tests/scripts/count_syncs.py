"""One rank of a short stage under torchrun, counting the training loop's own waits on the device: Tensor.item/tolist
/cpu and torch.distributed collectives called from this project's code (not DeepSpeed's or open_clip's, which belong
to the step itself). Rank 0 prints them as JSON: those inside a training step, and the steps the others came at."""
import json
import os
import sys
from pathlib import Path

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce_scatter", "gather", "scatter")
OURS = str(Path(__file__).resolve().parents[2] / "pretrain")


def main():
    import torch
    import torch.distributed as dist

    from pretrain.engine import run_stage, trainer

    seen = {"inside": [], "outside": []}
    state = {"trainer": None, "inside": False}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if state["trainer"] is not None and caller.startswith(OURS):
                where = "inside" if state["inside"] else "outside"
                seen[where].append([state["trainer"].step, name, f"{Path(caller).name}:{sys._getframe(1).f_lineno}"])
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "cpu"):
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))

    train_step, fit = trainer.Trainer._train_step, trainer.Trainer.fit

    def watched_train_step(self, batches):
        state["inside"] = True
        try:
            return train_step(self, batches)
        finally:
            state["inside"] = False

    def watched_fit(self):
        state["trainer"] = self
        result = fit(self)
        state["trainer"] = None
        return result

    trainer.Trainer._train_step, trainer.Trainer.fit = watched_train_step, watched_fit
    trainer.Trainer.evaluate = lambda self: {}  # after the loop; its reads are not the loop's
    run_stage(sys.argv[1], sys.argv[2:])
    if os.environ["RANK"] == "0":
        print("SYNCS " + json.dumps(seen))


if __name__ == "__main__":
    main()
