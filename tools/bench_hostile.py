"""What a hostile shard costs a data worker, bounded by data.limits (ours) and unbounded (webdataset's tar reader,
PIL's decoder, the whole caption tokenised), each case in a fresh process so its peak memory is its own.

Cases, each a few hundred KB on disk: a .tar.gz holding a 768 MiB member; a 121 Mpx PNG of 15 KB; a 3.4 MB caption;
a source whose shards are all unreadable (resampled: retried for ever before, an error after
data.limits.shard_failures now).

    python tools/bench_hostile.py        # one JSON line per case: seconds and peak RSS growth, ours and unbounded
"""
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

MiB = 2**20


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_inputs(folder: Path) -> None:
    """The hostile inputs, written once and read by every case's process."""
    import numpy as np

    with tarfile.open(folder / "member.tar.gz", "w:gz", compresslevel=9) as tar, open("/dev/zero", "rb") as zeros:
        huge = tarfile.TarInfo("a.jpg")
        huge.size = 768 * MiB
        tar.addfile(huge, zeros)
        add_member(tar, "a.txt", b"a bomb")
    words = np.array("a photo of the small red dog sitting beside an old wooden house near river".split())
    caption = " ".join(np.random.default_rng(0).choice(words, 700_000))
    with tarfile.open(folder / "image.tar", "w") as tar:
        add_member(tar, "a.png", png(11_000, 11_000, mode="1"))
        add_member(tar, "a.txt", b"a pixel bomb")
    with tarfile.open(folder / "caption.tar", "w") as tar:
        add_member(tar, "a.png", png(16, 16))
        add_member(tar, "a.txt", caption.encode())
    for i in range(3):
        (folder / f"broken{i}.tar").write_bytes(b"not a tar " * 100)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_member(folder: Path, bounded: bool) -> str:
    import webdataset as wds

    from pretrain.data.stats import SkipCounter
    from pretrain.data.tars import read_tars

    url = str(folder / "member.tar.gz")
    if bounded:
        (sample,) = read_tars(SkipCounter(), max_bytes=32 * MiB)([{"url": url}])
    else:
        (sample,) = wds.tarfile_to_samples()(iter([{"url": url}]))
    return "member left unread" if sample["jpg"] is None else f"member read: {len(sample['jpg']) // MiB} MiB"


def decode_image(folder: Path, bounded: bool) -> str:
    from PIL import Image

    from pretrain.data.decode import Skip, read_image
    from pretrain.data.stats import SkipCounter
    from pretrain.data.tars import read_tars

    (sample,) = read_tars(SkipCounter(), max_bytes=32 * MiB)([{"url": str(folder / "image.tar")}])
    if bounded:
        try:
            read_image(sample, max_pixels=2**25)
        except Skip as skip:
            return f"skipped: {skip.reason}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL only warns below 2x its limit
        return f"decoded: {Image.open(io.BytesIO(sample['png'])).convert('RGB').size}"


def tokenise_caption(folder: Path, bounded: bool) -> str:
    from pretrain.data.decode import read_caption
    from pretrain.data.stats import SkipCounter
    from pretrain.data.tars import read_tars
    from pretrain.data.tokenizer import get_tokenizer

    (sample,) = read_tars(SkipCounter(), max_bytes=32 * MiB)([{"url": str(folder / "caption.tar")}])
    caption, truncated = read_caption(sample, max_chars=4096 if bounded else 10**9)
    tokens = get_tokenizer(77)([caption])
    return f"{len(caption)} characters tokenised, {int((tokens != 0).sum())} tokens kept"


def unreadable_source(folder: Path, bounded: bool) -> str:
    """Ours raises after data.limits.shard_failures (16); before, resampling retried for ever: count 5 s of it."""
    import webdataset as wds

    from pretrain.data import DataConfig, build_train_loader

    good = str(folder / "caption.tar")
    broken = str(folder / "broken{0..2}.tar")
    if bounded:
        cfg = DataConfig(format="image-text", train=[{"shards": good}, {"shards": broken}], samples_per_epoch=8,
                         workers=0, image_size=16, shuffle_buffer=2)
        try:
            next(iter(build_train_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0)))
        except RuntimeError as error:
            return str(error).split(";")[0]
    failures, deadline = [], time.perf_counter() + 5

    def count_and_continue(error: Exception) -> bool:
        failures.append(error)
        if time.perf_counter() > deadline:
            raise TimeoutError  # the only way out: no sample ever comes
        return True

    try:
        next(iter(wds.tarfile_to_samples(handler=count_and_continue)(wds.ResampledShards(broken))))
    except TimeoutError:
        return f"{len(failures)} failed shards in 5 s, no error"


CASES = {"member_768MiB_in_783KB_gzip": read_member, "png_121Mpx_15KB": decode_image,
         "caption_3.4MB": tokenise_caption, "all_unreadable_source": unreadable_source}


def run_case(name: str, folder: Path, bounded: bool) -> dict:
    import pretrain.data.forkserver_preload  # noqa: F401 (what a worker has loaded before its first sample)

    baseline = peak_rss_mb()
    start = time.perf_counter()
    outcome = CASES[name](folder, bounded)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "peak_rss_growth_mb": round(peak_rss_mb() - baseline), "outcome": outcome}


def main() -> None:
    if len(sys.argv) == 4:  # one case, in its own process
        print(json.dumps(run_case(sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "bounded")))
        return
    with tempfile.TemporaryDirectory() as folder:
        make_inputs(Path(folder))
        for name in CASES:
            runs = {mode: json.loads(subprocess.run([sys.executable, __file__, name, folder, mode], check=True,
                                                    capture_output=True, text=True).stdout.splitlines()[-1])
                    for mode in ("bounded", "unbounded")}
            print(json.dumps({"case": name, **runs}))


if __name__ == "__main__":
    main()
