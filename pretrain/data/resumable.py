"""Raw-sample streams whose state is saved and restored, not replayed: a resume costs the same wherever it lands.

A stream (one per DataLoader worker, see loader.py) mixes one `SourceStream` per source. A source stream reads shards
in an order (`Resampled`: drawn with replacement; `Pieces`: a fixed list of shard ranges, the true-epoch split) into a
shuffle buffer, and hands out a random sample of the buffer each time. Its state is small and plain (JSON-able):
- the shuffle's and the order's RNG states and where the order stands;
- `current`: the shard being read, the index within it of its next sample, and the byte offset of the last sample
  read from it;
- `buffer`: the samples held, as (shard, index in shard, byte offset) references, never as bytes (a 5000-sample
  buffer of web images is ~0.5 GB per worker).
How the buffer is restored, and what it costs. A local uncompressed tar (the layout img2dataset writes) is opened at
each referenced sample's offset and that one sample read: B reads for a buffer of B, plus one to reopen the current
shard after its last sample read. Nothing is decoded; the reads are random, one sample each (tarfile reads the next
header too, to see the sample end). Shards without offsets (compressed, or remote: pipe:, http:) cannot be seeked:
each referenced one is read from its start up to its highest referenced sample, and the current one up to its index.
Their buffer came from the last few shards read (a sample leaves a full buffer of B with probability 1/B per step, so
the share older than k shards of S samples falls as exp(-k S / B)): a few shards' worth, about S (1 + (B/S) ln B).
Either way the cost does not depend on the position in the epoch; `fast_forward`'s replay, before, read all of it.
"""
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

FORMAT = 2
"""Version of the loader state (loader.TrainLoader.state_dict); 1 was the replayed offsets, before this module."""

Piece = list  # [shard, start, stop, picks]: samples start..stop-1 of a shard, or only those listed in picks (sorted)


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def piece_length(piece: Piece) -> int:
    shard, start, stop, picks = piece
    return len(picks) if picks is not None else stop - start


def cut_piece(piece: Piece, begin: int, end: int) -> Piece:
    """Samples begin..end-1 of a piece (counted within the piece)."""
    shard, start, stop, picks = piece
    if picks is not None:
        chosen = picks[begin:end]
        return [shard, chosen[0], chosen[-1] + 1, chosen]
    return [shard, start + begin, start + end, None]


def segment(sequence: list[Piece], begin: int, end: int) -> list[Piece]:
    """The pieces holding positions begin..end-1 of the sequence's samples, wrapping round when past its end (an epoch
    longer than the shards hold reads some again)."""
    total = sum(piece_length(p) for p in sequence)
    pieces, position = [], begin
    while position < end:
        offset = position % total
        at = 0
        for piece in sequence:
            length = piece_length(piece)
            if offset < at + length:
                take = min(at + length - offset, end - position)
                pieces.append(cut_piece(piece, offset - at, offset - at + take))
                position += take
                break
            at += length
    return pieces


def epoch_sequence(sizes: list[int], epoch_seed: int) -> list[Piece]:
    """Every shard whole, in the epoch's shuffled order: the same on every rank, so rank segments are disjoint."""
    order = list(range(len(sizes)))
    random.Random(epoch_seed).shuffle(order)
    return [[shard, 0, sizes[shard], None] for shard in order]


class Resampled:
    """Shards drawn with replacement, forever: every stream always has data, whatever the shard count."""

    def __init__(self, shards: int, seed: int):
        self.shards, self.rng = shards, random.Random(seed)

    def next_piece(self) -> Piece | None:
        return [self.rng.randrange(self.shards), 0, None, None]

    def next_pass(self) -> None:
        raise AssertionError("a resampled order never ends")

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])


