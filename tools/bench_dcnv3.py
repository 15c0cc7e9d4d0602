"""Benchmark of the DCNv3 kernels (not a test: figures go to docs/benchmarks.md).

CPU: the kernel and the pure-PyTorch reference side by side on InternImage stage-1 shapes, forward and forward+backward.
GPU: forward, backward and both, per dtype, for our kernel, the reference and, when their sources are given, the public
release's DCNv3 kernel and DCNv4; each against the memory roofline (the fewest bytes the op must move over the measured
device-to-device copy bandwidth) and the speed-up of ours over each.

    OMP_NUM_THREADS=2 python tools/bench_dcnv3.py --device cpu --threads 2
    python tools/bench_dcnv3.py --device cuda
    python tools/bench_dcnv3.py --device cuda --release-src PATH/internimage_ops_dcnv3 \
        --dcnv4 PATH/DCNv4-1.0.0.post2.tar.gz

The peers are built on the machine that runs them (their setup.py needs a visible GPU), from copies under --peers-dir,
never inside this repository. What each one runs is what its own module runs: the release softmaxes the mask in
PyTorch and then calls its kernel (so its time includes that softmax, as ours includes the fused one); DCNv4 is another
operator (offsets and mask packed in one tensor, no softmax), timed at the same shape.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrain.ops import dcnv3
from pretrain.ops.kernels import dcnv3_backward_kernel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IM2COL_STEP = 256  # what both peers' modules pass


@dataclass
class Shape:
    name: str
    n: int
    size: int
    group: int
    group_channels: int
    points: int = 9

    def layout(self):
        return (3, 3, 1, 1, 1, 1, 1, 1, self.group, self.group_channels)

    def tensors(self, device, dtype):
        input = torch.randn(self.n, self.size, self.size, self.group * self.group_channels, device=device, dtype=dtype)
        offset = torch.randn(self.n, self.size, self.size, self.group * self.points * 2, device=device, dtype=dtype) * 2
        logits = torch.randn(self.n, self.size, self.size, self.group * self.points, device=device, dtype=dtype)
        return input, offset, logits


CPU_SHAPES = [Shape("T stage 1 (N=8, 56x56, G=4, D=16)", 8, 56, 4, 16),
              Shape("H stage 1 (N=2, 56x56, G=10, D=32)", 2, 56, 10, 32)]
CUDA_SHAPES = [Shape("T stage 1 (N=64, 56x56, G=4, D=16)", 64, 56, 4, 16),
               Shape("H stage 1 (N=16, 56x56, G=10, D=32)", 16, 56, 10, 32)]
QUICK_SHAPES = [Shape("tiny (N=2, 14x14, G=4, D=16)", 2, 14, 4, 16)]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def minimal_bytes(inputs, output_bytes: int, backward: bool) -> int:
    """The roofline's byte count, as docs/benchmarks.md defines it. Forward: read the inputs, write the output.
    Backward: read the inputs and grad_output (the output's size), write one gradient the size of each input."""
    once = nbytes(inputs)
    return 2 * once + output_bytes if backward else once + output_bytes


# -- timing

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


def copy_bandwidth():
    """Bytes read plus written per second by a large device-to-device copy: the practical memory ceiling."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = time_cuda(lambda: target.copy_(source), repeats=20)
    return 2 * source.numel() / (ms * 1e-3)


# -- the implementations timed on the GPU: each gives forward, backward, and the tensors it reads

def softmax_per_group(logits, group):
    n, h, w, _ = logits.shape
    return torch.softmax(logits.view(n, h, w, group, -1), -1).view(n, h, w, -1)


class Ours:
    name = "ours"
    dtypes = DTYPES

    def __init__(self, shape, dtype):
        self.shape = shape
        self.inputs = shape.tensors("cuda", dtype)
        self.grad_output = torch.randn_like(self.inputs[0])

    def forward(self):
        return dcnv3(*self.inputs, *self.shape.layout(), 1.0, backend="cuda", mask_softmax=True)

    def backward(self):
        return dcnv3_backward_kernel(self.grad_output, *self.inputs, list(self.shape.layout()), 1.0, False, True)

    def both(self):
        self.forward()
        self.backward()


class Reference(Ours):
    """The pure-PyTorch definition; its backward alone is timed as (forward + backward) - forward."""
    name = "reference"
    backward = None

    def forward(self):
        return dcnv3(*self.inputs, *self.shape.layout(), 1.0, backend="reference", mask_softmax=True)

    def both(self):
        leaves = [t.detach().requires_grad_() for t in self.inputs]
        out = dcnv3(*leaves, *self.shape.layout(), 1.0, backend="reference", mask_softmax=True)
        out.backward(self.grad_output)


class Release(Ours):
    """The release's kernel as its module runs it: softmax in PyTorch, then the kernel; backward the reverse."""
    name = "release"
    dtypes = (torch.float32, torch.float16)  # its kernel dispatches on floating types and half only
    extension = None

    def __init__(self, shape, dtype):
        super().__init__(shape, dtype)
        self.weights = softmax_per_group(self.inputs[2], shape.group)

    def forward(self):
        input, offset, logits = self.inputs
        return self.extension.dcnv3_forward(input, offset, softmax_per_group(logits, self.shape.group),
                                            *self.shape.layout(), 1.0, IM2COL_STEP, False)

    def backward(self):
        input, offset, _ = self.inputs
        grad_input, grad_offset, grad_weights = self.extension.dcnv3_backward(
            input, offset, self.weights, *self.shape.layout(), 1.0, self.grad_output, IM2COL_STEP, False)
        n, h, w, _ = grad_weights.shape
        grouped = (n, h, w, self.shape.group, -1)
        grad_logits = torch._softmax_backward_data(grad_weights.view(grouped).to(self.weights.dtype),
                                                   self.weights.view(grouped), -1, self.weights.dtype)
        return grad_input, grad_offset, grad_logits.view(n, h, w, -1)


class DCNv4:
    """DCNv4's kernel with the launch parameters its own Python picks; offsets and mask in one tensor whose channels
    its module pads to a multiple of 8."""
    name = "dcnv4"
    dtypes = DTYPES
    functions = None

    def __init__(self, shape, dtype):
        self.shape = shape
        value, _, _ = shape.tensors("cuda", dtype)
        channels = math.ceil(shape.group * shape.points * 3 / 8) * 8
        offset_mask = torch.randn(*value.shape[:3], channels, device=value.device, dtype=dtype) * 2
        self.inputs = (value, offset_mask)
        self.grad_output = torch.randn_like(value)
        dims = (shape.n, shape.size, shape.size, shape.group, shape.group_channels)
        self.forward_spec = self.functions.findspec(*dims)
        self.backward_spec = self.functions.find_spec_bwd(*dims)

    def forward(self):
        return self.functions.ext.dcnv4_forward(*self.inputs, *self.shape.layout(), 1.0, IM2COL_STEP, 0,
                                                *self.forward_spec, False)

    def backward(self):
        return self.functions.ext.dcnv4_backward(*self.inputs, *self.shape.layout(), 1.0, IM2COL_STEP,
                                                 self.grad_output, 0, *self.backward_spec, False)

    both = Ours.both


# -- building the peers on this machine

class PeerUnavailable(Exception):
    pass


def find_cuda_home() -> str | None:
    """As setup.py finds it: torch guesses wrong when nvcc is a wrapper script outside the toolkit."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), nvcc and str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    return next((home for home in candidates if home and Path(home, "bin", "nvcc").exists()
                 and Path(home, "include", "cuda_runtime_api.h").exists()), None)


def build_env() -> dict:
    """Build the peers for this GPU only (a fraction of the compile time of every architecture), with all cores, and
    with the headers that torch's CUDA headers include but a bare toolkit may lack (they ship in the nvidia wheels)."""
    env = dict(os.environ)
    home = find_cuda_home()
    if home:
        env.setdefault("CUDA_HOME", home)
    if "TORCH_CUDA_ARCH_LIST" not in env and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    wheel_headers = [str(p) for root in sys.path if root for p in Path(root).glob("nvidia/*/include")]
    env["CPATH"] = os.pathsep.join(filter(None, [*wheel_headers, env.get("CPATH")]))
    return env


PEER_LIBRARIES = {"release": "DCNv3*.so", "dcnv4": "DCNv4/ext*.so"}


def unpack(source: Path, folder: Path):
    """A copy of the peer's sources in `folder`: from a folder, or from an sdist (.tar.gz with one top folder)."""
    if source.is_dir():
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("build", "*.so"))
        return
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch, tarfile.open(source) as archive:
        archive.extractall(scratch, filter="data")
        (top,) = Path(scratch).iterdir()
        shutil.move(str(top), folder)


