"""Packed micro-batches and the chunked LM head against the reference step (padded rows, full logits).

Two tiny models with different tokenizers and chat templates: the 2-layer Llama with the
SmolLM2 tokenizer (ChatML, a default system turn, tied LM head) and a 2-layer Qwen2 with a
byte-level BPE trained in conftest (header template, BOS added by the tokenizer, untied head,
grouped-query attention).
"""

from collections import Counter
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from r2d.config import ConfigError, load_config
from r2d.losses import IGNORE_INDEX
from r2d.train.batching import collate
from r2d.train.head import Head, linear_cross_entropy
from r2d.train.loop import loss_settings
from r2d.train.model import build_model
from r2d.train.objective import micro_batch_counts
from r2d.train.packing import collate_packed, pack, verdict_pair
from r2d.train.steps import collate_window, make_optimizer, optimizer_step, windows
from r2d.train.synthetic import synthetic_rows
from r2d.train.tokenize import tokenize_rows

MODES = [("flat", "mean"), ("eq3", "per_class")]
LAYOUTS = {"packed": ["train.packing=true"], "packed+chunked": ["train.packing=true", "train.chunked_ce=true"],
           "padded+chunked": ["train.chunked_ce=true"]}


def varied_rows(n: int) -> list[dict]:
    """Synthetic traces with their reasoning repeated 1-4 times: lengths from ~100 to ~180 tokens."""
    rows = synthetic_rows(n, seed=3)
    for i, row in enumerate(rows):
        k = 1 + (i * 5) % 4
        row["reasoning_steps"] = [s for _ in range(k) for s in row["reasoning_steps"]]
        row["step_pivots"] = [p for _ in range(k) for p in row["step_pivots"]]
    return rows


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.source={model_dir}", "train.lora.dropout=0.0", "train.max_length=256",
                              "train.micro_batch_tokens=350", "train.cpo_rethink=true", "train.ce_chunk_tokens=37",
                              *extra])


