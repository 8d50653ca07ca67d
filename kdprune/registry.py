"""The registry gate: whether a candidate takes the champion alias. Pure functions; the register stage feeds them.

The champion is always re-scored on the candidate's validation images (never trusted from its tags), so the
comparison is paired: the same images, two models. A candidate is promoted only when
  * it gets at least `min_gain` more of those images right than the champion (wins - losses),
  * an exact one-sided McNemar test on the images where the two disagree says the gain is unlikely to be luck
    (p <= `max_p_value`; 1.0 switches the test off), and
  * it costs at most `max_macs_ratio` x the champion's MACs (and `max_latency_ratio` x its latency, when set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str  # one line, for people: the registration report, the run's tags, the Prefect artifact
    numbers: dict = field(default_factory=dict)  # what the decision was based on


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact one-sided McNemar p-value: P(at least `wins` of the wins+losses disagreements go the candidate's way
    if both models were equally good), i.e. a binomial(n, 1/2) tail."""
    n = wins + losses
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n)


def paired_counts(candidate_correct: Sequence[bool], champion_correct: Sequence[bool]) -> dict:
    """Per-image comparison of two models on the same images."""
    if len(candidate_correct) != len(champion_correct):
        raise ValueError("paired comparison needs the same images for both models")
    wins = sum(1 for a, b in zip(candidate_correct, champion_correct) if a and not b)
    losses = sum(1 for a, b in zip(candidate_correct, champion_correct) if b and not a)
    n = len(candidate_correct)
    return {"images": n, "wins": wins, "losses": losses, "gain": wins - losses,
            "candidate_accuracy": round(sum(map(bool, candidate_correct)) / n, 4) if n else 0.0,
            "champion_accuracy": round(sum(map(bool, champion_correct)) / n, 4) if n else 0.0,
            "p_value": round(mcnemar_p(wins, losses), 6)}


def incompatibility(candidate: dict, champion: dict) -> str | None:
    """Why the champion cannot be scored on the candidate's images (other classes or input shape), else None.

    Both dicts hold `classes` and `input_shape` as lists; a champion tag that is missing is not held against it.
    """
    for key, what in (("classes", "classes"), ("input_shape", "input shape")):
        theirs = champion.get(key)
        if theirs is not None and list(theirs) != list(candidate[key]):
            return (f"champion v{champion['version']} has other {what} ({_short(theirs)} vs {_short(candidate[key])}): "
                    f"the two cannot be compared on the same images; alias left on the champion")
    return None


def _short(values) -> str:
    values = list(values)
    return str(values) if len(values) <= 4 else f"[{', '.join(map(str, values[:3]))}, ... {len(values)} items]"


def cost_check(candidate: dict, champion: dict, max_macs_ratio: float, max_latency_ratio: float | None) -> str | None:
    """Why the candidate is too expensive next to the champion, else None. Unknown champion costs are not checked."""
    rules = [("macs", "MACs", max_macs_ratio), ("cpu_latency_ms_b1", "CPU latency (batch 1)", max_latency_ratio)]
    for key, what, ratio in rules:
        theirs, ours = champion.get(key), candidate.get(key)
        if ratio is None or theirs in (None, "") or ours is None or float(theirs) <= 0:
            continue
        if float(ours) > float(theirs) * ratio:
            return (f"{what} {float(ours):,.4g} exceed {ratio}x champion v{champion['version']}'s {float(theirs):,.4g}")
    return None


def decide(candidate: dict, champion: dict | None, policy) -> Decision:
    """The gate. `candidate`: its `correct` list (per validation image) and costs; `champion`: None when there is
    none, else its `version`, costs (registry tags) and `correct` on the candidate's images. `policy`: the
    `registry` params (min_gain, max_p_value, max_macs_ratio, max_latency_ratio)."""
    if champion is None:
        return Decision(True, "no current champion", {})
    version = champion["version"]
    numbers = {"champion_version": version, **paired_counts(candidate["correct"], champion["correct"])}
    gain, p = numbers["gain"], numbers["p_value"]
    if champion.get("dataset_id") and champion["dataset_id"] != candidate.get("dataset_id"):
        numbers["champion_other_data"] = True
    summary = (f"images won {numbers['wins']}, lost {numbers['losses']} vs champion v{version} "
               f"({numbers['candidate_accuracy']:.4f} vs {numbers['champion_accuracy']:.4f} on the same "
               f"{numbers['images']} validation images, McNemar p={p:.3g})")
    if numbers.get("champion_other_data"):  # see README, "Leakage"
        summary += ("; the champion was validated on other data and may have trained on some of these images, "
                    "which only favours it")
    if gain < policy.min_gain:
        return Decision(False, f"not promoted: {summary}; needs a gain of at least {policy.min_gain}", numbers)
    if p > policy.max_p_value:
        return Decision(False, f"not promoted: {summary}; gain not significant (p > {policy.max_p_value})", numbers)
    too_costly = cost_check(candidate, champion, policy.max_macs_ratio, policy.max_latency_ratio)
    if too_costly:
        return Decision(False, f"not promoted: {summary}, but {too_costly}", numbers)
    return Decision(True, f"promoted: {summary}", numbers)


def slower_than_parent(pruning: dict, latency_batch: int, tolerance: float = 0.0) -> str | None:
    """Why the served model must not be registered: it measured slower than the distilled student it came from on
    the serving runtime (the evaluate report's `served_speedup_*`) by more than `tolerance`, else None."""
    for suffix, label in (("b1", "batch 1"), ("batch", f"batch {latency_batch}")):
        speedup = pruning.get(f"served_speedup_{suffix}")
        if speedup is not None and speedup < 1.0 - tolerance:
            return (f"not registered: the served model is slower than the distilled student on ONNX Runtime at "
                    f"{label} ({speedup:.2f}x its speed; registry.speed_tolerance allows {1 - tolerance:.2f}x); "
                    f"prune to another target or shape (registry.require_faster: false registers it anyway)")
    return None
