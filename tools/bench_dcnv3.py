"""Benchmark of the DCNv3 kernels against the pure-PyTorch reference (not a test: figures go to docs/benchmarks.md).

CPU: the kernel and the reference side by side on InternImage stage-1 shapes, forward and forward+backward.
GPU: forward and backward of the kernel and the reference per dtype, and the kernel against the memory roofline (the
fewest bytes the op must move over the measured device-to-device copy bandwidth).

    OMP_NUM_THREADS=2 python tools/bench_dcnv3.py --device cpu --threads 2
    python tools/bench_dcnv3.py --device cuda
"""
import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from pretrain.ops import dcnv3
from pretrain.ops.kernels import dcnv3_backward_kernel


@dataclass
class Shape:
    name: str
    n: int
    size: int
    group: int
    group_channels: int

    def layout(self):
        return (3, 3, 1, 1, 1, 1, 1, 1, self.group, self.group_channels)

    def tensors(self, device, dtype):
        points = 9
        input = torch.randn(self.n, self.size, self.size, self.group * self.group_channels, device=device, dtype=dtype)
        offset = torch.randn(self.n, self.size, self.size, self.group * points * 2, device=device, dtype=dtype) * 2
        logits = torch.randn(self.n, self.size, self.size, self.group * points, device=device, dtype=dtype)
        return input, offset, logits


def run(shape, tensors, backend, backward):
    leaves = [t.requires_grad_(backward) for t in tensors]
    out = dcnv3(*leaves, *shape.layout(), 1.0, backend=backend, mask_softmax=True)
    if backward:
        out.backward(torch.ones_like(out))


def time_cpu(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_cuda(fn, repeats=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_cpu(shapes, repeats):
    print(f"CPU, {torch.get_num_threads()} threads, float32, kernel 3x3, mask softmax fused (reference: softmax + op)")
    print(f"{'shape':<34}{'pass':<10}{'kernel ms':>10}{'reference ms':>14}{'speed-up':>10}")
    for shape in shapes:
        tensors = shape.tensors("cpu", torch.float32)
        for label, backward in (("fwd", False), ("fwd+bwd", True)):
            with torch.set_grad_enabled(backward):
                kernel = time_cpu(lambda: run(shape, tensors, "cpu", backward), repeats)
                reference = time_cpu(lambda: run(shape, tensors, "reference", backward), repeats)
            print(f"{shape.name:<34}{label:<10}{kernel:>10.1f}{reference:>14.1f}{reference / kernel:>9.1f}x")


def copy_bandwidth():
    """Bytes read plus written per second by a large device-to-device copy: the practical memory ceiling."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = time_cuda(lambda: target.copy_(source), repeats=20)
    return 2 * source.numel() / (ms * 1e-3)


def minimal_bytes(tensors, backward):
    """Forward: read input, offset, mask; write output (same size as input). Backward: also read grad_output and write
    a gradient the size of each input."""
    input, offset, mask = tensors
    once = sum(t.numel() * t.element_size() for t in tensors)
    return 2 * once + 2 * input.numel() * input.element_size() if backward else once + input.numel() * input.element_size()


def bench_cuda(shapes):
    bandwidth = copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write); kernel 3x3, "
          "mask softmax fused (reference: softmax + op)")
    print(f"{'shape':<34}{'dtype':<10}{'pass':<6}{'kernel ms':>10}{'roofline ms':>12}{'% roof':>8}"
          f"{'reference ms':>14}{'speed-up':>10}")
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            tensors = shape.tensors("cuda", dtype)
            with torch.no_grad():
                forward = time_cuda(lambda: run(shape, tensors, "cuda", False))
                reference_forward = time_cuda(lambda: run(shape, tensors, "reference", False))
            grad_output = torch.randn_like(tensors[0])
            backward = time_cuda(lambda: dcnv3_backward_kernel(grad_output, *tensors, list(shape.layout()), 1.0,
                                                               False, True))
            reference_both = time_cuda(lambda: run(shape, tensors, "reference", True))
            both = time_cuda(lambda: run(shape, tensors, "cuda", True))
            name = str(dtype).removeprefix("torch.")
            for label, ms, reference, bytes_moved in (
                    ("fwd", forward, reference_forward, minimal_bytes(tensors, False)),
                    ("bwd", backward, reference_both - reference_forward, minimal_bytes(tensors, True)),
                    ("both", both, reference_both, minimal_bytes(tensors, False) + minimal_bytes(tensors, True))):
                roof = bytes_moved / bandwidth * 1e3
                print(f"{shape.name:<34}{name:<10}{label:<6}{ms:>10.3f}{roof:>12.3f}{100 * roof / ms:>7.0f}%"
                      f"{reference:>14.3f}{reference / ms:>9.1f}x")
            del tensors, grad_output
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=5, help="CPU repetitions (median reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        bench_cpu([Shape("T stage 1 (N=8, 56x56, G=4, D=16)", 8, 56, 4, 16),
                   Shape("H stage 1 (N=2, 56x56, G=10, D=32)", 2, 56, 10, 32)], args.repeats)
    else:
        bench_cuda([Shape("T stage 1 (N=64, 56x56, G=4, D=16)", 64, 56, 4, 16),
                    Shape("H stage 1 (N=16, 56x56, G=10, D=32)", 16, 56, 10, 32)])


if __name__ == "__main__":
    main()