class _Capture:
    """Optimizer and scheduler stand-in: keeps the gradients ``optimizer_step`` produced."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def get_last_lr(self):
        return [0.0]


def _built(cfg, rows):
    """The model (seeded, its LoRA B moved off zero), its loss settings and the first window of ``rows``."""
    torch.manual_seed(0)
    model, tok, pivots = build_model(cfg)
    with torch.no_grad():  # LoRA B starts at zero; give the adapters a say in the function
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    window = next(iter(windows(rows, tok, pivots, max_length=cfg.train.max_length, batch_size=4, grad_accum=2,
                               dropped=Counter(), length_grouping=False)))
    return model, tok, loss_settings(cfg, pivots), window


def _one_step(cfg, rows):
    """Metrics and gradients of one step over the first window of ``rows`` (batch 4 x accum 2)."""
    model, tok, s, window = _built(cfg, rows)
    tc = cfg.train
    batches = collate_window(window, tok.pad_token_id, "cpu", s, packing=tc.packing,
                             micro_batch_tokens=tc.micro_batch_tokens, targets=tc.chunked_ce)
    capture = _Capture(model)
    metrics = optimizer_step(model, capture, capture, batches, s, max_grad_norm=0,
                             ce_chunk=tc.ce_chunk_tokens if tc.chunked_ce else 0)
    return metrics, capture.grads, batches


@lru_cache(maxsize=None)
def _reference(model_dir, mode, *extra):
    return _one_step(_cfg(model_dir, f"train.sft_mode={mode[0]}", f"train.cpo_variant={mode[1]}", *extra),
                     varied_rows(8))


def _assert_same_step(got, ref):
    (m, grads, _), (m_ref, grads_ref, _) = got, ref
    for key in ("loss", "sft_loss", "cpo_loss", "pivot_acc", "pivot_margin", "n_pivots", "tokens", "grad_norm"):
        assert m[key] == pytest.approx(m_ref[key], rel=1e-5, abs=1e-6), key
    assert set(grads) == set(grads_ref)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", MODES, ids=["flat-mean", "eq3-per_class"])
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_packed_and_chunked_steps_equal_the_reference(tiny_model_dir, qwen_model_dir, which, mode, layout):
    """Same window, same losses and same gradients, however it is laid out and whichever head computes them.

    The window's 8 traces (107-177 tokens with the Llama's tokenizer) become 4 packed rows of at most 350
    tokens (one holds 3 traces) instead of 2 padded micro-batches of 4 rows; the chunked head takes 37
    positions at a time, so chunks cross traces.
    """
    model_dir = tiny_model_dir if which == "llama" else qwen_model_dir
    ref = _reference(model_dir, mode)
    got = _one_step(_cfg(model_dir, f"train.sft_mode={mode[0]}", f"train.cpo_variant={mode[1]}", *LAYOUTS[layout]),
                    varied_rows(8))
    if layout.startswith("packed"):
        assert len(got[2]) > 2 and all(b["input_ids"].shape[0] == 1 for b in got[2])
        assert max(len(b["cu_seq_lens"]) - 1 for b in got[2]) >= 2
    assert got[0]["n_pivots"] > 8 and got[0]["cpo_loss"] > 0
    _assert_same_step(got, ref)


def test_chunked_head_in_full_fine_tuning_equals_the_reference(tiny_model_dir):
    """Full fine-tuning trains the tied embedding/head matrix: its gradient from the chunked head must match too."""
    extra = ("train.lora.enabled=false",)
    ref = _reference(tiny_model_dir, ("flat", "mean"), *extra)
    got = _one_step(_cfg(tiny_model_dir, *extra, *LAYOUTS["packed+chunked"]), varied_rows(8))
    assert "model.embed_tokens.weight" in got[1]
    _assert_same_step(got, ref)


def test_packed_batch_8_trains_like_unpacked_1_x_8(tiny_model_dir):
    """Three SGD steps: packed windows of 8 traces follow the reference's 1 x 8 trajectory."""
    def train(extra, batch_size, grad_accum):
        cfg = _cfg(tiny_model_dir, "train.sft_mode=eq3", *extra)
        torch.manual_seed(0)
        model, tok, pivots = build_model(cfg)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        s, tc = loss_settings(cfg, pivots), cfg.train
        stream = windows(varied_rows(24), tok, pivots, max_length=512, batch_size=batch_size, grad_accum=grad_accum,
                         dropped=Counter(), length_grouping=False)
        losses = [optimizer_step(model, optimizer, scheduler,
                                 collate_window(w, tok.pad_token_id, "cpu", s, packing=tc.packing,
                                                micro_batch_tokens=tc.micro_batch_tokens, targets=tc.chunked_ce),
                                 s, ce_chunk=tc.ce_chunk_tokens if tc.chunked_ce else 0)["loss"]
                  for w in stream]
        return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_a, params_a = train(LAYOUTS["packed+chunked"], 8, 1)
    loss_b, params_b = train((), 1, 8)
    assert len(loss_a) == len(loss_b) == 3
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert abs(loss_a[2] - loss_a[0]) > 1e-3
    for name, value in params_a.items():
        torch.testing.assert_close(value, params_b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_attention_stays_inside_each_trace(tiny_model_dir, qwen_model_dir, which):
    """Each trace of a packed row gets the logits it gets alone; without the packed attention it would not."""
    model_dir = tiny_model_dir if which == "llama" else qwen_model_dir
    cfg = _cfg(model_dir, "train.packing=true")
    packed_model, tok, pivots = build_model(cfg)
    plain_model, _, _ = build_model(_cfg(model_dir))
    for m in (packed_model, plain_model):
        m.eval()
    examples = list(tokenize_rows(tok, varied_rows(3), pivots, 512, Counter()))
    batch = collate_packed(examples, loss_settings(cfg, pivots))
    bounds = batch["cu_seq_lens"].tolist()
    with torch.no_grad():
        packed = packed_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              cu_seq_lens_q=batch["cu_seq_lens"], max_length_q=batch["max_length"]).logits[0]
        leaky = plain_model(input_ids=batch["input_ids"]).logits[0]  # one causal row: traces see their elders
        for e, a, b in zip(examples, bounds[:-1], bounds[1:]):
            alone = plain_model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-4, atol=1e-5)
            if a > 0:
                assert (leaky[a:b] - alone).abs().max() > 1e-3


