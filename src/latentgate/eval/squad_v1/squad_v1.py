"""SQuAD v1.1 EM / F1 as a Hugging Face `evaluate` metric that loads offline, by path.

    import evaluate
    metric = evaluate.load("/abs/path/to/latentgate/eval/squad_v1")   # or .../squad_v1/squad_v1.py
    metric.compute(
        predictions=[{"id": "q1", "prediction_text": "Denver Broncos"}],
        references=[{"id": "q1", "answers": {"text": ["Denver Broncos"], "answer_start": [177]}}],
    )  # -> {"exact_match": 100.0, "f1": 100.0}

Same inputs and outputs (percentages, 0-100) as the Hub's "squad" metric. `evaluate` copies this file
into its module cache, so it must stay self-contained: it uses `latentgate.eval.scoring` when that
package is importable and otherwise the bundled copies below (tests check that both agree).
Note that an EvaluationModule with nothing added has len() 0, so `bool(metric)` is False: test `is None`.
"""

import importlib
import re
import string
from collections import Counter

import datasets
import evaluate

_CITATION = """\
@inproceedings{Rajpurkar2016SQuAD10,
  title={SQuAD: 100, 000+ Questions for Machine Comprehension of Text},
  author={Pranav Rajpurkar and Jian Zhang and Konstantin Lopyrev and Percy Liang},
  booktitle={EMNLP},
  year={2016}
}
"""

_DESCRIPTION = """\
Official SQuAD v1.1 exact match and token F1, each the max over all reference answers, averaged over
the references (a reference id with no prediction scores 0), reported as percentages.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": list[str], "answer_start": list[int]}}.
Returns:
    {"exact_match": float in [0, 100], "f1": float in [0, 100]}
"""

# --- bundled copy of latentgate.eval.scoring (official SQuAD v1.1 semantics) ------------------------------

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _bundled_normalize_answer(s):
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _bundled_exact_match(prediction, references):
    norm = _bundled_normalize_answer(prediction)
    return max(1.0 if norm == _bundled_normalize_answer(ref) else 0.0 for ref in references)


def _bundled_f1_one(prediction, ground_truth):
    prediction_tokens = _bundled_normalize_answer(prediction).split()
    ground_truth_tokens = _bundled_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:  # also empty-vs-empty: v1.1 gives 0
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _bundled_f1(prediction, references):
    return max(_bundled_f1_one(prediction, ref) for ref in references)


try:  # a plain `import latentgate...` line would make evaluate demand a pip package named latentgate
    _scoring = importlib.import_module("latentgate.eval.scoring")
    exact_match, f1 = _scoring.exact_match, _scoring.f1
    IMPLEMENTATION = "latentgate.eval.scoring"
except ImportError:
    exact_match, f1 = _bundled_exact_match, _bundled_f1
    IMPLEMENTATION = "bundled"

_List = getattr(datasets, "List", None) or datasets.Sequence


def compute_score(predictions, references):
    """predictions: {id: text}; references: list of (id, [answer texts]). Returns percentages."""
    if not references:
        raise ValueError("squad_v1: no references to score")
    em_total = f1_total = 0.0
    for qid, answers in references:
        if qid not in predictions:  # like the official script: unanswered questions score 0
            continue
        if not answers:
            raise ValueError(f"squad_v1: reference {qid!r} has no answer texts")
        em_total += exact_match(predictions[qid], answers)
        f1_total += f1(predictions[qid], answers)
    total = len(references)
    return {"exact_match": 100.0 * em_total / total, "f1": 100.0 * f1_total / total}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadV1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": {
                            "text": _List(datasets.Value("string")),
                            "answer_start": _List(datasets.Value("int32")),
                        },
                    },
                }
            ),
            codebase_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references):
        pred_dict = {p["id"]: p["prediction_text"] for p in predictions}
        refs = [(r["id"], list(r["answers"]["text"])) for r in references]
        return compute_score(pred_dict, refs)
