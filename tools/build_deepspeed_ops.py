"""Build, at install time, the one DeepSpeed JIT op a run on this machine loads at start-up: the CPU accelerator's
shared-memory comm op, which DeepSpeed compiles in every process's `init_distributed` unless torch's extension cache
already holds it (~30-40 s on 2 cores, paid by the first run: `make demo`'s or the first test's). GPU accelerators
load no op at start-up (the optimizer is torch's fused AdamW, pretrain/engine/optim.py), so there is nothing to do."""
import deepspeed.ops
from deepspeed.accelerator import get_accelerator


def main():
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    # the condition DeepSpeed's own build_shm_op (deepspeed/comm/torch.py) tests before it builds
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print(f"no DeepSpeed op to prebuild for the {get_accelerator().device_name()} accelerator")
        return
    builder.load()
    print(f"DeepSpeed's {builder.NAME} op is built")


if __name__ == "__main__":
    main()
