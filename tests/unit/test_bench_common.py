"""The benchmark helpers: medians of repeats, ratios against a baseline, targets, the table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from common import (Row, emit, format_table, meets, median, median_interval, per_second, percentile,  # noqa: E402
                    ratio, repeat, summarize_collapsed)


def test_median_of_odd_and_even_repeats():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5  # mean of the two middle values


def test_median_refuses_no_repeats_and_nan():
    with pytest.raises(ValueError, match="no repeats"):
        median([])
    with pytest.raises(ValueError, match="NaN"):
        median([1.0, math.nan, 2.0])


def test_ratio_and_missing_baselines():
    assert ratio(30.0, 10.0) == pytest.approx(3.0)
    assert ratio(None, 10.0) is None
    assert ratio(5.0, 0.0) is None  # a zero baseline has no meaningful ratio
    assert ratio(5.0, None) is None


def test_meets_for_gains_and_costs():
    assert meets(3.0, 3.0) is True
    assert meets(2.99, 3.0) is False
    assert meets(1.10, 1.15, higher_is_better=False) is True
    assert meets(1.20, 1.15, higher_is_better=False) is False
    assert meets(None, 1.0) is None


def test_percentile_interpolates_between_order_statistics():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == pytest.approx(4.96)  # 4 + 0.96 * (5 - 4)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_per_second_and_repeat():
    assert per_second(100, 4.0) == 25.0
    calls = []
    times = repeat(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5
    with pytest.raises(ValueError):
        repeat(lambda: None, repeats=0)


def test_row_ratio_target_and_table():
    gain = Row("distill", "ours vs batch 1", 66.0, "tok/s", "batch 1", 16.5, 3.0)
    cost = Row("serve", "p50 vs bare", 1.3, "s", "bare", 1.0, 1.15, higher_is_better=False)
    assert gain.ratio == pytest.approx(4.0) and gain.met is True
    assert cost.ratio == pytest.approx(1.3) and cost.met is False
    table = format_table([gain, cost])
    assert "| distill | ours vs batch 1 | 66.00 tok/s | batch 1 = 16.50 tok/s | 4.00x | >= 3x | yes |" in table
    assert "| <= 1.15x | **no** |" in table


def test_emit_writes_rows_with_ratio_and_met(tmp_path, capsys):
    out = tmp_path / "rows.json"
    emit([Row("train", "cpo vs sft", 95.0, "tok/s", "sft", 100.0, 0.95)], str(out))
    rows = json.loads(out.read_text())
    assert rows[0]["ratio"] == pytest.approx(0.95) and rows[0]["met"] is True
    assert "cpo vs sft" in capsys.readouterr().out


def test_summarize_collapsed_counts_self_and_inclusive_samples():
    text = "main;step;matmul 30\nmain;step;softmax 10\nmain;load 60\n"
    summary = summarize_collapsed(text)
    assert "samples: 100" in summary
    assert "  60.0   load" in summary  # self time
    assert "  40.0   step" in summary  # inclusive time


def test_py_spy_attach_profiles_a_running_process(tmp_path):
    """PySpyAttach samples a live process and names its hot function in the summary."""
    import subprocess
    import sys
    import time

    import pytest

    from common import PySpyAttach, py_spy_binary

    if py_spy_binary() is None:
        pytest.skip("py-spy is in the bench extra")
    code = "import time\ndef hot_loop_for_the_profile():\n    while True: sum(range(1000))\nhot_loop_for_the_profile()"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        with PySpyAttach({"busy": proc.pid}, tmp_path) as spy:
            time.sleep(2)
    finally:
        proc.kill()
    if "busy" not in spy.paths:
        pytest.skip("py-spy could not attach here (no ptrace permission)")
    assert "hot_loop_for_the_profile" in spy.paths["busy"].read_text()


def test_training_flops_per_token_counts_frozen_weights_as_4_and_trainable_as_6():
    """Frozen 3->4 linear (12 + 4 = 16 weights) and trainable 4->2 linear (8 + 2 = 10): 4*26 + 2*10 = 124."""
    import torch

    from bench_train import flops_per_token

    frozen, trainable = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    frozen.requires_grad_(False)
    assert flops_per_token(torch.nn.Sequential(frozen, trainable)) == 124.0
    frozen.requires_grad_(True)  # full fine-tuning: the usual 6N
    assert flops_per_token(torch.nn.Sequential(frozen, trainable)) == 6.0 * 26


def test_serving_rows_meet_or_miss_by_overhead_and_by_batching():
    """transformers: p50 2.3 s over bare 2.0 s is 1.15x (met, at most 1.15x); 2.4 s is 1.2x (missed);
    4.0 req/s at 32 over 1.0 at 1 is 4x (met); 3.9 is missed; concurrency 8 has no target.
    vLLM: at most 1.05x (2.1 s met, 2.2 s missed) and at least 8x at 32 (8.0 met, 7.9 missed)."""
    from bench_serving import level_rows

    def met(engine: str, p50_1: float, req_s_32: float) -> list:
        levels = {1: {"p50_s": p50_1, "req_s": 1.0}, 8: {"p50_s": 2.0, "p99_s": 2.0, "req_s": 3.0},
                  32: {"p50_s": 5.0, "p99_s": 6.0, "req_s": req_s_32}}
        return [r.met for r in level_rows(engine, levels, {"p50_s": 2.0}, "bare", "")]

    assert met("transformers", 2.3, 4.0) == [True, None, True]
    assert met("transformers", 2.4, 4.0) == [False, None, True]
    assert met("transformers", 2.0, 3.9) == [True, None, False]
    assert met("vllm", 2.1, 8.0) == [True, None, True]
    assert met("vllm", 2.2, 8.0) == [False, None, True]
    assert met("vllm", 2.0, 7.9) == [True, None, False]


def test_distillation_projection_is_start_up_plus_recipe_tokens_at_the_steady_rate():
    """tiny.yaml distils 300 prompts x 128 tokens = 38,400 tokens. vLLM: 90 s wall, 20 s of it
    generating at 200 tok/s -> 70 + 192 = 262 s. Transformers: 100 s wall, 80 s generating at
    30 tok/s -> 20 + 1,280 = 1,300 s."""
    from bench_distill import projection_row

    row = projection_row({"seconds": 100.0, "engine_s": 80.0, "engine_tok_s": 30.0},
                         {"seconds": 90.0, "engine_s": 20.0, "engine_tok_s": 200.0})
    assert row.extra["tokens"] == 38_400
    assert row.value == pytest.approx(262.0)
    assert row.baseline == pytest.approx(1300.0)
    assert row.ratio == pytest.approx(262.0 / 1300.0)


def test_cpu_between_charges_each_process_its_use_inside_the_window():
    """Window [1, 3]: pid 1 (engine) 10 -> 14 s; pid 2 (driver) 5 -> 5.5 s; pid 3 starts inside
    the window with 2 s used, all charged; pid 4 ended before the window, not charged."""
    from common import cpu_between

    samples = [(0.0, {1: ("engine", 9.0), 2: ("driver", 5.0), 4: ("old", 3.0)}),
               (1.0, {1: ("engine", 10.0), 2: ("driver", 5.0)}),
               (2.0, {1: ("engine", 12.0), 2: ("driver", 5.2), 3: ("driver", 1.0)}),
               (3.0, {1: ("engine", 14.0), 2: ("driver", 5.5), 3: ("driver", 2.0)}),
               (4.0, {1: ("engine", 16.0), 2: ("driver", 6.0), 3: ("driver", 3.0)})]
    assert cpu_between(samples, 1.0, 3.5) == pytest.approx({"engine": 4.0, "driver": 2.5})


def test_process_label_names_ray_and_vllm_titles_or_the_script():
    from common import process_label

    assert process_label(["ray::MapWorker(MapBatches(vLLMEngineStageUDF))", ""]) == \
        "ray::MapWorker(MapBatches(vLLMEngineStageUDF))"
    assert process_label(["VLLM::EngineCore"]) == "VLLM::EngineCore"
    assert process_label(["/usr/bin/python", "benchmarks/bench_distill.py", "--child"]) == "bench_distill.py"
    assert process_label(["/usr/bin/raylet", "--python_worker_command=/v/bin/python", "setup_worker.py"]) == "raylet"
    assert process_label([]) == "?"


def test_summaries_name_subprocess_roots_without_their_command_lines():
    """py-spy's --subprocesses root frames carry whole command lines (the machine's paths): the
    summary keeps only the process's label. 3 samples in the worker, 1 in the driver."""
    raw = ('process 11:"/opt/venv/bin/python /opt/venv/ray/default_worker.py --x";work (w.py:1) 3\n'
           'process 12:"/opt/venv/bin/python jobs/distill.py";main (d.py:2) 1\n')
    text = summarize_collapsed(raw)
    assert "/opt/venv" not in text
    assert " 75.0   process default_worker.py" in text and " 25.0   process distill.py" in text


