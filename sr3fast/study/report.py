"""`sr3fast study report`: fool rates per model and task variant, with both kinds of interval.

The fool rate of a model is the fraction of its trials in which the participant picked the
model's image over the ground truth. Participants are first screened by their attention checks
(the ground truth against a heavily blurred picture): those who picked the ground truth in fewer
than `min_attention` of them are left out, and so are those who answered none (nothing shows
they were attentive), unless `min_attention` is 0.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .manifest import VARIANTS
from .stats import bootstrap_interval, wilson_interval

BOTH = "both"
LABELS = {"with_input": "with input", "without_input": "without input", BOTH: "both variants"}
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Participant:
    """One participant's answers and attention checks, and whether the report counts them."""
    id: str
    answered: int
    attention_passed: int
    attention_total: int
    included: bool
    reason: str                     # why not included ("" when included)

    @property
    def attention_rate(self) -> float | None:
        return self.attention_passed / self.attention_total if self.attention_total else None


@dataclass(frozen=True)
class Row:
    """The fool rate of one model in one variant (or both), over the included participants."""
    model: str
    variant: str
    fooled: int
    trials: int
    participants: int
    wilson: tuple[float, float]
    bootstrap: tuple[float, float]

    @property
    def fool_rate(self) -> float:
        return self.fooled / self.trials if self.trials else math.nan


def screen(manifest: dict, answers: Sequence, min_attention: float) -> list[Participant]:
    """Every participant who answered, with their attention-check tally and whether they are
    included (attention pass rate at least `min_attention`; see this module's docstring)."""
    if not 0 <= min_attention <= 1:
        raise ValueError(f"--min-attention must be between 0 and 1, got {min_attention}")
    kinds = {trial["id"]: trial["kind"] for trial in manifest["trials"]}
    tally: dict[str, list[int]] = {}
    for answer in answers:
        counts = tally.setdefault(answer.participant, [0, 0, 0])
        counts[0] += 1
        if kinds.get(answer.trial) == "attention":
            counts[1] += not answer.picked_model
            counts[2] += 1
    has_checks = "attention" in kinds.values()
    participants = []
    for pid, (answered, passed, total) in tally.items():
        if min_attention == 0 or not has_checks:
            included, reason = True, ""
        elif total == 0:
            included, reason = False, "no attention checks answered"
        elif passed / total < min_attention:
            included, reason = False, f"attention {passed}/{total} below {min_attention:.0%}"
        else:
            included, reason = True, ""
        participants.append(Participant(pid, answered, passed, total, included, reason))
    return sorted(participants, key=lambda p: p.id)


def fool_rates(manifest: dict, answers: Sequence, participants: Sequence[Participant],
               resamples: int = 2000, seed: int = 0) -> list[Row]:
    """One Row per model and variant, and per model over both variants, counting the model trials
    of the included participants. The bootstrap uses `resamples` and `seed` for every row."""
    included = {p.id for p in participants if p.included}
    trials = {trial["id"]: trial for trial in manifest["trials"] if trial["kind"] == "model"}
    per_cell: dict[tuple[str, str], dict[str, list[int]]] = {}
    for answer in answers:
        trial = trials.get(answer.trial)
        if trial is None or answer.participant not in included:
            continue
        for variant in (trial["variant"], BOTH):
            counts = per_cell.setdefault((trial["model"], variant), {}).setdefault(answer.participant, [0, 0])
            counts[0] += answer.picked_model
            counts[1] += 1
    rows = []
    for model in (entry["name"] for entry in manifest["models"]):
        for variant in (*VARIANTS, BOTH):
            counts = per_cell.get((model, variant), {})
            fooled = sum(k for k, _ in counts.values())
            total = sum(n for _, n in counts.values())
            rows.append(Row(model, variant, fooled, total, len(counts), wilson_interval(fooled, total),
                            bootstrap_interval(list(map(tuple, counts.values())), resamples, seed)))
    return rows


