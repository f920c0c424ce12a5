"""Packed, padding-free micro-batches and the host-side view of their targets.

A step's traces (``batch_size x grad_accum`` of them, exactly as without packing) are cut
into micro-batches by a token budget and laid end to end in one row::

    input_ids     [1, N]   trace 1 | trace 2 | …           N = the traces' tokens, no padding
    position_ids  [1, N]   0 1 2 … | 0 1 2 … | …           restart per trace (RoPE sees each alone)
    cu_seq_lens   [k + 1]  0, n1, n1 + n2, …               the attention's boundaries (r2d.train.attention)

The loss does not read ``labels`` from the device. Everything it needs is known on the host
before the step starts, so the step never waits for the GPU to find a position:

    target_pos  [M]  flat positions (in the [B * T] layout) whose next token carries a label
    target_ids  [M]  that next token
    pivot_idx   [P]  which of the M targets are contrasted pivots, pivot_true / pivot_other
                     their column and their opposite's among the pivot ids (LossSettings.class_ids)
    host        counts (the objective's normalisers), each target's trace and segment,
                each pivot's class, the real tokens: CPU only, for the window's weights

With the verdict-following term (``train.verdict_weight``), each trace is followed in its
micro-batch by a copy of itself with its verdict flipped, cut after the scored answer tokens
(:func:`verdict_pair`); the copy carries no SFT or CPO target, only the scored tokens:

    verdict_pos   [R]  flat positions predicting a scored answer token, in the trace and in its copy
    verdict_ids   [R]  that token
    verdict_pair  [R]  the trace (0 .. pairs - 1) it belongs to, verdict_sign [R] +1 in the trace, -1 in the copy

A trace's last position predicts nothing (its "next token" belongs to the next trace). The same
view is built for padded rows (``packed=False``), so the chunked LM head works without packing too.
"""

from __future__ import annotations

import torch

from r2d.losses import ANSWER, IGNORE_INDEX, REASONING
from r2d.train.objective import N_PAIRS, N_RETHINK, N_SAFE, N_SEQS, N_TOKENS, LossSettings


def pack(examples: list[dict], max_tokens: int) -> list[list[dict]]:
    """First-fit decreasing: the examples in as few micro-batches of at most ``max_tokens`` tokens as it finds.

    Raises:
        ValueError: an example longer than ``max_tokens``.
    """
    bins: list[list[dict]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -e["length"]):
        n = example["length"]
        if n > max_tokens:
            raise ValueError(f"a {n}-token trace does not fit train.micro_batch_tokens ({max_tokens})")
        for i, free in enumerate(room):
            if n <= free:
                bins[i].append(example)
                room[i] -= n
                break
        else:
            bins.append([example])
            room.append(max_tokens - n)
    return bins


def verdict_pair(example: dict, s: LossSettings) -> list[dict]:
    """``[example]``, or ``[example, its copy]`` for the verdict-following term.

    The verdict is the trace's last reasoning pivot; the copy has it flipped ([SAFE] <-> [UNSAFE])
    and ends after the first ``s.verdict_tokens`` answer tokens that are not pivots, which both
    score (``verdict_t``). A trace without a [SAFE]/[UNSAFE] verdict or without an answer token
    (cut at a pivot by max_length) gets no copy.
    """
    labels, segment = example["labels"], example["segment"]
    pivots = set(s.pivot_ids) or {s.safe_id, s.unsafe_id}
    steps = [t for t, label in enumerate(labels) if label in pivots and segment[t] == REASONING]
    answer = [t for t, label in enumerate(labels)
              if segment[t] == ANSWER and label != IGNORE_INDEX and label not in pivots][:s.verdict_tokens]
    if not steps or not answer or labels[steps[-1]] not in (s.safe_id, s.unsafe_id):
        return [example]
    flipped = list(example["input_ids"][:answer[-1] + 1])
    flipped[steps[-1]] = s.unsafe_id if labels[steps[-1]] == s.safe_id else s.safe_id
    copy = {"input_ids": flipped, "labels": [IGNORE_INDEX] * len(flipped), "segment": [0] * len(flipped),
            "length": len(flipped), "verdict_t": answer, "verdict_sign": -1}
    return [{**example, "verdict_t": answer, "verdict_sign": 1}, copy]


def with_verdict_copies(examples: list[dict], s: LossSettings) -> list[dict]:
    """``examples`` with their verdict copies (:func:`verdict_pair`), each trace and copy bound into one
    unit for :func:`pack`, so that the two land in the same micro-batch; :func:`unbind` undoes it."""
    units = []
    for example in examples:
        members = verdict_pair(example, s)
        units.append(members[0] if len(members) == 1
                     else {"length": sum(m["length"] for m in members), "members": members})
    return units