def test_concurrency_one_is_measured_in_pairs_turn_about(monkeypatch):
    """Pairs alternate which side goes first (b s, s b, b s …) after one untimed warm-up of each; the
    bare side takes 1 s a request and the served side 3 s (a clock each call moves), so the p50s are
    1 s and 3 s, requests/s 1 and 1/3, and the tokens add up per side."""
    import bench_serving

    clock, calls = [0.0], []
    monkeypatch.setattr(bench_serving.time, "perf_counter", lambda: clock[0])

    def side(name: str, seconds: float, tokens: int):
        def one(i: int) -> int:
            calls.append((name, i))
            clock[0] += seconds
            return tokens
        return one

    sleeps = []
    monkeypatch.setattr(bench_serving.time, "sleep", lambda s: sleeps.append((s, len(calls))))
    bare, served = bench_serving.paired(side("b", 1.0, 5), side("s", 3.0, 7), 4, settle_s=0.5)
    # an untimed pause before every timed request, none before the two warm-ups
    assert sleeps == [(0.5, k) for k in range(2, 10)]
    assert calls == [("b", 0), ("s", 0), ("b", 0), ("s", 0), ("s", 1), ("b", 1), ("b", 2), ("s", 2),
                     ("s", 3), ("b", 3)]
    assert (bare["p50_s"], bare["req_s"], bare["tokens"]) == (1.0, 1.0, 20)
    assert (served["p50_s"], served["req_s"], served["tokens"]) == (3.0, pytest.approx(1 / 3), 28)
    assert served["pair_ratios"] == [3.0] * 4 and "pair_ratios" not in bare


