"""Does this project work on the NVIDIA GPU in front of you? One command (`make gpu-check`), under 10 minutes on one
H100, with whatever torch is installed there. Each part runs in a child process with its own time limit:

  build   the DCNv3 extensions, built in place where missing or stale (setup.py build_ext --inplace, against the
          installed torch, for this GPU's architecture only), and DeepSpeed's fused Adam (JIT); the peers for dcnv3
          start building in the background beside them
  tests   the GPU tests (tests/test_*cuda*.py): nothing may fail, and on a GPU nothing may skip for want of one
  engine  the demo pretraining stage on one GPU in bf16 and in fp16 (dynamic loss scaling), ZeRO-3 over NCCL with
          world size 1, DeepSpeed's fused Adam: the loss falls, no NaN, no overflow storm; then a SIGKILL after a
          checkpoint and a rerun must give the uninterrupted run's losses
  dcnv3   tools/bench_dcnv3.py: our kernel, the reference and, when given, the release's kernel and DCNv4
  h       InternImage-H at 224 px, a fine-tuning and an image-text step loop (AdamW, bf16, per-layer checkpointing,
          tools/gpu_step_loop.py): samples/s, TFLOP/s, MFU, peak memory beside `pretrain estimate-memory`'s figure,
          and a short profile (top kernels, the DCNv3 share of the step, idle gaps on the device)

It prints a report, writes it as JSON after every part (so a run cut short keeps what it finished), and exits 1 if a
check failed, 2 if none failed but a part was skipped for want of time (--budget), else 0. `--device cpu` runs every
part at tiny sizes on CPU (tests/test_gpu_check.py), to prove the script.

    python3 tools/gpu_check.py --out gpu_check.json
    python3 tools/gpu_check.py --only engine,h --out gpu_check.json
    python3 tools/gpu_check.py --wheels .gpu/wheels --release-src .gpu/internimage_ops_dcnv3 \
        --dcnv4 .gpu/DCNv4-1.0.0.post2.tar.gz --budget 560 --out $OUT/gpu_check.json     (docs/gpu_check.md)

The orchestrating process imports neither torch nor the project: the children do, after the wheels are installed and
the extensions built.
"""
import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
DEMO_CONFIG = REPO / "configs/demo/pretrain.yaml"
H_CONFIGS = {"finetune": REPO / "configs/internimage_h/in1k_640.yaml",
             "image_text": REPO / "configs/internimage_h/pretrain_laion_yfcc_cc12m.yaml"}
# The order spends a short lease on what it must prove first; the long H loops come last.
PART_NAMES = ("build", "tests", "engine", "dcnv3", "h")
# Seconds each part may take on one H100 before it is stopped; measured times are in docs/gpu_check.md.
PART_LIMITS = {"build": 420, "tests": 300, "engine": 360, "h": 330, "dcnv3": 300}
DCNV3_LEAST_S = 90  # the benchmark's own time once the peers are built: their background build may use the rest


@dataclass(frozen=True)
class Sizes:
    """What each part runs at: real sizes on a GPU, tiny ones for the CPU smoke run."""
    precisions: tuple[str, ...]
    resume_precision: str
    engine_steps: int
    checkpoint_every: int
    engine_batch: int
    engine_overrides: tuple[str, ...]
    resume_rtol: float
    h_overrides: tuple[str, ...]
    finetune_batch: int
    image_text_batch: int
    h_steps: int
    h_warmup: int
    profile_steps: int
    bench_args: tuple[str, ...]


# On a GPU the DCNv3 backward's float atomics make each run's gradients differ in their last bits, so a resumed run
# matches the uninterrupted one to rounding, not bit for bit; a resume that restored the wrong data position, optimizer
# state or schedule moves the loss by percent. The GPU's resume check runs in fp32: the image-text loss of a bf16 run
# is itself a bf16 number (3 significant digits), where one flipped last bit is a 0.4% difference. On CPU every run is
# deterministic.
GPU_SIZES = Sizes(precisions=("bf16", "fp16"), resume_precision="fp32", engine_steps=24, checkpoint_every=12,
                  engine_batch=64, engine_overrides=(), resume_rtol=1e-3, h_overrides=("data.image_size=224",),
                  finetune_batch=128, image_text_batch=256, h_steps=6, h_warmup=2, profile_steps=2, bench_args=())