def unbind(units: list[dict]) -> list[dict]:
    return [m for unit in units for m in unit.get("members", [unit])]


def _verdict_targets(examples: list[dict], starts: list[int]) -> tuple[dict, int]:
    pos, ids, pair, sign = [], [], [], []
    n_pairs = 0
    for e, start in zip(examples, starts):
        if "verdict_t" not in e:
            continue
        n_pairs += e["verdict_sign"] > 0  # a copy follows its trace (collate_window keeps them together)
        for t in e["verdict_t"]:
            pos.append(start + t - 1)
            ids.append(e["input_ids"][t])
            pair.append(n_pairs - 1)
            sign.append(e["verdict_sign"])
    long = torch.long
    return {"verdict_pos": torch.tensor(pos, dtype=long), "verdict_ids": torch.tensor(ids, dtype=long),
            "verdict_pair": torch.tensor(pair, dtype=long), "verdict_sign": torch.tensor(sign, dtype=long)}, n_pairs


def _targets(examples: list[dict], starts: list[int], s: LossSettings) -> dict:
    """Target positions and their bookkeeping, for traces starting at flat positions ``starts``."""
    classes = s.class_ids()
    column = {tok: j for j, tok in enumerate(classes)}
    opposite = {0: 1, 1: 0, 2: 0}  # [SAFE] <-> [UNSAFE]; [RETHINK] against [SAFE] (losses._pivot_margins)
    pos, ids, seq, seg, pivot_idx, pivot_true = [], [], [], [], [], []
    counts = [0.0] * 6
    for j, (e, start) in enumerate(zip(examples, starts)):
        in_parts = False
        for t in range(1, len(e["labels"])):
            label = e["labels"][t]
            if label == IGNORE_INDEX:
                continue
            if label in column:
                pivot_idx.append(len(pos))
                pivot_true.append(column[label])
                counts[N_SAFE + column[label]] += 1
            pos.append(start + t - 1)
            ids.append(label)
            seq.append(j)
            seg.append(e["segment"][t])
            in_parts |= e["segment"][t] in (REASONING, ANSWER)
        counts[N_SEQS] += in_parts
    counts[N_TOKENS] = len(pos)
    verdict = {}
    if s.verdict_weight > 0:
        verdict, counts[N_PAIRS] = _verdict_targets(examples, starts)
    long = torch.long
    return {**verdict, "target_pos": torch.tensor(pos, dtype=long), "target_ids": torch.tensor(ids, dtype=long),
            "pivot_idx": torch.tensor(pivot_idx, dtype=long), "pivot_true": torch.tensor(pivot_true, dtype=long),
            "pivot_other": torch.tensor([opposite[c] for c in pivot_true], dtype=long),
            "host": {"counts": torch.tensor(counts, dtype=torch.float64), "target_seq": torch.tensor(seq, dtype=long),
                     "target_seg": torch.tensor(seg, dtype=long), "pivot_class": torch.tensor(pivot_true, dtype=long),
                     "n_traces": len(examples),
                     # a trace's tokens; a verdict copy's are extra compute, not more training data
                     "tokens": sum(len(e["input_ids"]) for e in examples if e.get("verdict_sign", 1) > 0)}}


def collate_packed(examples: list[dict], s: LossSettings) -> dict:
    """One padding-free row of ``examples`` with its targets (CPU tensors; see the module docstring)."""
    if not examples:
        raise ValueError("collate_packed: empty micro-batch")
    lengths = [len(e["input_ids"]) for e in examples]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    ids = [tok for e in examples for tok in e["input_ids"]]
    positions = [t for n in lengths for t in range(n)]
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens": torch.tensor(starts + [len(ids)], dtype=torch.int32),
            "max_length": max(lengths), **_targets(examples, starts, s)}


def collate_padded(examples: list[dict], pad_id: int, s: LossSettings) -> dict:
    """Right-padded rows (as ``batching.collate``) with the same targets view, for the chunked head unpacked."""
    if not examples:
        raise ValueError("collate_padded: empty micro-batch")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": mask,
            **_targets(examples, [i * width for i in range(len(examples))], s)}


def to_device(batch: dict, device) -> dict:
    """Device copies of the tensors the forward pass reads; ``host`` and ints stay where they are.

    On CUDA the copies come from pinned memory without blocking, so queuing them never waits for the GPU.
    """
    cuda = str(device).startswith("cuda")
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and key != "host":
            value = (value.pin_memory() if cuda else value).to(device, non_blocking=cuda)
        out[key] = value
    return out