def modernise_release(folder: Path) -> bool:
    """The release dispatches on `input.type()`, which recent torch no longer converts to a ScalarType (torch 2.14:
    "no suitable conversion function from DeprecatedTypeProperties"); its users build it with `input.scalar_type()`
    there, a change of spelling only. Applied to the copy being built; True if anything changed."""
    path = folder / "src/cuda/dcnv3_cuda.cu"
    text = path.read_text()
    fixed = text.replace("input.type(), \"ms_deform_attn", "input.scalar_type(), \"ms_deform_attn")
    path.write_text(fixed)
    return fixed != text


def build_peer(name: str, source: Path, peers_dir: Path) -> Path:
    """Build `name` from `source` under peers_dir (reused when already built); returns the folder to import from."""
    folder = peers_dir / name
    if list(folder.glob(PEER_LIBRARIES[name])):
        return folder
    failed = peers_dir / f"{name}.failed"
    if failed.exists():  # a background build (--build-peers-only) already failed: no second attempt
        raise PeerUnavailable(failed.read_text())
    if not source.exists():
        raise PeerUnavailable(f"{source} does not exist")
    shutil.rmtree(folder, ignore_errors=True)
    peers_dir.mkdir(parents=True, exist_ok=True)
    unpack(source, folder)
    log = peers_dir / f"{name}-build.log"
    start = time.time()
    with open(log, "w") as out:
        if name == "release" and modernise_release(folder):
            out.write("gpu_check: dispatch on input.scalar_type() instead of input.type() (see modernise_release)\n")
            out.flush()
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], check=False, cwd=folder,
                              env=build_env(), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not list(folder.glob(PEER_LIBRARIES[name])):
        seconds = time.time() - start
        message = f"build failed (exit {proc.returncode}, {seconds:.0f} s), {log}:\n" + log.read_text()[-1500:]
        failed.write_text(message)
        raise PeerUnavailable(message)
    print(f"built {name} in {time.time() - start:.0f} s", file=sys.stderr)
    return folder


