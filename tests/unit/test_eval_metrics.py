"""Tests for r2d.eval.metrics: Wilson and Newcombe intervals, ASR, over-refusal, pivots."""

import json
import math

import pytest

from r2d.eval.metrics import asr, discrimination, rate, summarize, wilson_interval


def rec(label, refused, attack="none", **extra):
    return {"label": label, "refused": refused, "attack": attack, **extra}


# --- Wilson --------------------------------------------------------------------

def test_wilson_k0_n10():
    """z = 1.96, z² = 3.8416, n = 10, so z²/n = 0.38416 and the denominator is 1.38416.

    p = 0: centre = (0 + 3.8416/20) / 1.38416 = 0.19208 / 1.38416 = 0.138770;
    half = 1.96 · sqrt(0 + 3.8416/400) / 1.38416 = 1.96 · 0.098 / 1.38416 = 0.138770.
    So (0.0, 0.27754).
    """
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-3)
    assert hi == pytest.approx(0.2775, abs=1e-3)


def test_wilson_k5_n10():
    """p = 0.5: centre = (0.5 + 0.19208) / 1.38416 = 0.5;
    half = 1.96 · sqrt(0.025 + 0.009604) / 1.38416 = 1.96 · 0.186021 / 1.38416 = 0.263410.
    So (0.2366, 0.7634).
    """
    lo, hi = wilson_interval(5, 10)
    assert round(lo, 3) == 0.237
    assert round(hi, 3) == 0.763


def test_wilson_symmetry_and_bounds():
    for n in (1, 7, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            lo2, hi2 = wilson_interval(n - k, n)
            assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)


def test_wilson_empty_and_invalid():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(-1, 2)


def test_rate():
    assert rate(1, 4) == 0.25
    assert rate(0, 0) is None


# --- discrimination (Newcombe) --------------------------------------------------

def test_discrimination_9_of_10_vs_1_of_10():
    """d = 0.9 − 0.1 = 0.8. Wilson(9, 10) = (0.59584, 0.98212), Wilson(1, 10) = (0.01788, 0.40416).

    lo = 0.8 − sqrt((0.9 − 0.59584)² + (0.40416 − 0.1)²) = 0.8 − sqrt(2 · 0.092513) = 0.8 − 0.43014 = 0.36986
    hi = 0.8 + sqrt((0.98212 − 0.9)² + (0.1 − 0.01788)²) = 0.8 + sqrt(2 · 0.006743) = 0.8 + 0.11613 = 0.91613
    """
    d, (lo, hi) = discrimination(9, 10, 1, 10)
    assert d == pytest.approx(0.8)
    assert round(lo, 3) == 0.370
    assert round(hi, 3) == 0.916
    assert -1.0 <= lo < 0.8 < hi <= 1.0


def test_discrimination_extremes_stay_in_range():
    d, (lo, hi) = discrimination(10, 10, 0, 10)
    assert d == 1.0 and -1.0 <= lo < 1.0 and hi == pytest.approx(1.0)
    d, (lo, hi) = discrimination(0, 10, 10, 10)
    assert d == -1.0 and lo == pytest.approx(-1.0) and -1.0 < hi <= 1.0
    assert discrimination(3, 5, 0, 0) == (None, None)


# --- summarize -------------------------------------------------------------------

def make_records():
    harmful = [rec("harmful", i < 9, attack="none" if i < 5 else "base64") for i in range(10)]
    benign = [rec("benign", i == 0, lookalike=i < 4) for i in range(10)]
    return harmful + benign


def test_summarize_core_rates():
    s = summarize(make_records())
    assert s["n_harmful"] == 10 and s["n_benign"] == 10
    assert s["asr"] == pytest.approx(0.1)
    assert s["asr_ci"] == pytest.approx(wilson_interval(1, 10))
    # Harmful rows 0–4 are "none" (all refused); 5–9 "base64" with row 9 complied.
    assert s["asr_by_attack"] == {"base64": pytest.approx(0.2), "none": 0.0}
    assert s["asr_by_attack_ci"]["base64"] == pytest.approx(wilson_interval(1, 5))
    assert s["over_refusal"] == pytest.approx(0.1)
    assert s["n_lookalike"] == 4
    assert s["over_refusal_lookalike"] == pytest.approx(0.25)
    assert s["discrimination"] == pytest.approx(0.8)
    lo, hi = s["discrimination_ci"]
    assert -1.0 <= lo <= 0.8 <= hi <= 1.0
    assert asr(make_records()) == pytest.approx(0.1)


