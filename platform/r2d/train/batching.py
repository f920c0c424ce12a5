"""Length-grouped micro-batches and the padding collate.

Traces vary from ~100 to ~1000 tokens; batching them in arrival order pads every
short one to the longest, so most of the compute would go to padding. Rows are
buffered, sorted by length inside the buffer, cut into micro-batches, and the
micro-batches are shuffled (seeded) so the loss does not see a length ramp.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator

import torch

from r2d.losses import IGNORE_INDEX


def group_by_length(examples: Iterable[dict], batch_size: int, buffer_batches: int = 16,
                    seed: int = 0, enabled: bool = True) -> Iterator[list[dict]]:
    """Yield lists of ``batch_size`` examples; only the very last one may be shorter.

    Args:
        examples: dicts with a ``length`` key.
        batch_size: examples per micro-batch.
        buffer_batches: how many micro-batches to buffer and sort together; larger
            pads less but delays the first batch and widens the shuffle window.
        seed: shuffles the order of the micro-batches within each buffer.
        enabled: False keeps arrival order (no sorting, no shuffling).
    """
    rng = random.Random(seed)
    size = batch_size * (buffer_batches if enabled else 1)
    buffer: list[dict] = []

    def flush() -> list[list[dict]]:
        rows = sorted(buffer, key=lambda e: e["length"]) if enabled else list(buffer)
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        # A short remainder stays last: the training loop ends an epoch at the first
        # short micro-batch, so one shuffled to the front would skip the rest.
        short = batches.pop() if len(batches[-1]) < batch_size else None
        if enabled:
            rng.shuffle(batches)
        return batches + ([short] if short else [])

    for example in examples:
        buffer.append(example)
        if len(buffer) == size:
            yield from flush()
            buffer = []
    if buffer:
        yield from flush()


def collate(examples: list[dict], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch into tensors.

    Returns:
        ``input_ids`` and ``attention_mask`` [B, T], ``labels`` [B, T] (IGNORE_INDEX on
        padding) and ``segment`` [B, T] (0 on padding), all on ``device``.
    """
    if not examples:
        raise ValueError("collate: empty micro-batch")
    width = max(len(e["input_ids"]) for e in examples)
    out = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
        "segment": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        out["input_ids"][i, :n] = torch.as_tensor(e["input_ids"])
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = torch.as_tensor(e["labels"])
        out["segment"][i, :n] = torch.as_tensor(e["segment"])
    return {k: v.to(device) for k, v in out.items()}