TINY_H = "model.args={channels: 16, depths: [1, 1, 2, 1], groups: [1, 2, 4, 8], level2_post_norm_block_ids: [0]}"
# The CPU smoke run's zero-shot evaluation reads one of the two held-out shards: half the time, the same code.
# Eight steps, not four: past a two-step warm-up four steps left the loss above its start on some data orders.
CPU_SIZES = Sizes(precisions=("bf16",), resume_precision="bf16", engine_steps=8, checkpoint_every=4, engine_batch=16,
                  engine_overrides=(f"data.val={REPO / 'data/demo/classification/val/00000.tar'}",), resume_rtol=1e-6,
                  h_overrides=(TINY_H, "data.image_size=32", "num_classes=10", "text.width=32", "text.layers=1",
                               "text.heads=2", "text.embed_dim=32", "data.context_length=8"),
                  finetune_batch=2, image_text_batch=2, h_steps=1, h_warmup=1, profile_steps=1,
                  bench_args=("--quick", "--repeats", "1", "--threads", "1"))


@dataclass
class Part:
    """What one part found: checks that pass or fail the run, warnings that do not, and its figures."""
    checks: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})
        return bool(passed)

    def warn(self, message: str):
        self.warnings.append(message)


class Context:
    def __init__(self, args):
        self.args = args
        self.cuda = args.device == "cuda"
        self.sizes = GPU_SIZES if self.cuda else CPU_SIZES
        self.work = Path(args.work)
        self.deadline = time.time() + args.limit


# -- child processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd, log: Path, timeout: float, env=None, cwd=REPO) -> int:
    """Run `cmd` in its own process group with output to `log`; on timeout the whole group is killed (-9 returned)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
            return -9


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def remaining(ctx: Context) -> float:
    return ctx.deadline - time.time()


# -- build

def extension_paths(cuda: bool) -> list[Path]:
    """The extensions this interpreter would import (a build for another Python version does not count)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    names = ["_dcnv3_cpu"] + (["_dcnv3_cuda"] if cuda else [])
    return [REPO / "pretrain" / f"{name}{suffix}" for name in names]


def stale(paths: list[Path]) -> bool:
    newest_source = max(p.stat().st_mtime for p in (REPO / "csrc/dcnv3").iterdir())
    return any(not p.exists() or p.stat().st_mtime < newest_source for p in paths)


BACKENDS = "from pretrain.ops import available_backends; print(','.join(available_backends()))"


def part_build(ctx: Context, part: Part):
    env = {"MAX_JOBS": str(os.cpu_count() or 4)}  # ninja compiles the extensions' sources side by side
    part.figures["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # The engine steps with torch's fused AdamW (pretrain/engine/optim.py adamw_kind); timed here beside DeepSpeed's
    # FusedAdam (its JIT build included) and apex's where installed, at one H rank's share of 64 ranks.
    adam_log, adam_json = ctx.work / "logs/bench_optimizer.log", ctx.work / "bench_optimizer.json"
    adam = subprocess.Popen([sys.executable, str(TOOLS / "bench_optimizer.py"), "--device", "cuda", "--params", "1.7e7",
                             "--sub-group", "1e8", "--json", str(adam_json)], env={**os.environ, **env},
                            stdout=open(adam_log, "w"), stderr=subprocess.STDOUT) if ctx.cuda else None
    paths = extension_paths(ctx.cuda)
    start = time.time()
    if ctx.args.rebuild or stale(paths):
        log = ctx.work / "logs/build_ext.log"
        rc = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], log, remaining(ctx), env)
        part.check("DCNv3 extensions built", rc == 0 and not stale(paths), f"exit {rc}; {log}\n{tail(log)}")
    part.figures["build_ext_s"] = time.time() - start
    backends = subprocess.run([sys.executable, "-c", BACKENDS], capture_output=True, text=True, cwd=REPO)
    found = backends.stdout.strip().split(",")
    part.figures["backends"] = found
    part.check("DCNv3 kernel loads", found[0] == ("cuda" if ctx.cuda else "cpu"),
               f"available backends: {found}; {backends.stderr[-800:]}")
    if adam is not None:
        rc = adam.wait(timeout=max(1.0, remaining(ctx)))
        if part.check("AdamW step timed (tools/bench_optimizer.py)", rc == 0 and adam_json.exists(),
                      f"exit {rc}; {adam_log}\n{tail(adam_log)}"):
            part.figures["optimizer_ms_per_step"] = json.loads(adam_json.read_text())["ms_per_step"]