def test_packed_row_layout_and_counts(tiny_model_dir):
    """Positions restart per trace, no trace's last position predicts the next trace, and the host-side
    counts equal what the reference reads from its padded rows."""
    cfg = _cfg(tiny_model_dir)
    _, tok, pivots = build_model(cfg)
    s = loss_settings(cfg, pivots)
    examples = list(tokenize_rows(tok, varied_rows(3), pivots, 512, Counter()))
    batch = collate_packed(examples, s)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["cu_seq_lens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["max_length"] == max(lengths)
    expected_positions = [t for n in lengths for t in range(n)]
    assert batch["position_ids"][0].tolist() == expected_positions
    last_positions = {b - 1 for b in batch["cu_seq_lens"].tolist()[1:]}
    assert not last_positions & set(batch["target_pos"].tolist())
    flat_labels = [lab for e in examples for lab in [IGNORE_INDEX] + e["labels"][1:]]
    for pos, target in zip(batch["target_pos"].tolist(), batch["target_ids"].tolist()):
        assert flat_labels[pos + 1] == target
    reference = micro_batch_counts(collate(examples, tok.pad_token_id), s)
    torch.testing.assert_close(batch["host"]["counts"], reference)


def test_pack_first_fit_decreasing():
    lengths = [500, 400, 300, 300, 200, 100, 100]
    bins = pack([{"length": n, "id": i} for i, n in enumerate(lengths)], max_tokens=700)
    assert sorted(e["id"] for b in bins for e in b) == list(range(len(lengths)))
    assert all(sum(e["length"] for e in b) <= 700 for b in bins)
    assert len(bins) == 3  # 1,900 tokens need at least 3 bins of 700
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack([{"length": 701}], max_tokens=700)


@pytest.mark.parametrize("trainable", ["rows", "weight", "none"])
def test_linear_cross_entropy_equals_full_logits(trainable):
    """Loss and gradients of the chunked head equal autograd through the full logits.

    The reference: W' = W with rows [3, 7] replaced by delta, loss = sum_i w_i * CE(h_i @ W'.T, y_i).
    """
    torch.manual_seed(0)
    m, hidden, vocab = 11, 8, 20
    h = torch.randn(m, hidden, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=trainable == "weight")
    rows = [3, 7] if trainable == "rows" else []
    delta = torch.randn(len(rows), hidden, dtype=torch.float64, requires_grad=True) if rows else None
    targets = torch.tensor([3, 7, 0, 19, 7, 3, 5, 5, 1, 2, 3])
    w = torch.rand(m, dtype=torch.float64)

    effective = weight.index_copy(0, torch.tensor(rows), delta) if rows else weight
    expected = (F.cross_entropy(h @ effective.T, targets, reduction="none") * w).sum()
    leaves = [t for t in (h, weight, delta) if t is not None and t.requires_grad]
    expected_grads = torch.autograd.grad(expected, leaves)

    got = linear_cross_entropy(h, Head(weight, rows, delta), targets, w.double(), chunk=4)
    got_grads = torch.autograd.grad(got * 3.0, leaves)  # an upstream gradient other than 1 is honoured
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, 3.0 * b.to(a.dtype), rtol=1e-5, atol=1e-6)


