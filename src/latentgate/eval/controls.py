"""What first-token accuracy scores without information about THIS input, and the lift over it.

Two controls, both measured on the same examples as the accuracy they bound:

* the constant guess: always answering the most frequent gold first token of the set. Its accuracy is that
  token's share of the gold first tokens (on 64 real SQuAD probe questions, 17%: above the plan's 12% bar);
* the shuffled latent: every example fed another example's latents (a derangement), so the prefix carries
  information about some input, never this one.

`lift` = accuracy minus the better control: a model that says the same thing to everyone has a lift <= 0,
whatever its raw accuracy. At eval, the same failure shows as one prediction for many inputs (`collapse_stats`).
Pure Python (no torch): the gate, the pipeline and analysis read these definitions from here, and the keys they
are recorded under from `latentgate.schema` (Probe: logged as <stage>/probe_<key>; EvalKey).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from latentgate.eval.scoring import normalize_answer
from latentgate.eval_row import EvalRow
from latentgate.schema import Probe


def top_share(values: Iterable) -> float:
    """Share of the most frequent value (0.0 for none): of gold first tokens it is the constant guess's
    accuracy; of predictions, how much one answer dominates."""
    counts = Counter(values)
    n = sum(counts.values())
    return counts.most_common(1)[0][1] / n if n else 0.0


def constant_guess_accuracy(gold_first: Iterable) -> float:
    """Accuracy of always guessing the most frequent gold first token of this very set."""
    return top_share(gold_first)


def lift(acc: float, const: float, shuffled: float) -> float:
    """Accuracy above the better of the two controls."""
    return acc - max(const, shuffled)


def control_stats(gold_first: list, predicted_first: list, shuffled_hits: int) -> dict:
    """The probe's control keys from its gold and predicted first tokens and the shuffled-latent hit count."""
    n = len(gold_first)
    if n == 0 or len(predicted_first) != n:
        raise ValueError(f"need as many predicted as gold first tokens (> 0), got {len(predicted_first)} and {n}")
    acc = sum(p == g for p, g in zip(predicted_first, gold_first, strict=True)) / n
    const = constant_guess_accuracy(gold_first)
    shuffled = shuffled_hits / n
    return {Probe.CONST: const, Probe.SHUFFLED: shuffled, Probe.LIFT: lift(acc, const, shuffled),
            Probe.TOP_SHARE: top_share(predicted_first), Probe.DISTINCT: len(set(predicted_first))}


@dataclass(frozen=True)
class Collapse:
    """How alike one path's eval predictions are, on SQuAD-normalised answers (so '2018-2023)' and '2018-2023' are
    one answer): the most frequent answer and its share, the share of the `top_k` most frequent answers (a few
    answers sharing the inputs), the share of empty answers, and of repetitive ("thethethe") ones."""

    n: int
    top_prediction: str
    top_prediction_count: int
    top_prediction_share: float
    top_k: int
    top_k_share: float
    empty_share: float
    repetition_rate: float

    def as_text(self) -> str:
        return (f"top answer {self.top_prediction!r} for {self.top_prediction_count} of {self.n} "
                f"({self.top_prediction_share:.0%}), top {self.top_k} for {self.top_k_share:.0%}, "
                f"{self.empty_share:.0%} empty, {self.repetition_rate:.0%} repetitive")


def collapse_stats(predictions: list[str], repetitive: list[bool], top_k: int = 1) -> Collapse:
    """The one computation of collapse (the gate, the pipeline, the report and the eval's metrics.json read it)."""
    if not predictions or len(predictions) != len(repetitive):
        raise ValueError(f"need predictions and as many repetition flags (> 0), got {len(predictions)} and "
                         f"{len(repetitive)}")
    answers = [normalize_answer(p or "") for p in predictions]
    counts = Counter(answers).most_common()
    n = len(answers)
    top, count = counts[0]
    return Collapse(n=n, top_prediction=top, top_prediction_count=count, top_prediction_share=count / n,
                    top_k=top_k, top_k_share=sum(c for _, c in counts[:top_k]) / n,
                    empty_share=sum(a == "" for a in answers) / n, repetition_rate=sum(repetitive) / n)


def row_collapse(rows: list[EvalRow], top_k: int = 1) -> Collapse:
    """`collapse_stats` of one path's eval_detailed.jsonl rows."""
    if not rows:
        raise ValueError("no eval rows to judge collapse on")
    return collapse_stats([r.prediction for r in rows], [r.error_mode == "repetition" for r in rows], top_k)
