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
from webdataset.tariterators import group_by_keys

from pretrain.data.decode import is_wanted_member
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


def tar_members(stream, url: str, max_bytes: int) -> Iterator[dict]:
    """The wanted regular members of one tar (or .tar.gz/.bz2/.xz) stream, as group_by_keys takes them."""
    try:
        tar = tarfile.open(fileobj=decompressed(stream), mode="r|", tarinfo=BoundedTarInfo)
        for info in tar:
            tar.members = []  # streaming mode keeps every header it has read
            if info.isreg() and is_wanted_member(info.name):
                data = tar.extractfile(info).read() if info.size <= max_bytes else None
                yield {"fname": info.name, "data": data, "__url__": url}
    except Exception:
        yield {}  # group_by_keys hands on the sample it holds, whose members were all read whole; then the error
        raise


def shard_samples(url: str, max_bytes: int, counter: SkipCounter) -> Iterator[dict]:
    stream = gopen(url)
    try:
        yield from group_by_keys(tar_members(stream, url, max_bytes), handler=counter.handler(UNREADABLE_SHARD))
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
    counted (unreadable_shard) and the next one read; `failures`, if given, is told how each shard went."""

    def stage(shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            url, samples, error = shard["url"], 0, None
            try:
                for sample in shard_samples(url, max_bytes, counter):
                    samples += 1
                    yield sample
            except Exception as exception:  # cannot be opened, not a tar, cut short, bad compression...
                error = exception
                counter.skip(UNREADABLE_SHARD, url, exception)
            if failures is not None:
                failures.record(url, samples, error)

    return stage