# -- tests

NO_GPU_REASON = "no CUDA device"  # the skip reason of every GPU test (needs_gpu)


def part_tests(ctx: Context, part: Part):
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*cuda*.py"))
    junit = ctx.work / "tests.xml"
    log = ctx.work / "logs/tests.log"
    rc = run_logged([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files],
                    log, remaining(ctx), {"PYTHONUNBUFFERED": "1"})
    part.figures["files"] = files
    if not part.check("pytest ran", junit.exists(), f"exit {rc}\n{tail(log)}"):
        return
    cases = junit_cases(junit)
    part.figures["counts"] = {outcome: sum(c["outcome"] == outcome for c in cases)
                              for outcome in ("passed", "failed", "skipped", "xfailed")}
    failed = [c for c in cases if c["outcome"] == "failed"]
    part.check("no test failed", rc == 0 and not failed and cases,
               "\n".join(f"{c['id']}: {c['message'][:300]}" for c in failed) or f"exit {rc}\n{tail(log)}")
    part.figures["xfailed"] = [f"{c['id']}: {c['message'][:200]}" for c in cases if c["outcome"] == "xfailed"]
    skipped_for_gpu = [c["id"] for c in cases if c["outcome"] == "skipped" and NO_GPU_REASON in c["message"]]
    if ctx.cuda:
        part.check("no test skipped for want of a GPU", not skipped_for_gpu, ", ".join(skipped_for_gpu))


def junit_cases(path: Path) -> list[dict]:
    cases = []
    for case in ElementTree.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
        cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return cases


# -- engine

def stage_overrides(ctx: Context, run_dir: Path, precision: str) -> list[str]:
    s = ctx.sizes
    return [f"run_dir={run_dir}", f"precision={precision}", f"batch_size={s.engine_batch}",
            f"max_steps={s.engine_steps}", f"checkpoint.every={s.checkpoint_every}", "checkpoint.keep=3",
            "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false", "optim.warmup_steps=2",
            f"data.demo_root={REPO / 'data/demo'}", *s.engine_overrides]


