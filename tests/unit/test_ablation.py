"""Ablation aggregation: means, sds and the paired CPO effect, checked by hand."""

from pathlib import Path

import pytest

from r2d.eval.ablation import (aggregate, load_variants, markdown_table, mean_sd, paired_effect, portable_reports,
                               verdict)

ROOT = Path(__file__).resolve().parents[2]


def test_mean_sd_by_hand():
    """mean(0.2, 0.4, 0.6) = 0.4; sd = sqrt(((-.2)^2 + 0 + .2^2) / 2) = sqrt(0.04) = 0.2."""
    mean, sd = mean_sd([0.2, 0.4, 0.6, None])
    assert mean == pytest.approx(0.4) and sd == pytest.approx(0.2)
    assert mean_sd([]) == (None, None)
    assert mean_sd([0.5]) == (0.5, 0.0)


def test_paired_effect_by_hand():
    """Diffs 0.1, 0.2, 0.3 → mean 0.2, sd 0.1; half-width = t(2) 4.303 × 0.1 / sqrt(3) = 0.2484."""
    sft = [{"discrimination": 0.1}, {"discrimination": 0.2}, {"discrimination": 0.3}]
    cpo = [{"discrimination": 0.2}, {"discrimination": 0.4}, {"discrimination": 0.6}]
    eff = paired_effect(sft, cpo, "discrimination")
    assert eff["mean"] == pytest.approx(0.2)
    assert eff["ci"][0] == pytest.approx(0.2 - 0.24844, abs=1e-4)
    assert eff["ci"][1] == pytest.approx(0.2 + 0.24844, abs=1e-4)


def test_aggregate_table_and_verdict():
    runs = {
        "base": [{"asr": 0.9, "over_refusal": 0.0, "discrimination": 0.05, "asr_by_attack": {"none": 0.9}}],
        "SFT only": [{"asr": 0.3, "over_refusal": 0.5, "discrimination": 0.2, "asr_by_attack": {"none": 0.3}}] * 3,
        "SFT + CPO": [{"asr": 0.1, "over_refusal": 0.2, "discrimination": 0.7, "asr_by_attack": {"none": 0.1}}] * 3,
    }
    table = aggregate(runs)
    assert table["SFT + CPO"]["discrimination"] == (pytest.approx(0.7), 0.0)
    assert table["base"]["asr_by_attack"]["none"] == (0.9, 0.0)
    text = markdown_table(table)
    assert "| SFT + CPO | 3 | 0.10 ± 0.00 |" in text
    said = verdict(runs)
    assert "- SFT + CPO − SFT only: discrimination: +0.500" in said
    assert "asr: -0.200 (95% t-interval over 3 seeds [-0.200, -0.200]) → helps" in said
    assert "reference" not in said  # no runs of the reference variant, no line for it
    # diffs 0.1, 0.2, 0.0 → mean 0.1, sd 0.1, half-width 0.2484: an interval across zero
    runs["SFT + CPO (reference variant)"] = [{"asr": 0.3, "over_refusal": 0.6, "discrimination": d}
                                             for d in (0.3, 0.4, 0.2)]
    ref = verdict(runs).splitlines()[1]
    assert ref.startswith("- SFT + CPO (reference variant) − SFT only: discrimination: +0.100 (95% t-interval "
                          "over 3 seeds [-0.148, +0.348]) → helps, not distinguishable from noise")
    assert ref.endswith("over_refusal: +0.100 (95% t-interval over 3 seeds [+0.100, +0.100]) → hurts")


def test_tradeoff_plot_writes_a_png(tmp_path):
    from r2d.eval.ablation import tradeoff_plot

    runs = {"base": [{"asr": 0.9, "over_refusal": 0.0}], "SFT only": [{"asr": 0.3, "over_refusal": None}]}
    tradeoff_plot(runs, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tradeoff_plot_shades_each_side_s_own_target_corner(tmp_path, monkeypatch):
    """In distribution the corner is ASR <= 0.20, over-refusal <= 0.25; out of distribution ASR <= 0.30."""
    from matplotlib.axes import Axes

    from r2d.eval.ablation import tradeoff_plot

    shaded = []
    fill = Axes.fill_between
    monkeypatch.setattr(Axes, "fill_between",
                        lambda ax, x, y1, y2=0, **kw: shaded.append((list(x), y1, y2)) or fill(ax, x, y1, y2, **kw))
    runs = {"base": [{"asr": 0.9, "over_refusal": 0.0, "ood": {"asr": 1.0, "over_refusal": 0.0}}]}
    tradeoff_plot(runs, tmp_path / "id.png")
    tradeoff_plot(runs, tmp_path / "ood.png", ood=True)
    tradeoff_plot(runs, tmp_path / "own.png", targets=(0.1, 0.4))
    assert shaded == [([0, 0.25], 0, 0.20), ([0, 0.25], 0, 0.30), ([0, 0.4], 0, 0.1)]


def test_portable_reports_relative_under_root_only(tmp_path):
    """Reports under the root become relative; others, and rows without one, stay as they were."""
    inside = tmp_path / ".r2d/eval/run-1/report.md"
    runs = {"base": [{"asr": 0.9, "report": str(inside)}],
            "SFT only": [{"asr": 0.3, "report": "/elsewhere/report.md"}, {"asr": 0.2}]}
    out = portable_reports(runs, tmp_path)
    assert out["base"][0] == {"asr": 0.9, "report": ".r2d/eval/run-1/report.md"}
    assert out["SFT only"] == [{"asr": 0.3, "report": "/elsewhere/report.md"}, {"asr": 0.2}]
    assert runs["base"][0]["report"] == str(inside)  # the saved runs are not changed


def test_variants_file_base_goes_before_each_variant(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("base: [train.lora.enabled=true]\nvariants:\n  a: []\n  b: [train.lora.r=64]\n")
    assert load_variants(str(path)) == ({"a": ["train.lora.enabled=true"],
                                         "b": ["train.lora.enabled=true", "train.lora.r=64"]}, "a")
    path.write_text("base: train.lora.enabled=true\nvariants: {a: []}\n")
    with pytest.raises(ValueError, match="expected 'base: \\[key=value, ...\\]'"):
        load_variants(str(path))


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "variants").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_variants_file_applies_to_the_tiny_config(path):
    from r2d.config import load_config
    from r2d.data.splits import prompt_sets

    variants, baseline = load_variants(str(path))
    assert baseline in variants and len(variants) >= 2
    for name, overrides in variants.items():
        cfg = load_config(ROOT / "jobs/configs/tiny.yaml", overrides)
        train, _, _ = prompt_sets(cfg)  # a data mix that names no held-out category fails here
        assert train, name