def load_peer(name: str, folder: Path):
    sys.path.insert(0, str(folder))
    if name == "release":
        import DCNv3 as extension  # the module its setup.py builds in place

        Release.extension = extension
        return Release
    from DCNv4.functions import dcnv4_func  # its launch-parameter tables and the extension it loads

    DCNv4.functions = dcnv4_func
    return DCNv4


def prepare_peers(sources: dict, peers_dir: Path) -> tuple[list, dict]:
    """The peers that built and loaded, and a status line for each one asked for."""
    peers, status = [], {}
    for name, source in sources.items():
        if source is None:
            status[name] = "not given"
            continue
        try:
            peers.append(load_peer(name, build_peer(name, Path(source), peers_dir)))
            status[name] = "timed"
        except PeerUnavailable as error:
            status[name] = f"unavailable: {error}"
        except ImportError as error:
            status[name] = f"built but failed to import: {error}"
    return peers, status


# -- the two benchmarks

def bench_cpu(shapes, repeats):
    print(f"CPU, {torch.get_num_threads()} threads, float32, kernel 3x3, mask softmax fused (reference: softmax + op)")
    print(f"{'shape':<34}{'pass':<10}{'kernel ms':>10}{'reference ms':>14}{'speed-up':>10}")
    rows = []
    for shape in shapes:
        tensors = shape.tensors("cpu", torch.float32)
        for label, backward in (("fwd", False), ("fwd+bwd", True)):
            with torch.set_grad_enabled(backward):
                kernel = time_cpu(lambda: run_autograd(shape, tensors, "cpu", backward), repeats)
                reference = time_cpu(lambda: run_autograd(shape, tensors, "reference", backward), repeats)
            print(f"{shape.name:<34}{label:<10}{kernel:>10.1f}{reference:>14.1f}{reference / kernel:>9.1f}x")
            rows.append({"shape": shape.name, "dtype": "float32", "pass": label, "ours_ms": kernel,
                         "reference_ms": reference, "speedup_vs_reference": reference / kernel})
    return {"device": "cpu", "threads": torch.get_num_threads(), "rows": rows}


def run_autograd(shape, tensors, backend, backward):
    leaves = [t.requires_grad_(backward) for t in tensors]
    out = dcnv3(*leaves, *shape.layout(), 1.0, backend=backend, mask_softmax=True)
    if backward:
        out.backward(torch.ones_like(out))


def time_passes(impl) -> dict:
    """ms of forward, backward and both (forward then backward) for one implementation."""
    with torch.no_grad():
        forward = time_cuda(impl.forward)
        backward = impl.backward and time_cuda(impl.backward)
    both = time_cuda(impl.both)
    return {"fwd": forward, "bwd": backward if backward else both - forward, "both": both}