class StageRun:
    """The demo stage on one process under torchrun, through tools/gpu_stage.py, started at once: the runs of the
    engine part are independent and tiny, so they share the GPU (or the CPUs) side by side."""

    def __init__(self, ctx: Context, run_dir: Path, precision: str, fault: str | None = None):
        self.ctx, self.run_dir, self.precision = ctx, run_dir, precision
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}",
               str(TOOLS / "gpu_stage.py"), str(DEMO_CONFIG), *stage_overrides(ctx, run_dir, precision)]
        self.log = run_dir.parent / f"{run_dir.name}{'-killed' if fault else ''}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               **({"PRETRAIN_FAULT": fault} if fault else {})}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self) -> tuple[int, dict | None]:
        """(exit code, the stage's result or None); a run still going at the part's limit is killed (-9)."""
        try:
            rc = self.proc.wait(timeout=max(1.0, remaining(self.ctx)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
        return rc, (json.loads(lines[-1][7:]) if lines else None)

    def failure(self, rc: int) -> str:
        return f"exit {rc}; {self.log}\n{tail(self.log)}"


def step_records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl's step lines by step; after a resume the later line of a step wins."""
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r for r in lines if "loss" in r}


def events(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == name]


def check_training_run(ctx: Context, part: Part, run: StageRun) -> bool:
    precision = run.precision
    rc, result = run.wait()
    if not part.check(f"{precision}: stage completed", result is not None and result["status"] == "completed",
                      run.failure(rc)):
        return False
    records = step_records(run.run_dir)
    steps = sorted(records)
    losses = [records[k]["loss"] for k in steps]
    facts = json.loads((run.run_dir / "engine.json").read_text())
    overflows = int(records[steps[-1]]["overflow_steps"])
    third = max(1, len(losses) // 3)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    part.figures[precision] = {"losses": losses, "first_third_mean": first, "last_third_mean": last,
                               "overflow_steps": overflows, "loss_scales": [records[k]["loss_scale"] for k in steps],
                               "samples_per_s": records[steps[-1]]["samples_per_s"], "engine": facts,
                               "result": result["metrics"]}
    part.check(f"{precision}: every loss finite", all(math.isfinite(x) for x in losses), str(losses))
    part.check(f"{precision}: loss falls", last < first, f"mean of first third {first:.4f}, last third {last:.4f}")
    storm = max(2, ctx.sizes.engine_steps // 4)
    part.check(f"{precision}: no overflow storm", overflows <= storm,
               f"{overflows} of {ctx.sizes.engine_steps} steps skipped on overflow (at most {storm})")
    expected = {"optimizer": "AdamW", "backend": "nccl" if ctx.cuda else "gloo",
                "zero_stage": 3, "param_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]}
    wrong = {k: facts[k] for k, v in expected.items() if facts[k] != v}
    part.check(f"{precision}: ran as configured ({', '.join(map(str, expected.values()))})", not wrong,
               f"got {wrong}")
    return True


def check_resume(ctx: Context, part: Part, killed: StageRun, reference: Path):
    """The killed run SIGKILLed its rank as the step after a checkpoint started; its rerun must resume there and give
    the uninterrupted run's losses."""
    s = ctx.sizes
    saved = s.checkpoint_every
    rc, _ = killed.wait()
    latest = killed.run_dir / "checkpoints/latest"
    fired = rc != 0 and (killed.run_dir / "fault.json").exists() and latest.exists()
    if not part.check("killed after a checkpoint", fired and latest.read_text() == f"step{saved:08d}",
                      killed.failure(rc)):
        return
    rerun = StageRun(ctx, killed.run_dir, killed.precision)
    rc, result = rerun.wait()
    if not part.check("rerun completed", result is not None and result["status"] == "completed", rerun.failure(rc)):
        return
    resumed_at = [r["step"] for r in events(rerun.run_dir, "resume")]
    part.check("rerun resumed from that checkpoint", resumed_at == [saved], f"resume events at steps {resumed_at}")
    expected, got = step_records(reference), step_records(rerun.run_dir)
    steps = range(saved + 1, s.engine_steps + 1)
    diffs = [abs(got[k]["loss"] - expected[k]["loss"]) / abs(expected[k]["loss"]) for k in steps]
    part.figures["resume"] = {"precision": killed.precision, "steps": list(steps),
                              "max_relative_difference": max(diffs), "relative_differences": diffs,
                              "bit_identical": all(got[k]["loss"] == expected[k]["loss"] for k in steps)}
    part.check("resumed losses equal the uninterrupted run's", max(diffs) <= s.resume_rtol,
               f"largest relative difference {max(diffs):.2e} over steps {saved + 1}-{s.engine_steps} "
               f"(tolerance {s.resume_rtol:g})")


def part_engine(ctx: Context, part: Part):
    s = ctx.sizes
    engine = ctx.work / "engine"
    runs = {p: StageRun(ctx, engine / p, p) for p in dict.fromkeys([*s.precisions, s.resume_precision])}
    killed = StageRun(ctx, engine / "resume", s.resume_precision, fault=f"kill:{s.checkpoint_every + 1}:0")
    completed = {p: check_training_run(ctx, part, run) for p, run in runs.items()}
    if not ctx.cuda:
        part.warn("fp16 not run: DeepSpeed's CPU accelerator has no fp16")
    if completed[s.resume_precision]:
        check_resume(ctx, part, killed, runs[s.resume_precision].run_dir)
    else:
        killed.wait()


# -- InternImage-H step loops

def part_h(ctx: Context, part: Part):
    s = ctx.sizes
    for name, batch in (("finetune", s.finetune_batch), ("image_text", s.image_text_batch)):
        out = ctx.work / f"h_{name}.json"
        cmd = [sys.executable, str(TOOLS / "gpu_step_loop.py"), str(H_CONFIGS[name]), *s.h_overrides,
               f"batch_size={batch}", "--steps", str(s.h_steps), "--warmup", str(s.h_warmup),
               "--profile-steps", str(s.profile_steps if name == "finetune" else 0), "--json", str(out)]
        log = ctx.work / f"logs/h_{name}.log"
        env = {"MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
        out.unlink(missing_ok=True)
        rc = run_logged(cmd, log, remaining(ctx), env)
        if not part.check(f"{name}: step loop ran", rc == 0 and out.exists(), f"exit {rc}; {log}\n{tail(log)}"):
            continue
        report = json.loads(out.read_text())
        part.figures[name] = report
        part.check(f"{name}: every loss finite", report["losses_finite"], str(report["losses"]))
        if ctx.cuda:
            part.check(f"{name}: MFU measured", report["mfu"] is not None, f"device {report['device_name']}")
        ratio = report["measured_over_estimate"]
        if ctx.cuda and not 2 / 3 <= ratio <= 1.5:  # on CPU the peak is the whole process's RSS
            part.warn(f"{name}: peak memory {report['peak_memory_gib']['allocated']:.1f} GiB is {ratio:.2f}x "
                      f"estimate-memory's {report['estimate']['total_gib']:.1f} GiB")


# -- DCNv3 benchmark

def peer_arguments(args) -> list[str]:
    peers = [("--release-src", args.release_src), ("--dcnv4", args.dcnv4)]
    return [item for flag, value in peers if value for item in (flag, str(Path(value).resolve()))]


def peers_dir(args) -> Path:
    return Path(args.work) / "peers"


def part_dcnv3(ctx: Context, part: Part):
    out = ctx.work / "dcnv3.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(TOOLS / "bench_dcnv3.py"), "--device", ctx.args.device, "--json", str(out),
           "--peers-dir", str(peers_dir(ctx.args)), *ctx.sizes.bench_args, *peer_arguments(ctx.args)]
    log = ctx.work / "logs/dcnv3.log"
    rc = run_logged(cmd, log, remaining(ctx))
    if not part.check("benchmark ran", rc == 0 and out.exists(), f"exit {rc}; {log}\n{tail(log)}"):
        return
    report = json.loads(out.read_text())
    part.figures.update(report)
    part.figures["table"] = tail(log, 6000)
    slower = [f"{r['shape']} {r['dtype']} {r['pass']}" for r in report["rows"] if r["speedup_vs_reference"] <= 1]
    part.check("kernel faster than the reference everywhere", not slower, ", ".join(slower))
    for name, status in report.get("peers", {}).items():
        if status not in ("timed", "not given"):
            part.warn(f"{name}: {status}")


PARTS = {"build": part_build, "tests": part_tests, "engine": part_engine, "h": part_h, "dcnv3": part_dcnv3}


def run_part_here(args) -> int:
    """Child mode: run one part in this process and write what it found to --result."""
    ctx, part = Context(args), Part()
    ctx.work.mkdir(parents=True, exist_ok=True)
    (ctx.work / "logs").mkdir(exist_ok=True)
    try:
        PARTS[args.part](ctx, part)
    except Exception:  # noqa: BLE001 - a part that raises is a failed check with its traceback, not a lost report
        part.check("part raised", False, traceback.format_exc()[-3000:])
    Path(args.result).write_text(json.dumps(asdict(part)))
    return 0


# -- the orchestrating process

def install_wheels(wheels: Path, site: Path):
    """Packages the machine lacks, from wheels carried beside the repo (no package index needed)."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *files], check=True)


CAPABILITY = "import torch; print('%d.%d' % torch.cuda.get_device_capability())"


def prepare_environment(args):
    """For every child: PYTHONPATH with the installed wheels, then the repo (which is not pip-installed there); and
    TORCH_CUDA_ARCH_LIST set to this GPU's architecture alone, so that our extension, DeepSpeed's fused Adam and the
    peers compile once for it (not setup.py's two architectures), and every later JIT load finds the same build."""
    paths = [str(REPO)]
    if args.wheels:
        site = Path(args.work) / "site"
        install_wheels(Path(args.wheels), site)
        paths.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.device == "cuda" and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        found = subprocess.run([sys.executable, "-c", CAPABILITY], capture_output=True, text=True)
        if found.returncode == 0:
            os.environ["TORCH_CUDA_ARCH_LIST"] = found.stdout.strip().splitlines()[-1]


MACHINE = """import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cpus": __import__("os").cpu_count()}
try:
    import deepspeed
    info["deepspeed"] = deepspeed.__version__
except ImportError as error:
    info["deepspeed"] = f"missing: {error}"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                multiprocessors=props.multi_processor_count)
print(json.dumps(info))"""


def machine_info() -> dict:
    proc = subprocess.run([sys.executable, "-c", MACHINE], capture_output=True, text=True)
    # DeepSpeed prints its accelerator warnings to stdout on import: the report is the last line.
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-800:]}


def start_peer_builds(args) -> subprocess.Popen | None:
    """The peers compile on the CPUs while the GPU runs the other parts."""
    if args.device != "cuda" or not peer_arguments(args):
        return None
    log = Path(args.work) / "logs/peer_builds.log"
    cmd = [sys.executable, str(TOOLS / "bench_dcnv3.py"), "--build-peers-only", "--peers-dir", str(peers_dir(args)),
           *peer_arguments(args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def child_command(args, name: str, result: Path, limit: float) -> list[str]:
    forwarded = ["--device", args.device, "--work", args.work, "--limit", str(limit), "--part", name,
                 "--result", str(result), *peer_arguments(args)]
    return [sys.executable, str(Path(__file__).resolve()), *forwarded, *(["--rebuild"] if args.rebuild else [])]


def run_part(args, name: str, deadline: float) -> dict:
    limit = min(PART_LIMITS[name], deadline - time.time() - 5)
    if limit < 30:
        return {"status": "skipped", "reason": "out of time (--budget)", "checks": [], "warnings": [], "figures": {}}
    result = Path(args.work) / f"part_{name}.json"
    result.unlink(missing_ok=True)
    start = time.time()
    rc = run_logged(child_command(args, name, result, limit), Path(args.work) / f"logs/part_{name}.log", limit + 15)
    found = json.loads(result.read_text()) if result.exists() else {
        "checks": [{"name": "part finished", "passed": False,
                    "detail": f"exit {rc} after {time.time() - start:.0f} s (limit {limit:.0f} s)"}],
        "warnings": [], "figures": {}}
    passed = all(c["passed"] for c in found["checks"]) and found["checks"]
    return {"status": "passed" if passed else "failed", "seconds": time.time() - start, "limit_s": limit, **found}


def write_report(path: Path, report: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(report, indent=2))
    os.replace(scratch, path)


def print_part(name: str, result: dict):
    seconds = f" ({result['seconds']:.0f} s)" if "seconds" in result else ""
    print(f"\n== {name}: {result['status'].upper()}{seconds}" + (f": {result['reason']}" if "reason" in result else ""))
    for check in result["checks"]:
        print(f"   {'ok  ' if check['passed'] else 'FAIL'} {check['name']}")
        if not check["passed"] and check["detail"]:
            print("        " + check["detail"].strip().replace("\n", "\n        "))
    for warning in result["warnings"]:
        print(f"   warn {warning.splitlines()[0]}")
    for line in headline_figures(name, result["figures"]):
        print(f"   {line}")
    sys.stdout.flush()


def headline_figures(name: str, figures: dict) -> list[str]:
    if name == "engine":
        return [f"{p}: loss {f['first_third_mean']:.3f} -> {f['last_third_mean']:.3f}, {f['overflow_steps']} "
                f"overflow steps, {f['samples_per_s']:.0f} samples/s" for p, f in figures.items() if p != "resume"] + \
               ([f"resume: largest relative loss difference {figures['resume']['max_relative_difference']:.2e}, "
                 f"bit-identical: {figures['resume']['bit_identical']}"] if "resume" in figures else [])
    if name == "h":
        return [loop_line(loop, f) for loop, f in figures.items()]
    if name == "dcnv3" and "table" in figures:
        return figures["table"].strip().splitlines()[-40:]
    return [f"{k}: {v}" for k, v in figures.items() if v is not None and len(str(v)) < 200]


def loop_line(loop: str, f: dict) -> str:
    mfu = f"MFU {100 * f['mfu']:.1f}%" if f["mfu"] is not None else "MFU n/a"
    line = (f"{loop}: batch {f['batch']} at {f['image_size']} px, {f['samples_per_s']:.1f} samples/s, "
            f"{f['tflops_per_device']:.1f} TFLOP/s, {mfu}, peak {f['peak_memory_gib']['allocated']:.2f} GiB vs "
            f"estimate {f['estimate']['total_gib']:.2f} GiB")
    if f.get("profile") and f["profile"].get("events"):
        p = f["profile"]
        gaps = ", ".join(f"{g:.2f}" for g in p["largest_gaps_ms"])
        line += (f"\n   {loop} profile: {p['span_ms_per_step']:.1f} ms/step on the device, busy "
                 f"{100 * p['busy_fraction']:.0f}%, DCNv3 {100 * p['dcnv3_share']:.1f}% of device time, "
                 f"{p['gaps_over_100us']} gaps > 100 us, largest {gaps} ms")
        line += "".join(f"\n     {100 * k['share']:5.1f}%  {k['ms_per_step']:8.2f} ms  {k['name'][:100]}"
                        for k in p["top"])
    return line


def orchestrate(args) -> int:
    start = time.time()
    deadline = start + (args.budget or 10**9)
    Path(args.work, "logs").mkdir(parents=True, exist_ok=True)
    prepare_environment(args)
    parts = args.only.split(",") if args.only else list(PART_NAMES)
    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        raise SystemExit(f"--only: unknown parts {sorted(unknown)}; choose from {', '.join(PART_NAMES)}")
    report = {"command": sys.argv, "device": args.device, "machine": machine_info(), "parts": {}}
    print(f"gpu_check on {report['machine']}")
    peers = start_peer_builds(args) if "dcnv3" in parts else None
    for name in PART_NAMES:
        if name not in parts:
            continue
        if name == "dcnv3" and peers is not None:
            wait_for_peers(peers, deadline)
        report["parts"][name] = run_part(args, name, deadline)
        print_part(name, report["parts"][name])
        report["seconds"] = time.time() - start
        write_report(Path(args.out), report)
    failures = [f"{name}: {c['name']}" for name, r in report["parts"].items() for c in r["checks"] if not c["passed"]]
    report.update(passed=not failures, failures=failures, seconds=time.time() - start)
    write_report(Path(args.out), report)
    summary = "all checks passed" if not failures else f"{len(failures)} check(s) FAILED: " + "; ".join(failures)
    skipped = [n for n, r in report["parts"].items() if r["status"] == "skipped"]
    print(f"\ngpu_check: {summary}" + (f"; skipped for time: {', '.join(skipped)}" if skipped else "") +
          f" ({report['seconds']:.0f} s); report: {args.out}")
    return 1 if failures else 2 if skipped else 0


def wait_for_peers(peers: subprocess.Popen, deadline: float):
    try:
        peers.wait(timeout=max(1.0, deadline - time.time() - DCNV3_LEAST_S))
    except subprocess.TimeoutExpired:
        os.killpg(peers.pid, signal.SIGKILL)  # the benchmark then reports the peers as unavailable


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the real check; cpu: every part at tiny sizes (a smoke run of this script)")
    parser.add_argument("--only", help=f"comma-separated parts to run, of {','.join(PART_NAMES)}")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gpu_check"),
                        help="scratch: run directories, logs, the peers' builds, installed wheels")
    parser.add_argument("--budget", type=float, help="seconds for the whole run; parts that no longer fit are skipped")
    parser.add_argument("--wheels", help="a folder of wheels to install first (--target WORK/site, no index)")
    parser.add_argument("--release-src", help="the release's ops_dcnv3 sources, for the dcnv3 part")
    parser.add_argument("--dcnv4", help="DCNv4's sdist or unpacked sources, for the dcnv3 part")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the DCNv3 extensions even if up to date")
    parser.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=600.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    args.work = str(Path(args.work).resolve())
    sys.exit(run_part_here(args) if args.part else orchestrate(args))


if __name__ == "__main__":
    main()
