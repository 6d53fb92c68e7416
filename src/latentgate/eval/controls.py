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

from latentgate.schema import EvalKey, Probe


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


def collapse_stats(rows: list[dict]) -> dict:
    """How alike one path's eval predictions are (the eval_detailed.jsonl rows of that path): the most frequent
    prediction, its count and share, and the share of repetitive ("thethethe") predictions."""
    if not rows:
        raise ValueError("no eval rows to judge collapse on")
    preds = [r.get("prediction") for r in rows]
    top, count = Counter(preds).most_common(1)[0]
    return {"n": len(rows), "top_prediction": top, "top_prediction_count": count,
            EvalKey.TOP_PREDICTION_SHARE: top_share(preds),
            EvalKey.REPETITION_RATE: sum(r.get("error_mode") == "repetition" for r in rows) / len(rows)}