def test_packing_settings_are_validated():
    with pytest.raises(ConfigError, match="train.micro_batch_tokens"):
        load_config(None, ["train.packing=true", "train.max_length=2048", "train.micro_batch_tokens=1024"])
    for name in ("packing", "chunked_ce"):
        with pytest.raises(ConfigError, match=f"train.{name}.*fsdp"):
            load_config(None, [f"train.{name}=true", "train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="train.ce_chunk_tokens"):
        load_config(None, ["train.ce_chunk_tokens=0"])


def test_make_optimizer_sees_the_same_parameters_with_packing(tiny_model_dir):
    """Packing changes the attention, not what trains."""
    plain, _, _ = build_model(_cfg(tiny_model_dir))
    packed, _, _ = build_model(_cfg(tiny_model_dir, "train.packing=true", "train.chunked_ce=true"))
    names = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert names(plain) == names(packed)
    assert len(make_optimizer(packed, 1e-3, 0.0, "constant", 0.0, 10)[0].param_groups) == 2


def test_verdict_pair_flips_the_last_step_pivot_and_scores_the_first_answer_tokens(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, "train.packing=true", "train.verdict_weight=1", "train.verdict_tokens=3",
               "train.micro_batch_tokens=512")
    _, _, s, _ = _built(cfg, varied_rows(8))
    safe, unsafe, rethink, x = s.safe_id, s.unsafe_id, s.pivot_ids[2], IGNORE_INDEX
    # prompt | step [SAFE] step [UNSAFE] | answer 7 8 [UNSAFE] 9 10 [SAFE]
    ids = [1, 2, 3, safe, 4, unsafe, 7, 8, unsafe, 9, 10, safe]
    example = {"input_ids": ids, "labels": [x, x] + ids[2:], "segment": [0, 0] + [1] * 4 + [2] * 6, "length": 12}
    trace, copy = verdict_pair(example, s)
    assert trace["input_ids"] == ids and trace["verdict_t"] == [6, 7, 9] and trace["verdict_sign"] == 1
    assert copy["input_ids"] == [1, 2, 3, safe, 4, safe, 7, 8, unsafe, 9]  # the verdict flipped, cut after 9
    assert copy["verdict_t"] == [6, 7, 9] and copy["verdict_sign"] == -1 and set(copy["labels"]) == {x}
    assert "verdict_t" not in example  # the caller's example is left as it was
    ends_rethink = {**example, "input_ids": ids[:5] + [rethink] + ids[6:],
                    "labels": [x, x] + ids[2:5] + [rethink] + ids[6:]}
    assert verdict_pair(ends_rethink, s) == [ends_rethink]
    no_answer = {**example, "input_ids": ids[:6], "labels": example["labels"][:6], "segment": example["segment"][:6]}
    assert verdict_pair(no_answer, s) == [no_answer]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_verdict_term_equals_its_definition(tiny_model_dir, layout):
    """The step with mu = 0.5 gives the reference step's loss and gradients plus 0.5 x L_V, where L_V is
    computed from its definition: each trace, and its copy with the verdict flipped, run alone with full
    logits; delta = sum of log p over the first 5 answer tokens in the trace minus in the copy;
    L_V = mean over the window's traces with a verdict (6 of 8: two end their steps with [RETHINK]) of
    -log sigmoid(delta). Pairs split across micro-batches or mismatched positions would change the number."""
    mu = 0.5
    cfg = _cfg(tiny_model_dir, *LAYOUTS[layout], f"train.verdict_weight={mu}", "train.verdict_tokens=5",
               "train.micro_batch_tokens=512")
    got_metrics, got_grads, batches = _one_step(cfg, varied_rows(8))
    ref_metrics, ref_grads, _ = _reference(tiny_model_dir, ("flat", "mean"))

    model, _, s, window = _built(cfg, varied_rows(8))
    deltas = []
    for example in (e for micro in window for e in micro):
        members = verdict_pair(example, s)
        last_step = [p for p, g in zip(example["labels"], example["segment"]) if p in s.pivot_ids and g == 1][-1]
        assert len(members) == (1 if last_step == s.pivot_ids[2] else 2)
        if len(members) == 1:
            continue
        sums = []
        for member in members:
            logp = model(input_ids=torch.tensor([member["input_ids"]])).logits[0].float().log_softmax(-1)
            t = torch.tensor(member["verdict_t"])
            sums.append(logp[t - 1, torch.tensor(member["input_ids"])[t]].sum())
        deltas.append(sums[0] - sums[1])
    direct = -F.logsigmoid(torch.stack(deltas)).mean()
    direct.backward()
    direct_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert sum(int(b["host"]["counts"][5]) for b in batches) == len(deltas) == 6
    assert got_metrics["verdict_loss"] == pytest.approx(direct.item(), rel=1e-5)
    assert got_metrics["loss"] == pytest.approx(ref_metrics["loss"] + mu * direct.item(), rel=1e-5)
    assert got_metrics["tokens"] == ref_metrics["tokens"]  # a copy is extra compute, not training data
    assert 0 <= got_metrics["verdict_acc"] <= 1
    assert set(got_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        expected = g + mu * direct_grads[name] if name in direct_grads else g
        torch.testing.assert_close(got_grads[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_verdict_settings_are_validated():
    with pytest.raises(ConfigError, match="verdict_weight.*packing or chunked_ce"):
        load_config(None, ["train.verdict_weight=1"])
    with pytest.raises(ConfigError, match="micro_batch_tokens.*2 x max_length"):
        load_config(None, ["train.verdict_weight=1", "train.packing=true", "train.max_length=512",
                           "train.micro_batch_tokens=600"])
    with pytest.raises(ConfigError, match="verdict_tokens"):
        load_config(None, ["train.verdict_weight=1", "train.chunked_ce=true", "train.verdict_tokens=0"])
    with pytest.raises(ConfigError, match="verdict_weight"):
        load_config(None, ["train.verdict_weight=-1"])
