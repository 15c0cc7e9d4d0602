"""CPU inference of InternImage (not a test: figures go to docs/benchmarks.md): ms per image for the same model on
the fused DCNv3 kernel, on the pure-PyTorch DCNv3 path (our `reference` backend, the release's DCNv3_pytorch), and
exported to ONNX in onnxruntime; then, for the first model at batch 1, what the rest of the model gives on top of the
fused kernel: torch.compile (inductor's CPU backend), dynamic int8 Linear layers (with their output change stated).

    OMP_NUM_THREADS=2 python tools/bench_inference.py --threads 2
    OMP_NUM_THREADS=2 python tools/bench_inference.py --models internimage_t --batches 1 --extras

Random weights: speed does not depend on them; the int8 row's output change is measured on them against fp32.
Each figure is the median of --repeats timed forwards after --warmup untimed ones, the paths taking turns.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.export.onnx import export_onnx
from pretrain.models import create_model
from pretrain.ops import default_backend


def time_paths(runners: dict, images, warmup: int, repeats: int) -> dict[str, list[float]]:
    """ms per image of each path, `repeats` times; the paths take turns within each repeat, so a load that drifts
    over the run (a shared machine) slows them alike and their ratios hold."""
    times = {path: [] for path in runners}
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(warmup):
                run(images)
        for _ in range(repeats):
            for path, run in runners.items():
                start = time.perf_counter()
                run(images)
                times[path].append(1000 * (time.perf_counter() - start) / len(images))
    return times


def summary(times: dict[str, list[float]], baseline: str = "reference") -> dict:
    """Median ms per image of each path, and the median over repeats of each path's speed-up over the baseline."""
    row = {path: round(statistics.median(t), 1) for path, t in times.items()}
    for path, t in times.items():
        if path != baseline:
            row[f"{path}_speedup"] = round(statistics.median(b / x for b, x in zip(times[baseline], t)), 2)
    return row


def on_backend(model: nn.Module, backend: str):
    def run(images):
        with default_backend(backend):
            return model(images)
    return run


def onnxruntime_runner(model: nn.Module, size: int, threads: int, folder: Path):
    import onnxruntime

    path = folder / "model.onnx"
    export_onnx(model, path, size)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"image": images.numpy()})


def output_change(model: nn.Module, changed: nn.Module, size: int) -> dict:
    """How far the changed model's logits move from fp32's, and how often its top-1 class stays, on random images."""
    images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = model(images), changed(images)
    return {"relative_error": float((got - expected).abs().max() / expected.abs().max()),
            "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean())}


def extra_runners(model: nn.Module) -> dict:
    """The rest of the model, on top of the fused kernel: inductor's CPU code, and int8 Linear layers (fbgemm)."""
    int8 = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return {"fused+compile": on_backend(torch.compile(model), "cpu"), "fused+int8": on_backend(int8, "cpu")}, int8


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["internimage_t", "internimage_s", "internimage_b"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extras", action="store_true", help="also torch.compile and int8 (first model, batch 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.image_size
    import onnxruntime

    print(json.dumps({"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
                      "image_size": size}))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            model = create_model(name).eval()
            runners = {"reference": on_backend(model, "reference"), "fused": on_backend(model, "cpu"),
                       "onnxruntime": onnxruntime_runner(model, size, args.threads, Path(tmp))}
            for batch in args.batches:
                paths, int8 = dict(runners), None
                if args.extras and name == args.models[0] and batch == 1:
                    extras, int8 = extra_runners(model)
                    paths.update(extras)
                times = time_paths(paths, torch.randn(batch, 3, size, size), args.warmup, args.repeats)
                row = {"model": name, "batch": batch, **summary(times)}
                if int8 is not None:
                    row["int8_output_change"] = output_change(model, int8, size)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