@dataclass
class StudyReport:
    study_id: str
    min_attention: float
    resamples: int
    seed: int
    participants: list[Participant]
    rows: list[Row]

    def to_dict(self) -> dict:
        def number(value):
            return None if isinstance(value, float) and math.isnan(value) else value

        return {
            "study_id": self.study_id,
            "fool_rate": "fraction of model trials in which the model's image was picked over the ground truth",
            "confidence": CONFIDENCE,
            "intervals": {"wilson": "Wilson score interval over trials (answers taken as independent)",
                          "bootstrap": f"participant-level percentile bootstrap, {self.resamples} resamples, "
                                       f"seed {self.seed}"},
            "min_attention": self.min_attention,
            "rows": [{"model": r.model, "variant": r.variant, "fooled": r.fooled, "trials": r.trials,
                      "participants": r.participants, "fool_rate": number(r.fool_rate),
                      "wilson": [number(v) for v in r.wilson], "bootstrap": [number(v) for v in r.bootstrap]}
                     for r in self.rows],
            "participants": [{**asdict(p), "attention_rate": p.attention_rate} for p in self.participants],
        }

    def table(self) -> str:
        """The report as text: the fool-rate table, then the participants' attention checks."""
        def percent(value: float) -> str:
            return "–" if math.isnan(value) else f"{value:.1%}"

        def interval(pair) -> str:
            return "–" if math.isnan(pair[0]) else f"[{pair[0]:.1%}, {pair[1]:.1%}]"

        name_width = max(5, *(len(r.model) for r in self.rows)) if self.rows else 5
        head = (f"{'model':{name_width}s}  {'variant':13s}  {'fooled/trials':>13s}  {'fool rate':>9s}  "
                f"{'Wilson 95% CI (trials)':>22s}  {'bootstrap 95% CI (participants)':>31s}  people")
        lines = ["fool rate: how often the model's image was picked over the ground truth (50%: as often as not)",
                 f"95% CIs: Wilson score over trials (answers as independent); percentile bootstrap over "
                 f"participants ({self.resamples} resamples, seed {self.seed})", head]
        for r in self.rows:
            lines.append(f"{r.model:{name_width}s}  {LABELS[r.variant]:13s}  {f'{r.fooled}/{r.trials}':>13s}  "
                         f"{percent(r.fool_rate):>9s}  {interval(r.wilson):>22s}  {interval(r.bootstrap):>31s}  "
                         f"{r.participants:>6d}")
        kept = sum(p.included for p in self.participants)
        lines += ["", f"attention checks (ground truth picked over a blurred image): {kept} of "
                      f"{len(self.participants)} participants kept, excluded below {self.min_attention:.0%} "
                      f"(--min-attention {self.min_attention:g})"]
        id_width = max(11, *(len(p.id) for p in self.participants)) if self.participants else 11
        lines.append(f"{'participant':{id_width}s}  {'answers':>7s}  {'attention':>14s}  counted")
        for p in self.participants:
            rate = f"{p.attention_passed}/{p.attention_total} {percent(p.attention_rate)}" \
                if p.attention_total else "none"
            lines.append(f"{p.id:{id_width}s}  {p.answered:>7d}  {rate:>14s}  "
                         f"{'yes' if p.included else 'no: ' + p.reason}")
        return "\n".join(lines)


def build_report(manifest: dict, answers: Sequence, min_attention: float = 0.8, resamples: int = 2000,
                 seed: int = 0) -> StudyReport:
    """The whole report of a study from its manifest and stored answers."""
    participants = screen(manifest, answers, min_attention)
    rows = fool_rates(manifest, answers, participants, resamples, seed)
    return StudyReport(manifest["study_id"], min_attention, resamples, seed, participants, rows)


def report_json(report: StudyReport) -> str:
    return json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"


def draw_chart(report: StudyReport, path: str | os.PathLike) -> None:
    """A bar chart (PNG) of the fool rates: per model, one bar per variant, with the participant
    bootstrap's 95% interval as error bars and the 50% line. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in report.rows))
    variants = list(VARIANTS)
    width = 0.8 / len(variants)
    figure, axes = plt.subplots(figsize=(max(4.5, 1.8 * len(models) + 2), 3.6))
    for v, variant in enumerate(variants):
        rows = [next(r for r in report.rows if r.model == m and r.variant == variant) for m in models]
        rates = [0.0 if math.isnan(r.fool_rate) else r.fool_rate for r in rows]
        below = [0.0 if math.isnan(r.bootstrap[0]) else max(0.0, r.fool_rate - r.bootstrap[0]) for r in rows]
        above = [0.0 if math.isnan(r.bootstrap[1]) else max(0.0, r.bootstrap[1] - r.fool_rate) for r in rows]
        positions = [m + (v - (len(variants) - 1) / 2) * width for m in range(len(models))]
        axes.bar(positions, rates, width * 0.9, yerr=[below, above], capsize=4, label=LABELS[variant])
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(models)), models)
    axes.set_ylim(0, 1)
    axes.set_ylabel("fool rate")
    axes.set_title(f"fool rate, 95% CI: participant bootstrap ({report.resamples} resamples)", fontsize=10)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


def write_outputs(report: StudyReport, json_path: str | os.PathLike | None = None,
                  png_path: str | os.PathLike | None = None) -> list[Path]:
    """Write the JSON report and/or the chart, all or nothing: each goes to a temporary file in its
    folder, and both are renamed into place only once both are complete."""
    from ..atomic import atomic_path

    writers = []
    if json_path is not None:
        text = report_json(report)
        writers.append((Path(json_path), lambda tmp: tmp.write_text(text, encoding="utf-8")))
    if png_path is not None:
        writers.append((Path(png_path), lambda tmp: draw_chart(report, tmp)))
    with ExitStack() as stack:
        temporaries = [stack.enter_context(atomic_path(path)) for path, _ in writers]
        for (_, write), tmp in zip(writers, temporaries):
            write(tmp)
    return [path for path, _ in writers]
