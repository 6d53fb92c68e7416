"""The hero readiness checklist as data: `registry/hero.yaml`, loaded and validated here.

Every criterion names a kind of query over recorded evidence (see `KINDS`), its parameters, a comparison and a
threshold. Code that needs a threshold (the gate, the pipeline's decision tree, the analysis report, the monitor)
reads it from the file through this module, never from a constant: `Checklist.threshold(name)`,
`Checklist.criterion(name).compare(value)`, `Criterion.with_threshold(t)` (the same comparison at a threshold a user
overrides, e.g. the monitor's --regression-threshold) and `Checklist.collapse_rule()` (what counts as mode collapse).
Where no registry version exists (the analysis report on local data), the same criteria are judged by
`Criterion.compare` on locally computed observations: there is no second list of thresholds anywhere.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from latentgate.errors import ConfigError
from latentgate.safety import load_yaml, refuse_loop
from latentgate.schema import Calibration, Registry

DEFAULT_PATH = Path(__file__).with_name("hero.yaml")  # package data; registry/hero.yaml in a checkout links here

OPS = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}

# kind -> (required params, optional params, whether a numeric threshold is required)
KINDS: dict[str, tuple[set, set, bool]] = {
    "metric_peak": ({"run", "metric"}, {"show"}, True),
    "metric_final": ({"run", "metric"}, {"show"}, True),
    "metric_final_drop": ({"run", "metric"}, set(), True),
    "metric_max": ({"runs", "metric"}, set(), True),
    "nonfinite_steps": ({"runs", "metrics"}, set(), True),
    "eval_example_max": ({"path", "field"}, set(), True),
    "eval_metric": ({"path", "key"}, set(), True),
    "eval_share": ({"path", "field", "equals"}, set(), True),
    "eval_collapse": ({"path", "max_top_prediction_share"}, {"top_k", "max_top_k_share", "max_empty_share"}, True),
    "eval_count": ({"path"}, set(), True),
    "latent_margin": ({"path", "key", "controls"}, set(), True),
    "metric_extrapolated": ({"run", "metric"}, {"floor", "ceiling"}, True),
    "lineage": ({"runs"}, {"require_clean_tree"}, True),
    "dataset_digest": ({"dataset"}, set(), False),
}
LINEAGE_RUNS = ("base", "stage_a", "stage_b", "eval")
ANY = "any"

# The criteria the decision tree, the analysis report and the monitor read (besides the gate, which reads all).
LEARNING = "first_token_learning"
STABILITY = "first_token_stability"
BREAKTHROUGH = "f1_breakthrough"
QUALITY = "generation_quality"
GRADIENTS = "gradient_health"
COLLAPSE = "no_mode_collapse"
# Criteria about where the evidence comes from rather than about learning: failing them is no reason to tune (the
# decision tree stops with what to pin or re-run instead). By kind, so a team's own file needs no list of names.
PROVENANCE_KINDS = ("lineage", "dataset_digest", "eval_count")


@dataclass(frozen=True)
class Criterion:
    name: str
    kind: str
    op: str
    threshold: float | None
    params: dict = field(default_factory=dict)
    description: str = ""
    # Whether the verdict reads it. A criterion that does not decide is still judged and shown (the plan's own
    # reading), and `calibrated_by` names the calibration that justified the choice.
    decides: bool = True
    calibrated_by: str = ""

    def compare(self, observed: Any, threshold: Any = None) -> bool:
        threshold = self.threshold if threshold is None else threshold
        if observed is None or threshold is None:
            return False
        if isinstance(observed, float) and math.isnan(observed):
            return False
        return bool(OPS[self.op](observed, threshold))

    def with_threshold(self, threshold: float | None) -> Criterion:
        """The same criterion at another threshold (None: unchanged), e.g. a command-line override."""
        return self if threshold is None else replace(self, threshold=float(threshold))

    def as_text(self) -> str:
        """The comparison as text, e.g. "> 0" for f1_breakthrough as shipped."""
        return f"{self.op} {self.threshold:g}" if self.threshold is not None else f"{self.op} <pinned>"


@dataclass(frozen=True)
class CollapseRule:
    """Mode collapse as a checklist criterion of kind eval_collapse defines it, on SQuAD-normalised answers: one
    answer for more than `max_top_share` of the inputs, the `top_k` most frequent answers for more than
    `max_top_k_share` (a few answers sharing the inputs), more than `max_empty_share` empty answers, or a share of
    repetitive ("thethethe") predictions that fails the criterion's own comparison."""

    max_top_share: float
    repetition: Criterion
    top_k: int = 1
    max_top_k_share: float | None = None
    max_empty_share: float | None = None

    def why(self, top_share: float | None, repetition_rate: float | None, top_answer: str | None = None,
            top_k_share: float | None = None, empty_share: float | None = None) -> str | None:
        """The collapse, in words starting with "mode collapse", or None (not collapsed, or nothing to judge).
        Every limit that fails is named."""
        reasons = []
        if top_share is not None and top_share > self.max_top_share:
            said = f" ({top_answer!r})" if top_answer is not None else ""
            reasons.append(f"one answer{said} for {top_share:.0%} of the inputs (top prediction share {top_share:.4g} "
                           f"> {self.max_top_share:g})")
        if top_k_share is not None and self.max_top_k_share is not None and top_k_share > self.max_top_k_share:
            reasons.append(f"{self.top_k} answers for {top_k_share:.0%} of the inputs (top-{self.top_k} share "
                           f"{top_k_share:.4g} > {self.max_top_k_share:g})")
        if empty_share is not None and self.max_empty_share is not None and empty_share > self.max_empty_share:
            reasons.append(f"{empty_share:.0%} empty answers (> {self.max_empty_share:g})")
        if repetition_rate is not None and not self.repetition.compare(repetition_rate):
            reasons.append(f"{repetition_rate:.0%} repetitive predictions (not {self.repetition.as_text()})")
        return "mode collapse: " + "; ".join(reasons) if reasons else None

    def judge(self, stats) -> str | None:
        """`why` of an eval/controls.py Collapse."""
        return self.why(stats.top_prediction_share, stats.repetition_rate, stats.top_prediction, stats.top_k_share,
                        stats.empty_share)