def test_the_pairs_row_reads_each_pair_against_its_own_bare_request():
    """The pairs row: the median of the pair ratios and its order-statistic interval, with no target of its own
    (the p50 row keeps it: 1.65 s over 1.5 s is 1.10x, missed)."""
    from bench_serving import level_rows

    pairs = [1.1] * 6 + [1.0, 1.2] * 3  # 12 pairs, sorted: three 1.0, six 1.1, three 1.2; x_(3) = 1.0, x_(10) = 1.2
    levels = {1: {"p50_s": 1.65, "req_s": 1.0, "pair_ratios": pairs}, 8: {"p50_s": 2.0, "p99_s": 2.0, "req_s": 3.0},
              32: {"p50_s": 5.0, "p99_s": 6.0, "req_s": 9.0}}
    rows = level_rows("vllm", levels, {"p50_s": 1.5}, "bare", "")
    assert [r.met for r in rows] == [False, None, None, True]
    assert rows[1].value == pytest.approx(1.1) and rows[1].target is None
    assert "median of 12 pairs" in rows[1].name and "[1.00, 1.20]" in rows[1].note
    few = {**levels, 1: {**levels[1], "pair_ratios": [1.1] * 5}}  # too few for an interval: no row
    assert len(level_rows("vllm", few, {"p50_s": 1.5}, "bare", "")) == 3


def test_median_interval_is_the_binomial_order_statistics():
    # n = 12: P(B <= 2) = 79/4096 = 0.0193 <= 0.025 < P(B <= 3) = 299/4096: [x_(3), x_(10)]
    assert median_interval([12 - i for i in range(12)]) == (3.0, 10.0)
    # n = 30: P(B <= 9) = 0.0214 <= 0.025 < P(B <= 10) = 0.0494: [x_(10), x_(21)]
    assert median_interval(list(range(1, 31))) == (10.0, 21.0)
    # n = 6: P(B = 0) = 1/64 <= 0.025: the whole range; a wider level needs more values
    assert median_interval([5, 1, 4, 2, 6, 3]) == (1.0, 6.0)
    with pytest.raises(ValueError, match="too few"):
        median_interval([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="too few"):
        median_interval([1, 2, 3, 4, 5, 6], level=0.99)
