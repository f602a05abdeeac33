"""Training epochs: each one a fresh entity-swap augmentation of the training rows, tokenized.

On a GPU a training step takes milliseconds, and augmenting plus tokenizing 11k rows in the
training process takes longer than an epoch of steps. `EpochSource(workers=N)` prepares the next
epochs in N background processes, so the training loop only pads and copies. With workers=0 it
prepares each epoch inline (CPU training, tests), giving the same epochs for the same seed.
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor

from tokenizers import Tokenizer

from .corpus import Example
from .entities import PUNCTUATED_NAME_RATE, NameFactory, augment
from .tokenizer import EOS_ID
from .traffic import Facts, epoch_rows

MAX_SOURCE_TOKENS = 96
MAX_TARGET_TOKENS = 96

Pair = tuple[list[int], list[int]]


def _clip(ids: list[int], limit: int) -> list[int]:
    return ids[: limit - 1] + [EOS_ID] if len(ids) > limit else ids


def encode(tok: Tokenizer, examples: list[Example]) -> list[Pair]:
    src = tok.encode_batch([ex.query for ex in examples])
    tgt = tok.encode_batch([ex.target for ex in examples])
    return [(_clip(s.ids, MAX_SOURCE_TOKENS), _clip(t.ids, MAX_TARGET_TOKENS)) for s, t in zip(src, tgt)]


def make_epoch(tok: Tokenizer, train: list[Example], real_names: list[str], seed: int, epoch: int,
               aug_rate: float, traffic_rate: float = 0.0, facts: Facts | None = None) -> list[Pair]:
    """Epoch `epoch`'s pairs; a pure function of its arguments, so workers and inline agree.
    With `traffic_rate` > 0, len(train) * traffic_rate traffic-shaped rows are added (traffic.py)."""
    names = NameFactory(seed * 100_003 + epoch, real_names, punctuated_rate=PUNCTUATED_NAME_RATE)
    rows = [augment(ex, names, aug_rate) for ex in train]
    if traffic_rate > 0:
        facts = facts or Facts.from_examples(train)
        rows += epoch_rows(train, facts, real_names, seed, epoch, aug_rate, int(len(train) * traffic_rate))
    return encode(tok, rows)


# Per-worker state, set once by the pool initializer (the rows are sent once, not per epoch).
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, train: list[Example], real_names: list[str], seed: int, aug_rate: float,
                 traffic_rate: float) -> None:
    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), train=train, names=real_names, seed=seed, rate=aug_rate,
                   traffic=traffic_rate, facts=Facts.from_examples(train) if traffic_rate > 0 else None)


def _worker_epoch(epoch: int) -> list[Pair]:
    w = _WORKER
    return make_epoch(w["tok"], w["train"], w["names"], w["seed"], epoch, w["rate"], w["traffic"], w["facts"])


class EpochSource:
    """Yields epochs 1, 2, 3, ... of augmented pairs, prepared `workers` epochs ahead."""

    def __init__(self, tok: Tokenizer, train: list[Example], real_names: list[str], seed: int,
                 aug_rate: float, workers: int = 0, traffic_rate: float = 0.0):
        self.facts = Facts.from_examples(train) if traffic_rate > 0 else None
        self.args = (tok, train, real_names, seed, aug_rate, traffic_rate)
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[Future] = deque()
        self.next_epoch = 1
        if workers > 0:
            # spawn: the training process may already hold a CUDA context, which fork would copy.
            self.pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(tok.to_str(), train, real_names, seed, aug_rate, traffic_rate))
            for _ in range(workers * 2):
                self._submit()

    def _submit(self) -> None:
        self.pending.append(self.pool.submit(_worker_epoch, self.next_epoch))
        self.next_epoch += 1

    def next(self) -> list[Pair]:
        if self.pool is None:
            tok, train, names, seed, rate, traffic = self.args
            epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
            return make_epoch(tok, train, names, seed, epoch, rate, traffic, self.facts)
        pairs = self.pending.popleft().result()
        self._submit()
        return pairs

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending:
                f.cancel()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