@dataclass(frozen=True)
class Checklist:
    path: Path
    sha256: str
    version: int
    model_name: str
    alias: str
    criteria: tuple[Criterion, ...]
    eval_dataset_digest: Any  # "any", one digest string, or {data config hash: digest}
    calibration: dict = field(default_factory=dict)  # {hero_f1_target}: a successful hero for `latentgate calibrate`
    hero: dict = field(default_factory=dict)  # {scale}: the hero budget (registry/hero_recipe.py)

    def names(self) -> list[str]:
        return [c.name for c in self.criteria]

    def deciding(self) -> list[str]:
        """The criteria the verdict reads (`decides`, default true); the others are judged and shown only."""
        return [c.name for c in self.criteria if c.decides]

    def criterion(self, name: str) -> Criterion:
        for c in self.criteria:
            if c.name == name:
                return c
        raise ConfigError(f"checklist {self.path} has no criterion {name!r}", f"choose one of {self.names()}")

    def threshold(self, name: str):
        """A criterion's threshold as the file states it, e.g. threshold("first_token_learning")."""
        return self.criterion(name).threshold

    def collapse_rule(self, name: str = COLLAPSE) -> CollapseRule:
        """What counts as mode collapse for an eval_collapse criterion (default no_mode_collapse, the one the
        decision tree, the report and the monitor read): its own limits, never another criterion's."""
        c = self.criterion(name)
        if c.kind != "eval_collapse":
            raise ConfigError(f"checklist {self.path}: {name} is of kind {c.kind}, the decision tree, the report "
                              "and the monitor need eval_collapse", "see registry/hero.yaml")
        p = c.params
        return CollapseRule(float(p["max_top_prediction_share"]), c, int(p.get("top_k", 1)),
                            None if "max_top_k_share" not in p else float(p["max_top_k_share"]),
                            None if "max_empty_share" not in p else float(p["max_empty_share"]))

    def hero_f1_target(self) -> float:
        """calibration.hero_f1_target: the hero latent F1 that `latentgate calibrate` counts as a successful hero."""
        target = self.calibration.get(Calibration.HERO_F1_TARGET)
        if target is None:
            raise ConfigError(f"checklist {self.path} has no calibration.hero_f1_target",
                              "add `calibration: {hero_f1_target: 0.10}` to the checklist file")
        return float(target)

    def hero_scale(self) -> float:
        """hero.scale: the hero's optimizer steps (and warm-up, probe, checkpoint cadence) over the approved run's."""
        scale = self.hero.get("scale")
        if scale is None:
            raise ConfigError(f"checklist {self.path} has no hero.scale",
                              "add `hero: {scale: 10}` to the checklist file")
        return float(scale)

    def provenance(self) -> list[str]:
        """Names of the criteria about where the evidence comes from (PROVENANCE_KINDS)."""
        return [c.name for c in self.criteria if c.kind in PROVENANCE_KINDS]

    def pinned_digest(self, data_hash: str) -> str | None:
        """The eval dataset digest pinned for a data config hash: a digest, "any", or None (not pinned)."""
        pin = self.eval_dataset_digest
        if isinstance(pin, dict):
            value = pin.get(data_hash)
            return None if value is None else str(value)
        return str(pin)


