"""Shard urls -> raw samples (dicts of member bytes), with the work one shard can cause bounded.

webdataset's tar iterator reads every selected member whole, so a small gzip shard could make a worker hold a member
of any size. Here each member is judged by its tar header first: a wanted member over `max_bytes` is never read
(tarfile's streaming mode steps over it block by block) and stands in its sample as None, which the decoder skips; an
extended header (a long name or a PAX record, which tarfile reads whole) over EXTENDED_HEADER_BYTES ends the shard.
Compressed shards are inflated by gzip/bz2/lzma's readers, which inflate no more than is asked for (tarfile's own
"r|*" inflates each 10 KB read whole: 10 MB buffers from a member of zeros, copied again for every block skipped).
Members become samples through webdataset's group_by_keys. Shards are opened here, not by webdataset's url_opener,
so that one that cannot even be opened counts as a failed shard too.
"""
import bz2
import gzip
import lzma
import tarfile
from collections.abc import Callable, Iterable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys

from pretrain.data.decode import is_wanted_member
from pretrain.data.shards import is_local, local_path
from pretrain.data.stats import UNREADABLE_SHARD, SkipCounter

EXTENDED_HEADER_BYTES = 2**20  # real long names and PAX records are a few hundred bytes
EXTENDED_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE)


class BoundedTarInfo(tarfile.TarInfo):
    """Refuses an oversized extended header as soon as its own header block is parsed, before its data is read."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        info = super().frombuf(buf, encoding, errors)
        if info.type in EXTENDED_HEADER_TYPES and info.size > EXTENDED_HEADER_BYTES:
            # a ReadError that tarfile does not take for the end of the archive, so the shard counts as cut short
            raise tarfile.ReadError(f"extended tar header of {info.size} bytes (limit {EXTENDED_HEADER_BYTES})")
        return info


COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}  # by magic number


class Rewound:
    """A stream with the bytes already read from it (to tell its compression) put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if 0 <= size <= len(self.head):
            head, self.head = self.head[:size], self.head[size:]
            return head
        head, self.head = self.head, b""
        return head + self.stream.read(-1 if size < 0 else size - len(head))


def decompressed(stream):
    """The tar bytes of a stream, compressed or not, told apart by their first bytes as tarfile's "r|*" does."""
    head = stream.read(6)
    rewound = Rewound(head, stream)
    opener = next((opener for magic, opener in COMPRESSED.items() if head.startswith(magic)), None)
    return opener(rewound) if opener else rewound


def tar_members(tar_stream, url: str, max_bytes: int, offsets: dict | None, base: int) -> Iterator[dict]:
    """The wanted regular members of one tar stream, as group_by_keys takes them. `offsets`, if given, is told the
    byte offset (from the tar's start; the stream begins at `base`) of each sample's first header, by key."""
    try:
        tar = tarfile.open(fileobj=tar_stream, mode="r|", tarinfo=BoundedTarInfo)
        for info in tar:
            tar.members = []  # streaming mode keeps every header it has read
            if info.isreg() and is_wanted_member(info.name):
                if offsets is not None:
                    offsets.setdefault(base_plus_ext(info.name)[0], base + info.offset)
                data = tar.extractfile(info).read() if info.size <= max_bytes else None
                yield {"fname": info.name, "data": data, "__url__": url}
    except Exception:
        yield {}  # group_by_keys hands on the sample it holds, whose members were all read whole; then the error
        raise


def shard_samples(url: str, max_bytes: int, counter: SkipCounter, offset: int = 0) -> Iterator[dict]:
    """The samples of a shard. Those of a local uncompressed tar carry `__offset__`, the byte offset of their first
    header, where a later read may start (`offset`) to fetch one sample without reading the shard up to it."""
    if offset:
        stream = open(local_path(url), "rb")
        stream.seek(offset)
    else:
        stream = gopen(url)
    try:
        tar_stream = decompressed(stream)
        offsets = {} if is_local(url) and isinstance(tar_stream, Rewound) else None  # seekable: local, uncompressed
        for sample in group_by_keys(tar_members(tar_stream, url, max_bytes, offsets, offset),
                                    handler=counter.handler(UNREADABLE_SHARD)):
            sample["__offset__"] = offsets.pop(sample["__key__"], None) if offsets is not None else None
            yield sample
    finally:
        stream.close()


class ShardFailures:
    """Counts the shards in a row of one source that gave no readable sample. Resampling draws shards forever, and a
    split source reads its share pass after pass, so without this a source of broken shards would spin, not fail."""

    def __init__(self, source: str, limit: int):
        self.source, self.limit, self.in_a_row = source, limit, 0

    def record(self, url: str, samples: int, error: BaseException | None) -> None:
        self.in_a_row = 0 if samples else self.in_a_row + 1
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"data source {self.source!r}: {self.in_a_row} shards in a row gave no readable sample (last: {url}"
                f"{f': {error!r}' if error else ''}); check the shards, or raise data.limits.shard_failures")


def read_tars(counter: SkipCounter, max_bytes: int,
              failures: ShardFailures | None = None) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """A pipeline stage: shard dicts ({"url": ...}) -> raw samples. A shard that cannot be opened or read to its end is
    counted (unreadable_shard) and the next one read; `failures`, if given, is told how each shard went. A shard dict
    may give an `offset` to start at (shard_samples)."""

    def stage(shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            url, samples, error = shard["url"], 0, None
            try:
                for sample in shard_samples(url, max_bytes, counter, shard.get("offset", 0)):
                    samples += 1
                    yield sample
            except Exception as exception:  # cannot be opened, not a tar, cut short, bad compression...
                error = exception
                counter.skip(UNREADABLE_SHARD, url, exception)
            if failures is not None:
                failures.record(url, samples, error)

    return stage
