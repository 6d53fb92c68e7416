"""What first-token accuracy scores without information about THIS input, and the lift over it.

Two controls, both measured on the same examples as the accuracy they bound:

* the constant guess: always answering the most frequent gold first token of the set. Its accuracy is that
  token's share of the gold first tokens (on 64 real SQuAD probe questions, 17%: above the plan's 12% bar);
* the shuffled latent: every example fed another example's latents (a derangement), so the prefix carries
  information about some input, never this one.

`lift` = accuracy minus the better control: a model that says the same thing to everyone has a lift <= 0,
whatever its raw accuracy. At eval, the same failure shows as one prediction for many inputs (`collapse_stats`).
Pure Python (no torch): the gate, the pipeline and analysis read these definitions and key names from here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Probe keys (logged as <stage>/probe_<key>): the raw accuracy, the two controls, the lift, and how concentrated
# the predicted first tokens are.
FIRST_ACC = "first_acc"
CONST = "first_acc_const"
SHUFFLED = "first_acc_shuffled"
LIFT = "first_acc_lift"
TOP_SHARE = "top_first_token_share"
DISTINCT = "distinct_first_tokens"
CONTROL_KEYS = (CONST, SHUFFLED, LIFT, TOP_SHARE, DISTINCT)


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
    return {CONST: const, SHUFFLED: shuffled, LIFT: lift(acc, const, shuffled),
            TOP_SHARE: top_share(predicted_first), DISTINCT: len(set(predicted_first))}


def collapse_stats(rows: list[dict]) -> dict:
    """How alike one path's eval predictions are (eval_detailed.jsonl rows of that path): the most frequent
    prediction, its count and share, and the share of repetitive ("thethethe") predictions."""
    if not rows:
        raise ValueError("no eval rows to judge collapse on")
    preds = [r.get("prediction") for r in rows]
    top, count = Counter(preds).most_common(1)[0]
    return {"n": len(rows), "top_prediction": top, "top_prediction_count": count,
            "top_prediction_share": top_share(preds),
            "repetition_rate": sum(r.get("error_mode") == "repetition" for r in rows) / len(rows)}