def _fail(path: Path, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"checklist {path}: {problem}", fix)


def _criterion(path: Path, i: int, raw: Any) -> Criterion:
    if not isinstance(raw, dict):
        raise _fail(path, f"criterion #{i + 1} is not a mapping",
                    "write each criterion as {name, kind, params, op, threshold}")
    unknown = set(raw) - {"name", "kind", "params", "op", "threshold", "description", "decides", "calibrated_by"}
    if unknown:
        raise _fail(path, f"criterion #{i + 1} has unknown key(s) {sorted(unknown)}",
                    "use name, description, kind, params, op, threshold, decides, calibrated_by")
    name = raw.get("name")
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise _fail(path, f"criterion #{i + 1} has an invalid name {name!r}", "use letters, digits and '_'")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise _fail(path, f"criterion {name}: unknown kind {kind!r}", f"choose one of {sorted(KINDS)}")
    required, optional, numeric = KINDS[kind]
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise _fail(path, f"criterion {name}: params must be a mapping", "write params: {key: value}")
    missing, extra = required - set(params), set(params) - required - optional
    if missing or extra:
        raise _fail(path, f"criterion {name} ({kind}): missing params {sorted(missing)}, "
                    f"unknown params {sorted(extra)}",
                    f"{kind} takes {sorted(required)} (optional {sorted(optional)})")
    if kind == "eval_collapse":
        for key in ("max_top_prediction_share", "max_top_k_share", "max_empty_share"):
            share = params.get(key, 0.0)
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
                raise _fail(path, f"criterion {name}: {key} must be a number in [0, 1], got {share!r}",
                            f"write e.g. {key}: 0.5")
        top_k = params.get("top_k", 1)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1 or ("max_top_k_share" in params) != (
                "top_k" in params):
            raise _fail(path, f"criterion {name}: top_k (an integer >= 1) and max_top_k_share go together",
                        "write e.g. top_k: 4, max_top_k_share: 0.6")
    if "show" in params and (not isinstance(params["show"], list)
                             or not all(isinstance(m, str) and m for m in params["show"])):
        raise _fail(path, f"criterion {name}: show must be a list of metric names", "write show: [<metric>, ...]")
    if kind == "lineage":
        bad = set(params["runs"]) - set(LINEAGE_RUNS)
        if bad:
            raise _fail(path, f"criterion {name}: unknown lineage run(s) {sorted(bad)}",
                        f"choose from {list(LINEAGE_RUNS)}")
    op = raw.get("op")
    if op not in OPS:
        raise _fail(path, f"criterion {name}: unknown op {op!r}", f"choose one of {list(OPS)}")
    threshold = raw.get("threshold")
    if numeric:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise _fail(path, f"criterion {name}: threshold must be a finite number, got {threshold!r}",
                        "write threshold: <number>")
        threshold = float(threshold)
    elif threshold is not None:
        raise _fail(path, f"criterion {name} ({kind}) takes no threshold (it compares with a pinned value)",
                    "remove threshold:")
    elif op != "==":
        raise _fail(path, f"criterion {name} ({kind}) compares with '=='", "write op: \"==\"")
    decides, calibrated_by = raw.get("decides", True), raw.get("calibrated_by", "")
    if not isinstance(decides, bool):
        raise _fail(path, f"criterion {name}: decides={decides!r} is not true/false", "write decides: false")
    if not isinstance(calibrated_by, str) or len(calibrated_by) > 1000:
        raise _fail(path, f"criterion {name}: calibrated_by must be text of at most 1000 characters",
                    "write calibrated_by: \"<calibration set, date, run and what it showed>\"")
    if not decides and not calibrated_by.strip():
        raise _fail(path, f"criterion {name} does not decide but names no calibration that justifies it",
                    "add calibrated_by: \"<calibration set, date, run and what it showed>\"")
    if kind == "metric_extrapolated":
        for key in ("floor", "ceiling"):
            v = params.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise _fail(path, f"criterion {name}: {key} must be a finite number, got {v!r}",
                            f"write e.g. {key}: 0.0")
    return Criterion(name, kind, op, threshold, dict(params), str(raw.get("description", "")), decides,
                     calibrated_by.strip())