def roofline_ms(impl, bandwidth) -> dict:
    output = nbytes(impl.inputs[:1])  # stride 1: the output has the input's shape
    fwd, bwd = (minimal_bytes(impl.inputs, output, backward) / bandwidth * 1e3 for backward in (False, True))
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}


def measure(cls, shape, dtype, bandwidth) -> dict | None:
    if dtype not in cls.dtypes:
        return None
    impl = cls(shape, dtype)
    times, roof = time_passes(impl), roofline_ms(impl, bandwidth)
    del impl
    torch.cuda.empty_cache()
    return {p: {"ms": times[p], "roofline_ms": roof[p], "roofline_pct": 100 * roof[p] / times[p]} for p in times}


def bench_cuda(shapes, peers, status):
    bandwidth = copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write); kernel 3x3; "
          "ours: mask softmax fused; reference and release: softmax + op; dcnv4: its op (no softmax)")
    for name, line in status.items():
        print(f"  {name}: {line.splitlines()[0]}")
    rows = []
    for shape in shapes:
        for dtype in DTYPES:
            results = {cls.name: measure(cls, shape, dtype, bandwidth) for cls in (Ours, Reference, *peers)}
            rows += table_rows(shape, dtype, results)
    print_cuda_table(rows, [cls.name for cls in peers])
    return {"device": torch.cuda.get_device_name(), "bandwidth_tb_s": bandwidth / 1e12, "peers": status, "rows": rows}


def table_rows(shape, dtype, results) -> list[dict]:
    ours = results.pop("ours")
    rows = []
    for label in ("fwd", "bwd", "both"):
        row = {"shape": shape.name, "dtype": str(dtype).removeprefix("torch."), "pass": label,
               "ours_ms": ours[label]["ms"], "roofline_ms": ours[label]["roofline_ms"],
               "ours_roofline_pct": ours[label]["roofline_pct"]}
        for name, result in results.items():
            other = result and result[label]
            row[f"{name}_ms"] = other and other["ms"]
            row[f"speedup_vs_{name}"] = other and other["ms"] / ours[label]["ms"]
            if name != "reference":
                row[f"{name}_roofline_pct"] = other and other["roofline_pct"]
        rows.append(row)
    return rows


def print_cuda_table(rows, peer_names):
    columns = [("ours_ms", "ours ms", ".3f"), ("roofline_ms", "roof ms", ".3f"), ("ours_roofline_pct", "% roof", ".0f"),
               ("reference_ms", "ref ms", ".3f"), ("speedup_vs_reference", "x ref", ".1f")]
    for name in peer_names:
        columns += [(f"{name}_ms", f"{name} ms", ".3f"), (f"{name}_roofline_pct", "% roof", ".0f"),
                    (f"speedup_vs_{name}", f"x {name}", ".2f")]
    print(f"{'shape':<38}{'dtype':<10}{'pass':<6}" + "".join(f"{title:>12}" for _, title, _ in columns))
    for row in rows:
        cells = "".join(f"{'n/a':>12}" if row[key] is None else f"{row[key]:>12{spec}}" for key, _, spec in columns)
        print(f"{row['shape']:<38}{row['dtype']:<10}{row['pass']:<6}{cells}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=5, help="CPU repetitions (median reported)")
    parser.add_argument("--quick", action="store_true", help="one tiny shape (a smoke run, not a benchmark)")
    parser.add_argument("--release-src", help="the release's ops_dcnv3 folder (built under --peers-dir)")
    parser.add_argument("--dcnv4", help="DCNv4's sdist (.tar.gz) or its unpacked folder (built under --peers-dir)")
    parser.add_argument("--peers-dir", default=str(Path(tempfile.gettempdir()) / "dcnv3_peers"),
                        help="where the peers are copied and built; a finished build there is reused")
    parser.add_argument("--build-peers-only", action="store_true", help="build the given peers, then exit")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    sources = {"release": args.release_src, "dcnv4": args.dcnv4}
    if args.build_peers_only:
        for name, source in sources.items():
            if source:
                (Path(args.peers_dir) / f"{name}.failed").unlink(missing_ok=True)
                try:
                    build_peer(name, Path(source), Path(args.peers_dir))
                except PeerUnavailable as error:
                    print(f"{name}: {error}", file=sys.stderr)
        return
    shapes = QUICK_SHAPES if args.quick else CPU_SHAPES if args.device == "cpu" else CUDA_SHAPES
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        report = bench_cpu(shapes, args.repeats)
    else:
        peers, status = prepare_peers(sources, Path(args.peers_dir))
        report = bench_cuda(shapes, peers, status)
    report["shapes"] = [asdict(s) for s in shapes]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
