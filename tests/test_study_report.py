"""sr3fast.study.stats and .report: the Wilson interval against hand-computed values, the
participant bootstrap, attention-check exclusion and the fool-rate counts."""
from __future__ import annotations

import json
import math

import pytest

from sr3fast.study.report import build_report, write_outputs
from sr3fast.study.stats import bootstrap_interval, wilson_interval
from sr3fast.study.store import Answer

# Wilson score interval, z = 1.959964 (z^2 = 3.841459), worked by hand from
#   (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n):
# 7/10:   p = 0.7, centre (0.7 + 0.192073) / 1.384146 = 0.644490,
#         half-width 1.959964 * sqrt(0.021 + 0.009604) / 1.384146 = 0.247717 -> [0.396773, 0.892207]
# 0/10:   centre 0.192073 / 1.384146 = 0.138766, half-width 1.959964 * 0.097998 / 1.384146 = 0.138766
#         -> [0, 0.277533]
# 10/10:  the mirror image of 0/10 -> [0.722467, 1]
# 50/100: centre 0.5, half-width 1.959964 * sqrt(0.0025 + 0.0000960) / 1.038415 = 0.096170
#         -> [0.403830, 0.596170]
WILSON_CASES = [
    (7, 10, 0.3968, 0.8922),
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
]


@pytest.mark.parametrize("successes, trials, low, high", WILSON_CASES)
def test_wilson_interval_matches_hand_computed_values(successes, trials, low, high):
    lo, hi = wilson_interval(successes, trials)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


def test_wilson_interval_edges():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0


def test_bootstrap_reproducible_and_contains_the_estimate():
    counts = [(3, 10), (6, 10), (8, 10), (5, 10), (7, 10), (2, 10)]
    pooled = sum(k for k, _ in counts) / sum(n for _, n in counts)        # 31/60
    first = bootstrap_interval(counts, resamples=2000, seed=7)
    assert first == bootstrap_interval(counts, resamples=2000, seed=7)
    assert first != bootstrap_interval(counts, resamples=2000, seed=8)
    assert first[0] < pooled < first[1]
    # wider than Wilson over the 60 trials: these participants disagree far more than coin flips
    wilson = wilson_interval(31, 60)
    assert first[1] - first[0] > 0 and first[0] >= 0 and first[1] <= 1
    assert (first[1] - first[0]) > 0.5 * (wilson[1] - wilson[0])


def test_bootstrap_hand_computable_cases():
    # one participant: every resample is that participant
    assert bootstrap_interval([(7, 10)], resamples=50, seed=0) == (0.7, 0.7)
    # identical participants: every resample pools to the same rate
    assert bootstrap_interval([(1, 4)] * 5, resamples=50, seed=0) == (0.25, 0.25)
    # two participants, 0/1 and 1/1: a resample pools to 0, 1/2 or 1 with chances 1/4, 1/2, 1/4,
    # so with many resamples the 2.5% and 97.5% quantiles are 0 and 1
    assert bootstrap_interval([(0, 1), (1, 1)], resamples=4000, seed=0) == (0.0, 1.0)
    # participants without answers do not count
    assert bootstrap_interval([(2, 4), (0, 0)], resamples=20, seed=0) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_interval([], resamples=20, seed=0))


def manifest():
    """One model 'm' on items i0..i9 in both variants, and 2 attention checks per variant."""
    trials = [{"id": f"{v}-{k}", "kind": "model", "model": "m", "item": f"i{k}", "variant": v}
              for v in ("with_input", "without_input") for k in range(10)]
    trials += [{"id": f"att-{v}-{k}", "kind": "attention", "model": None, "item": f"i{k}", "variant": v}
               for v in ("with_input", "without_input") for k in range(2)]
    return {"study_id": "s", "models": [{"name": "m"}], "trials": trials}


def answer(participant, trial, picked_model):
    side = "left"
    return Answer(participant, trial, side, side if picked_model else "right", picked_model, 900, None, "t")


def answers():
    """alice: 7 of 10 'with input' trials fooled, 4 of 10 'without', attention 4/4 passed.
    bob: fooled every time, attention 1/4 passed. carol: 2 model trials, no attention check."""
    given = [answer("alice", f"with_input-{k}", k < 7) for k in range(10)]
    given += [answer("alice", f"without_input-{k}", k < 4) for k in range(10)]
    given += [answer("alice", f"att-{v}-{k}", False) for v in ("with_input", "without_input") for k in range(2)]
    given += [answer("bob", f"with_input-{k}", True) for k in range(10)]
    given += [answer("bob", f"att-{v}-{k}", (v, k) != ("with_input", 0))
              for v in ("with_input", "without_input") for k in range(2)]
    given += [answer("carol", "with_input-0", True), answer("carol", "without_input-0", False)]
    return given


def rows_by_variant(report):
    return {row.variant: row for row in report.rows}


def test_attention_exclusion_and_fool_rates():
    report = build_report(manifest(), answers(), min_attention=0.8, resamples=200, seed=0)
    people = {p.id: p for p in report.participants}
    assert (people["alice"].attention_passed, people["alice"].attention_total, people["alice"].included) == (4, 4, True)
    assert (people["bob"].attention_passed, people["bob"].attention_total, people["bob"].included) == (1, 4, False)
    assert people["carol"].attention_total == 0 and not people["carol"].included
    rows = rows_by_variant(report)
    assert (rows["with_input"].fooled, rows["with_input"].trials, rows["with_input"].participants) == (7, 10, 1)
    assert (rows["without_input"].fooled, rows["without_input"].trials) == (4, 10)
    assert (rows["both"].fooled, rows["both"].trials) == (11, 20)
    assert rows["with_input"].fool_rate == 0.7
    assert tuple(round(v, 4) for v in rows["with_input"].wilson) == (0.3968, 0.8922)
    assert rows["with_input"].bootstrap == (0.7, 0.7)                   # one participant kept


def test_lower_threshold_keeps_more_participants():
    report = build_report(manifest(), answers(), min_attention=0.25, resamples=200, seed=0)
    assert {p.id for p in report.participants if p.included} == {"alice", "bob"}
    rows = rows_by_variant(report)
    assert (rows["with_input"].fooled, rows["with_input"].trials, rows["with_input"].participants) == (17, 20, 2)
    everyone = build_report(manifest(), answers(), min_attention=0.0, resamples=200, seed=0)
    assert all(p.included for p in everyone.participants)
    assert rows_by_variant(everyone)["with_input"].trials == 21
    with pytest.raises(ValueError, match="min-attention"):
        build_report(manifest(), answers(), min_attention=1.5)


def test_table_json_and_chart(tmp_path):
    report = build_report(manifest(), answers(), min_attention=0.8, resamples=200, seed=3)
    table = report.table()
    assert "Wilson score over trials" in table and "bootstrap over participants" in table
    assert "200 resamples, seed 3" in table
    assert "--min-attention 0.8" in table
    assert "no: attention 1/4 below 80%" in table
    assert "7/10" in table and "70.0%" in table and "[39.7%, 89.2%]" in table
    written = write_outputs(report, json_path=tmp_path / "r.json", png_path=tmp_path / "r.png")
    assert written == [tmp_path / "r.json", tmp_path / "r.png"]
    data = json.loads((tmp_path / "r.json").read_text())
    row = next(r for r in data["rows"] if r["variant"] == "with_input")
    assert (row["fooled"], row["trials"], row["fool_rate"]) == (7, 10, 0.7)
    assert data["min_attention"] == 0.8
    assert [p["id"] for p in data["participants"] if p["included"]] == ["alice"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]       # no temporary files