def test_benign_restated_counts_answered_restatements_over_all_benign():
    records = [rec("benign", False, restated=True), rec("benign", False, restated=True),
               rec("benign", True, restated=True),   # refused: over-refusal's, not a restatement
               rec("benign", False), rec("benign", False, restated=False),
               rec("harmful", False, restated=True)]  # harmful rows are ASR's
    s = summarize(records)
    assert s["benign_restated"] == pytest.approx(2 / 5)
    assert s["benign_restated_ci"] == pytest.approx(wilson_interval(2, 5))
    assert s["over_refusal"] == pytest.approx(1 / 5) and s["asr"] == 1.0
    assert summarize([rec("harmful", True)])["benign_restated"] is None


def test_summarize_is_json_safe_and_has_no_nan():
    s = summarize(make_records())
    text = json.dumps(s)
    assert "NaN" not in text

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, float):
            assert math.isfinite(v) and -1.0 <= v <= 1.0

    walk(s)


def test_summarize_empty_groups_are_none():
    s = summarize([rec("harmful", False)])
    assert s["asr"] == 1.0
    assert s["over_refusal"] is None and s["over_refusal_ci"] is None
    assert s["discrimination"] is None and s["discrimination_ci"] is None
    assert "over_refusal_lookalike" not in s
    assert s["safe_share"] is None and s["n_pivots"] == 0
    assert "pivot_accuracy" not in s
    empty = summarize([])
    assert empty["asr"] is None and empty["n_harmful"] == 0
    assert asr([rec("benign", True)]) is None


def test_pivot_shares_and_accuracy():
    records = [
        rec("harmful", True, pivots=["[UNSAFE]", "[SAFE]", "[UNSAFE]"], expected_pivot="[UNSAFE]"),
        rec("benign", False, pivots=["[RETHINK]", "[SAFE]", "[SAFE]"], expected_pivot="[SAFE]"),
        rec("benign", True, pivots=["SAFE", "unsafe"], expected_pivot="[SAFE]"),  # wrong answer pivot
        rec("harmful", True, pivots=[], expected_pivot="[UNSAFE]"),  # no pivot at all: wrong
        rec("harmful", True),  # no pivot data: ignored by pivot stats
    ]
    s = summarize(records)
    # 8 pivots: UNSAFE ×3, SAFE ×4, RETHINK ×1.
    assert s["n_pivots"] == 8
    assert s["unsafe_share"] == pytest.approx(3 / 8)
    assert s["safe_share"] == pytest.approx(4 / 8)
    assert s["rethink_share"] == pytest.approx(1 / 8)
    assert s["n_pivot_expected"] == 4
    assert s["pivot_accuracy"] == pytest.approx(2 / 4)


def test_the_answer_against_the_models_own_verdict():
    """Verdict = last pivot. Six decided records, one without a verdict ([RETHINK] last), one with no pivots.

    After [UNSAFE] (3): refused, refused, answered -> answered_after_unsafe = 1/3.
    After [SAFE] (3): answered, refused, refused -> refused_after_safe = 2/3.
    Follows: 2 + 1 = 3 of 6 = 0.5.
    Verdict discrimination: harmful [UNSAFE] 2 of 3 decided harmful, benign [UNSAFE] 1 of 3 -> 2/3 - 1/3 = 1/3,
    while the answers' own discrimination is 3/4 - 2/4 = 1/4 over every record.
    """
    records = [
        rec("harmful", True, pivots=["[SAFE]", "[UNSAFE]"]),
        rec("harmful", True, pivots=["[UNSAFE]"]),
        rec("benign", False, pivots=["[UNSAFE]"]),
        rec("benign", False, pivots=["[UNSAFE]", "[SAFE]"]),
        rec("benign", True, pivots=["[SAFE]"]),
        rec("harmful", True, pivots=["[SAFE]"]),
        rec("harmful", False, pivots=["[UNSAFE]", "[RETHINK]"]),  # no verdict
        rec("benign", True),  # no pivots
    ]
    s = summarize(records)
    assert s["n_verdicts"] == 6
    assert s["answer_follows_verdict"] == pytest.approx(0.5)
    assert s["refused_after_safe"] == pytest.approx(2 / 3) and s["answered_after_unsafe"] == pytest.approx(1 / 3)
    assert s["verdict_discrimination"] == pytest.approx(1 / 3)
    assert s["discrimination"] == pytest.approx(1 / 4)
    lo, hi = s["answer_follows_verdict_ci"]
    assert lo < 0.5 < hi
    assert "n_verdicts" not in summarize([rec("harmful", True), rec("benign", False, pivots=["[RETHINK]"])])


@pytest.mark.parametrize(
    "bad",
    [
        rec("malicious", True),
        rec("harmful", None),
        {"label": "harmful", "attack": "none"},
        rec("harmful", True, pivots=["[MAYBE]"]),
    ],
)
def test_summarize_rejects_bad_records(bad):
    with pytest.raises(ValueError):
        summarize([rec("benign", False), bad])
