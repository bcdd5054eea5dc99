"""Reflow training batches as a pure function of the step: `PairSampler(store, B, ...).batch(step)`.

Each section of the store (backward rows [0, n_backward), forward rows [n_backward, N)) is read as one infinite
stream of rows, defined once for a seed:

    epoch e      a permutation of the section's chunks, seeded by (seed, section, e)
    window w     window_chunks consecutive chunks of that order; its rows (chunks concatenated in that order)
                 shuffled by a permutation seeded by (seed, section, e, w)
    position p   epoch p // n_section, offset p % n_section into the concatenated shuffled windows of that epoch

Step s takes positions [s * n_bwd, (s + 1) * n_bwd) of the backward stream and [s * n_fwd, (s + 1) * n_fwd) of the
forward stream (n_fwd = round(forward_ratio * B), n_bwd = B - n_fwd), backward rows first. So a batch depends on the
store contents, seed, batch size, forward_ratio, window_chunks and step only: not on which steps were asked before,
in which order, or whether the run was resumed. Positions [e * n, (e + 1) * n) of a stream hold each of its rows
exactly once. Locating a step touches O(1) epochs and windows whatever the step number (permutations are made
lazily and cached in small LRUs).

Two backends fetch the rows, with bit-identical batches: "memory" (the whole store read once into float32 RAM
tensors, then indexed) when it fits ram_budget_bytes, else "stream" (the chunks of the windows a step needs are read,
a small LRU of windows kept, and a background thread loads the windows of the next steps ahead, assuming sequential
steps; prefetching changes only timing, never values).
"""
from __future__ import annotations

import bisect
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .. import host, storage
from ..rng import row_seed
from .errors import PairStoreIncomplete
from .layout import BACKWARD, FORWARD, PairBatch
from .store import PairStore

_TAG_SECTION, _TAG_EPOCH, _TAG_WINDOW = 0x73616D706C65, 0x65706F6368, 0x77696E646F77
_EPOCH_CACHE = 4  # epochs per section whose chunk order is kept
_WINDOW_INDEX_CACHE = 64  # windows per section whose row permutation is kept


def ram_bytes(store: PairStore) -> int:
    """Bytes the whole store takes in RAM as the memory backend holds it: float32 noise and sample, int64 label and
    direction, and a conditional store's float32 condition."""
    cond = 0 if store.cond_shape is None else math.prod(store.cond_shape) * 4
    return store.n * (2 * math.prod(store.shape) * 4 + 2 * 8 + cond)


def _cat(parts: list[PairBatch]) -> PairBatch:
    if len(parts) == 1:
        return parts[0]
    return PairBatch(torch.cat([p.noise for p in parts]), torch.cat([p.sample for p in parts]),
                     torch.cat([p.label for p in parts]), torch.cat([p.direction for p in parts]),
                     torch.cat([p.index for p in parts]),
                     None if parts[0].cond is None else torch.cat([p.cond for p in parts]))


def _cat_1thread(parts: list[PairBatch]) -> PairBatch:
    """`_cat` with numpy's single-threaded copy (the same values): the read / prefetch threads join a window's chunks
    while the training step runs, and torch.cat there would start an OpenMP team as large as the trainer's own
    (2 x the cores busy on a small machine; torch.set_num_threads cannot be set per thread without changing the
    default of every thread started later)."""
    if len(parts) == 1:
        return parts[0]

    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([t.numpy() for t in ts]))
    return PairBatch(cat([p.noise for p in parts]), cat([p.sample for p in parts]), cat([p.label for p in parts]),
                     cat([p.direction for p in parts]), cat([p.index for p in parts]),
                     None if parts[0].cond is None else cat([p.cond for p in parts]))