class Pieces:
    """A fixed list of pieces, read in order; read again (a new pass) if the stream needs more samples than it holds
    (samples skipped as bad, or an epoch longer than the shards)."""

    def __init__(self, pieces: list[Piece]):
        self.pieces, self.next, self.passes = pieces, 0, 0

    def next_piece(self) -> Piece | None:
        if self.next == len(self.pieces):
            return None
        self.next += 1
        return list(self.pieces[self.next - 1])

    def next_pass(self) -> None:
        self.next, self.passes = 0, self.passes + 1

    def state_dict(self) -> dict:
        return {"pieces": self.pieces, "next": self.next, "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.pieces, self.next, self.passes = state["pieces"], state["next"], state["passes"]


class SourceStream:
    """Shuffled raw samples of one source: the shards its order gives, through a buffer of `size` samples (a fifth
    of it fills before the first sample leaves, trading start-up time for early mixing, as webdataset's shuffle)."""

    def __init__(self, name: str, urls: list[str], order: Resampled | Pieces, size: int, seed: int,
                 read: Callable[[Iterable[dict]], Iterator[dict]]):
        self.name, self.urls, self.order, self.size = name, urls, order, size
        self.initial = max(1, size // 5)
        self.rng = random.Random(seed)
        self.read = read  # tars.read_tars: shard dicts -> raw samples, failures counted
        self.buffer: list[tuple[list[int], dict]] = []
        self.current: list | None = None  # the piece being read, its start moved on past each sample read
        self.picks: set[int] | None = None  # the current piece's picks, as a set
        self.at: int | None = None  # byte offset of the last sample read from the current shard, if it has offsets
        self.samples: Iterator[dict] | None = None
        self.read_this_pass = 0

    def _read_at(self, shard: int, offset: int) -> Iterator[dict]:
        return iter(self.read([{"url": self.urls[shard], "offset": offset}]))

    def _open(self, shard: int, start: int, wanted=frozenset()) -> tuple[dict[int, dict], Iterator[dict]]:
        """The shard's samples from `start` on; those before it are read (not decoded) and dropped, except `wanted`."""
        samples = iter(self.read([{"url": self.urls[shard]}]))
        kept = {}
        for index in range(start):
            sample = next(samples, None)
            if sample is None:
                break
            if index in wanted:
                kept[index] = sample
        return kept, samples

    def _pull(self) -> bool:
        """One raw sample from the shards into the buffer; False once the order's pass is over."""
        while True:
            if self.current is not None:
                shard, index, stop, _ = self.current
                sample = next(self.samples, None) if index < stop else None
                if sample is not None:
                    self.current[1] += 1
                    self.at = sample["__offset__"]
                    if self.picks is None or index in self.picks:
                        self.buffer.append(([shard, index, self.at], sample))
                        self.read_this_pass += 1
                        return True
                    continue
                self.samples.close()
                self.current, self.at = None, None
            piece = self.order.next_piece()
            if piece is None:
                return False
            self._set_current(piece)
            _, self.samples = self._open(piece[0], piece[1])

    def _set_current(self, piece: Piece) -> None:
        shard, start, stop, picks = piece
        self.current = [shard, start, float("inf") if stop is None else stop, picks]  # None: to the shard's end
        self.picks = None if picks is None else set(picks)

    def _pick(self) -> dict:
        i = self.rng.randrange(len(self.buffer))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()[1]

    def next_sample(self) -> dict:
        while True:
            pulled = self._pull()
            if pulled and len(self.buffer) < self.size:
                self._pull()
            if self.buffer and (len(self.buffer) >= self.initial or not pulled):
                return self._pick()
            if not pulled:  # the pass is over and the buffer empty
                if not self.read_this_pass:
                    raise RuntimeError(f"data source {self.name!r}: a whole pass over this stream's "
                                       f"{len(self.order.pieces)} shard pieces gave no readable sample")
                self.read_this_pass = 0
                self.order.next_pass()

    def state_dict(self) -> dict:
        current = None
        if self.current is not None:
            current = list(self.current)
            current[2] = None if current[2] == float("inf") else current[2]
        return {"rng": rng_state(self.rng), "order": self.order.state_dict(), "current": current, "at": self.at,
                "buffer": [ref for ref, _ in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the buffer from its references and reopen the current shard where it stood (module docstring)."""
        set_rng_state(self.rng, state["rng"])
        self.order.load_state_dict(state["order"])
        current, self.at = state["current"], state["at"]
        found, unseekable = {}, defaultdict(set)
        for shard, index, offset in state["buffer"]:
            if offset is None:
                unseekable[shard].add(index)
            elif (shard, index) not in found:
                samples = self._read_at(shard, offset)
                found[shard, index] = next(samples, None)
                samples.close()
        for shard, indices in unseekable.items():
            if current is not None and shard == current[0] and self.at is None and max(indices) < current[1]:
                continue  # read on the way to the current position below
            kept, samples = self._open(shard, max(indices) + 1, indices)
            samples.close()
            found.update({(shard, i): sample for i, sample in kept.items()})
        if current is not None:
            self._set_current(current)
            if self.at is not None:  # reopen at the last sample read, and step over it
                self.samples = self._read_at(current[0], self.at)
                next(self.samples, None)
            else:
                kept, self.samples = self._open(current[0], current[1], unseekable.get(current[0], frozenset()))
                found.update({(current[0], i): sample for i, sample in kept.items()})
        # a referenced sample that cannot be read again (its shard changed or broke) is gone from the buffer
        self.buffer = [([shard, index, offset], found[shard, index]) for shard, index, offset in state["buffer"]
                       if found.get((shard, index)) is not None]
        self.read_this_pass = 1


class Stream:
    """Raw samples of several sources mixed by weight, each numbered (`__index__`, which seeds its augmentation) and
    tagged with its source (`__source__`)."""

    def __init__(self, sources: list[SourceStream], weights: list[float], seed: int):
        self.sources, self.weights = sources, weights
        self.mix = random.Random(seed)
        self.index = 0

    def samples(self) -> Iterator[dict]:
        choices = range(len(self.sources))
        while True:
            (chosen,) = self.mix.choices(choices, self.weights)
            sample = self.sources[chosen].next_sample()
            sample["__index__"], sample["__source__"] = self.index, chosen
            self.index += 1
            yield sample

    def state_dict(self) -> dict:
        return {"index": self.index, "mix": rng_state(self.mix), "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]
        set_rng_state(self.mix, state["mix"])
        for source, source_state in zip(self.sources, state["sources"]):
            source.load_state_dict(source_state)