def load_checklist(path: str | Path | None = None) -> Checklist:
    """Load and validate a checklist file (default: <repo>/registry/hero.yaml)."""
    path = Path(path) if path else DEFAULT_PATH
    refuse_loop(path, "checklist")
    if not path.is_file():
        raise ConfigError(f"checklist {path} does not exist", f"pass --checklist <file> or restore {DEFAULT_PATH}")
    data = load_yaml(path, "checklist")  # bounded: size, nesting, no aliases or duplicate keys
    text = path.read_bytes()  # what sha256 pins (at most safety.YAML_MAX_BYTES, as load_yaml checked)
    if not isinstance(data, dict):
        raise _fail(path, "expected a mapping at the top level", "see registry/hero.yaml")
    unknown = set(data) - {"version", "model_name", "alias", "eval_dataset_digest", "criteria", "calibration", "hero"}
    if unknown:
        raise _fail(path, f"unknown top-level key(s) {sorted(unknown)}",
                    "use version, model_name, alias, eval_dataset_digest, criteria, calibration, hero")
    if data.get("version") != 1:
        raise _fail(path, f"unsupported version {data.get('version')!r}", "write version: 1")
    raw = data.get("criteria")
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "no criteria", "list at least one criterion under criteria:")
    criteria = tuple(_criterion(path, i, c) for i, c in enumerate(raw))
    names = [c.name for c in criteria]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(path, f"duplicate criterion name(s) {dupes}", "give every criterion its own name")
    pin = data.get("eval_dataset_digest", ANY)
    if isinstance(pin, dict):
        if not pin or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in pin.items()):
            raise _fail(path, "eval_dataset_digest must map data config hashes to digest strings",
                        "write eval_dataset_digest: {<data config hash>: <digest>} (quote all-digit values)")
    elif not isinstance(pin, str) or not pin:
        raise _fail(path, f"eval_dataset_digest must be 'any', a digest or a mapping, got {pin!r}",
                    "write eval_dataset_digest: any")
    alias = data.get("alias", Registry.ALIAS)
    if not isinstance(alias, str) or not alias.replace("_", "").replace("-", "").isalnum():
        raise _fail(path, f"invalid alias {alias!r}", "write alias: hero")
    return Checklist(path=path.resolve(), sha256=hashlib.sha256(text).hexdigest(), version=1,
                     model_name=str(data.get("model_name", Registry.MODEL_NAME)), alias=alias, criteria=criteria,
                     eval_dataset_digest=pin, calibration=_calibration(path, data.get("calibration")),
                     hero=_hero(path, data.get("hero")))


def _hero(path: Path, raw: Any) -> dict:
    """The optional `hero:` mapping: {scale: a number > 0}."""
    if raw is None:
        return {}
    scale = raw.get("scale") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or set(raw) - {"scale"} or isinstance(scale, bool) or not isinstance(
            scale, (int, float)) or not scale > 0:
        raise _fail(path, f"hero must be a mapping {{scale: a number > 0}}, got {raw!r}", "write hero: {scale: 10}")
    return {"scale": float(scale)}


def _calibration(path: Path, raw: Any) -> dict:
    """The optional `calibration:` mapping: {hero_f1_target: a number in [0, 1]}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - {Calibration.HERO_F1_TARGET}:
        raise _fail(path, f"calibration must be a mapping with hero_f1_target only, got {raw!r}",
                    "write calibration: {hero_f1_target: 0.10}")
    target = raw.get(Calibration.HERO_F1_TARGET)
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0 <= target <= 1):
        raise _fail(path, f"calibration.hero_f1_target must be a number in [0, 1], got {target!r}",
                    "write calibration: {hero_f1_target: 0.10}")
    return {} if target is None else {Calibration.HERO_F1_TARGET: float(target)}