def io_threads(store: PairStore) -> int:
    """Chunk-reading threads of the stream backend: 4 for a remote store (they mostly wait on the network); for a
    local one, half this process's cores (1..4), so decoding chunks leaves the trainer's intra-op threads room."""
    if not storage.is_local(store.url):
        return 4
    return max(1, min(4, host.available_cores() // 2))


@dataclass(frozen=True)
class _Window:
    chunks: tuple[int, ...]  # the window's chunks, in the epoch's order
    perm: torch.Tensor  # stream offset within the window -> row of the chunks' concatenation
    rows: torch.Tensor  # stream offset within the window -> global row (concatenation[perm])


@dataclass(frozen=True)
class _Segment:
    section: int
    epoch: int
    window: int
    lo: int  # offsets [lo, hi) within the window
    hi: int


class _Stream:
    """The infinite row stream of one section: index arithmetic only (no data)."""

    def __init__(self, store: PairStore, section: int, chunks: list[int], seed: int, window_chunks: int):
        self.section = section
        self.chunks = chunks
        ranges = [store.chunk_rows(c) for c in chunks]
        self.starts = [r.start for r in ranges]
        self.sizes = [len(r) for r in ranges]
        self.n_rows = sum(self.sizes)
        self.k = window_chunks
        self.n_windows = math.ceil(len(chunks) / window_chunks)
        self._seed = row_seed(seed, section, _TAG_SECTION)
        self._epochs: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], _Window] = OrderedDict()
        self._lock = threading.Lock()

    def _epoch_seed(self, epoch: int) -> int:
        return row_seed(self._seed, epoch, _TAG_EPOCH)

    def epoch(self, e: int) -> tuple[list[int], list[int]]:
        """(chunk order as indices into self.chunks, start offset of each window within the epoch)."""
        with self._lock:
            hit = self._epochs.get(e)
            if hit is not None:
                self._epochs.move_to_end(e)
                return hit
        g = torch.Generator().manual_seed(self._epoch_seed(e))
        order = torch.randperm(len(self.chunks), generator=g).tolist()
        starts, acc = [], 0
        for w in range(self.n_windows):
            starts.append(acc)
            acc += sum(self.sizes[i] for i in order[w * self.k:(w + 1) * self.k])
        with self._lock:
            self._epochs[e] = (order, starts)
            while len(self._epochs) > _EPOCH_CACHE:
                self._epochs.popitem(last=False)
        return order, starts

    def window(self, e: int, w: int) -> _Window:
        with self._lock:
            hit = self._windows.get((e, w))
            if hit is not None:
                self._windows.move_to_end((e, w))
                return hit
        order, _ = self.epoch(e)
        members = order[w * self.k:(w + 1) * self.k]
        concat = torch.cat([torch.arange(self.starts[i], self.starts[i] + self.sizes[i]) for i in members])
        g = torch.Generator().manual_seed(row_seed(self._epoch_seed(e), w, _TAG_WINDOW))
        perm = torch.randperm(len(concat), generator=g)
        win = _Window(tuple(self.chunks[i] for i in members), perm, concat[perm])
        with self._lock:
            self._windows[(e, w)] = win
            while len(self._windows) > _WINDOW_INDEX_CACHE:
                self._windows.popitem(last=False)
        return win

    def segments(self, start: int, count: int) -> list[_Segment]:
        """Positions [start, start + count) of the stream as pieces of windows, in stream order."""
        out, p, end = [], start, start + count
        while p < end:
            e, o = divmod(p, self.n_rows)
            _, starts = self.epoch(e)
            w = bisect.bisect_right(starts, o) - 1
            w_end = starts[w + 1] if w + 1 < self.n_windows else self.n_rows
            lo = o - starts[w]
            m = min(end - p, w_end - o)
            out.append(_Segment(self.section, e, w, lo, lo + m))
            p += m
        return out


class PairSampler:
    """Batches of pairs for reflow training, a pure function of (store contents, seed, batch_size, forward_ratio,
    window_chunks, step): `batch(step)`, asked in any order (see the module docstring for the streams).

    mode "memory" when the store's float32 noise/sample (+ cond) + int64 label/direction (`ram_bytes(store)`) fit
    ram_budget_bytes (the whole store is read once), else "stream" (windows of chunks read on demand, a small LRU
    of them kept, the next steps' windows prefetched by a background thread when prefetch=True);
    ram_budget_bytes=0 forces stream. Both give bit-identical batches. Every batch is a `PairBatch`: float32
    noise/sample, long label/direction, index = the global rows, and float32 cond from a conditional store (None
    otherwise). Iterating yields steps 0, 1, 2, ...
    """

    def __init__(self, store: PairStore, batch_size: int, *, forward_ratio: float = 0.0, seed: int = 0,
                 ram_budget_bytes: int = 2 * 2 ** 30, window_chunks: int = 8, prefetch: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= forward_ratio <= 1.0:
            raise ValueError(f"forward_ratio must be in [0, 1], got {forward_ratio}")
        if window_chunks < 1:
            raise ValueError(f"window_chunks must be >= 1, got {window_chunks}")
        pending = store.pending_shards()
        if pending:
            raise PairStoreIncomplete(f"pair store {store.url} is incomplete: {len(pending)} of {len(store.plan)} "
                                      f"shards pending ({pending[:10]}{'...' if len(pending) > 10 else ''}); "
                                      "finish simulating pairs first")
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.forward_ratio, self.window_chunks = forward_ratio, window_chunks
        self.n_fwd = int(round(forward_ratio * batch_size))
        self.n_bwd = batch_size - self.n_fwd
        c = store.chunk_size
        bwd_chunks = [i for i in range(store.num_chunks) if i * c < store.n_backward]
        fwd_chunks = [i for i in range(store.num_chunks) if i * c >= store.n_backward]
        if self.n_fwd and not fwd_chunks:
            raise ValueError(f"forward_ratio={forward_ratio} but the store at {store.url} has no forward pairs")
        if self.n_bwd and not bwd_chunks:
            raise ValueError(f"forward_ratio={forward_ratio} < 1 but the store at {store.url} has no backward pairs")
        # (stream, rows per step), backward first
        self._streams: list[tuple[_Stream, int]] = []
        if self.n_bwd:
            self._streams.append((_Stream(store, BACKWARD, bwd_chunks, seed, window_chunks), self.n_bwd))
        if self.n_fwd:
            self._streams.append((_Stream(store, FORWARD, fwd_chunks, seed, window_chunks), self.n_fwd))
        self.mode = "memory" if 0 < ram_bytes(store) <= ram_budget_bytes else "stream"
        self.prefetch = bool(prefetch) and self.mode == "stream"
        self._closed = False
        self._next_step = 0
        self._lock = threading.Lock()
        self._data: PairBatch | None = None
        self._cache: OrderedDict[tuple[int, int, int], Future] = OrderedDict()
        self._read_pool: ThreadPoolExecutor | None = None
        self._prefetch_pool: ThreadPoolExecutor | None = None
        if self.mode == "memory":
            self._data = store.read(slice(0, store.n))
        else:
            window_rows = window_chunks * c
            self._capacity = max(4, sum(2 * (math.ceil(n / window_rows) + 2) for _, n in self._streams))
            threads = io_threads(store)  # with one, the caller reads the chunks itself
            if threads > 1:
                self._read_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pairs-read")
            if self.prefetch:
                self._prefetch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairs-prefetch")

    # ---- indices
    def _segments(self, step: int) -> list[_Segment]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return [seg for stream, n in self._streams for seg in stream.segments(step * n, n)]

    def rows_for_step(self, step: int) -> torch.Tensor:
        """The global rows (long, (batch_size,)) of step `step`: backward rows first, then forward rows."""
        return self._rows(self._segments(step))

    def _rows(self, segments: list[_Segment]) -> torch.Tensor:
        return torch.cat([self._stream(s.section).window(s.epoch, s.window).rows[s.lo:s.hi] for s in segments])

    def _stream(self, section: int) -> _Stream:
        return next(st for st, _ in self._streams if st.section == section)

    def epoch_at(self, step: int) -> int:
        """The epoch of the backward stream (forward stream if backward is unused) at the end of step `step`."""
        stream, n = self._streams[0]
        return ((step + 1) * n - 1) // stream.n_rows

    # ---- batches
    def batch(self, step: int) -> PairBatch:
        """The batch of step `step` (any order; the same batch for the same step, seed and store)."""
        if self._closed:
            raise RuntimeError("PairSampler is closed")
        segments = self._segments(step)
        rows = self._rows(segments)
        if self._data is not None:
            out = self._data.select(rows)
            out.index = rows
            return out
        parts = []
        for s in segments:
            win = self._stream(s.section).window(s.epoch, s.window)
            parts.append(self._window_data((s.section, s.epoch, s.window), win).select(win.perm[s.lo:s.hi]))
        out = _cat(parts)
        if not torch.equal(out.index, rows):  # the chunk reads and the index arithmetic must agree
            raise RuntimeError(f"PairSampler internal error: step {step} read rows that differ from its plan")
        out.index = rows
        if self.prefetch:
            self._schedule_prefetch(step + 1)
        return out

    # ---- stream backend
    def _read_window(self, win: _Window) -> PairBatch:
        pool = self._read_pool
        parts = list(pool.map(self.store.read_chunk, win.chunks)) if pool is not None and len(win.chunks) > 1 \
            else [self.store.read_chunk(ch) for ch in win.chunks]
        return _cat_1thread(parts)

    def _evict(self) -> None:  # under self._lock
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)

    def _window_data(self, key: tuple[int, int, int], win: _Window) -> PairBatch:
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                mine = False
            else:
                fut, mine = Future(), True
                self._cache[key] = fut
                self._evict()
        if not mine:
            try:
                return fut.result()
            except Exception:  # noqa: BLE001 - a failed prefetch: read it here, raising this read's own error
                with self._lock:
                    if self._cache.get(key) is fut:
                        del self._cache[key]
                return self._window_data(key, win)
        try:
            data = self._read_window(win)
        except BaseException as e:
            fut.set_exception(e)
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]
            raise
        fut.set_result(data)
        return data

    def _schedule_prefetch(self, step: int) -> None:
        """Queue loads of the windows that steps `step`, `step + 1`, ... need, one window of lookahead past the
        next step per stream (sequential steps assumed; a wrong guess only costs a read)."""
        pool = self._prefetch_pool
        if pool is None or self._closed:
            return
        window_rows = self.window_chunks * self.store.chunk_size
        budget = self._capacity // 2
        for stream, n in self._streams:
            for s in stream.segments(step * n, max(n, window_rows)):
                key = (s.section, s.epoch, s.window)
                with self._lock:
                    if key in self._cache or budget <= 0:
                        continue
                    budget -= 1
                    fut: Future = Future()
                    self._cache[key] = fut
                    self._evict()
                try:
                    pool.submit(self._prefetch_one, fut, stream.window(s.epoch, s.window))
                except RuntimeError:  # pool shut down by close()
                    fut.set_exception(RuntimeError("PairSampler is closed"))
                    return

    def _prefetch_one(self, fut: Future, win: _Window) -> None:
        try:
            fut.set_result(self._read_window(win))
        except BaseException as e:  # noqa: BLE001 - surfaced (and retried) by the step that needs the window
            fut.set_exception(e)

    # ---- iteration, lifetime
    def __iter__(self) -> Iterator[PairBatch]:
        return self

    def __next__(self) -> PairBatch:
        if self._closed:
            raise StopIteration
        b = self.batch(self._next_step)
        self._next_step += 1
        return b

    def close(self) -> None:
        self._closed = True
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=True, cancel_futures=True)
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
        with self._lock:
            for fut in self._cache.values():  # futures of cancelled prefetches never complete otherwise
                if not fut.done():
                    fut.set_exception(RuntimeError("PairSampler is closed"))
            self._cache.clear()
        self._data = None

    def __enter__(self) -> "PairSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._closed = True
            for pool in (self._prefetch_pool, self._read_pool):
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return (f"PairSampler({self.store.url!r}, batch_size={self.batch_size}, forward_ratio={self.forward_ratio}, "
                f"seed={self.seed}, mode={self.mode!r}, window_chunks={self.window_chunks})")
