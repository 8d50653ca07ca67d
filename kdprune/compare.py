"""Defaults vs searched, compared so that a reader can tell gain from noise.

Each recipe gets the same wall-clock training budget (`search.compare.seconds`), not the same epochs: a searched
batch of 32 takes 8x the steps of 256. One timed epoch of each recipe sets how many epochs fit the budget (its
schedule and warm-up scaled to them); then each recipe trains with `search.compare.seeds` seeds and the report
gives the test accuracy's mean and standard deviation. Test accuracy is only reported here, never used to choose.
Both students distil from the pipeline's trained teacher, so the student rows compare the student recipes alone.
Each row states its model's MACs: in pareto mode the searched student is a narrower point of the front, so its
rows compare accuracy at a different cost (it is compared unpruned; the prune stage then cuts it further).
"""

from __future__ import annotations

import statistics
import time

import torch

from kdprune import data as data_mod
from kdprune.checkpoint import load_model
from kdprune.config import Params
from kdprune.io import write_json, write_text
from kdprune.project import Paths, apply_point, effective_params, input_spec, make_splits, train_new
from kdprune.pruning import count_macs_params
from kdprune.tracking import NullTracker
from kdprune.train import evaluate


def _budget_params(params: Params, role: str, epochs: int) -> Params:
    """`params` with the role's schedule stretched or shrunk to `epochs` (warm-up scaled with it)."""
    return apply_point(params, role, {}, fraction=epochs / getattr(params, role).train.epochs)


def compare(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    if not (params.search.enabled and params.search.compare.enabled):
        write_json(paths.compare_json, {"enabled": False})
        return {"enabled": False}
    budget = params.search.compare
    prepared = data_mod.load_prepared(paths.prepared)
    train, val, test = make_splits(prepared, device, ("train", "val", "test"))
    teacher_model, _ = load_model(paths.model("teacher"))
    recipes = {"defaults": params, "searched": effective_params(params, paths)}
    example = torch.zeros(1, *input_spec(prepared)[0])
    rows = []
    for name, role, teacher in (("teacher", "teacher", None), ("distilled", "student", teacher_model)):
        for label, recipe in recipes.items():
            role_params = getattr(recipe, role)

            def run(p: Params, seed: int, stage: str):
                rp = getattr(p, role)
                started = time.perf_counter()
                model, _ = train_new(rp.model, rp.train, prepared, train, val, stage=stage, seed=seed,
                                     teacher=teacher, distill=p.distill)
                return model, time.perf_counter() - started

            _, epoch_seconds = run(_budget_params(recipe, role, 1), recipe.seed, f"compare {label} {name} timing")
            epochs = max(1, int(budget.seconds // epoch_seconds))
            timed = _budget_params(recipe, role, epochs)
            accuracies, seconds = [], []
            for k in range(budget.seeds):
                model, took = run(timed, recipe.seed + k, f"compare {label} {name} seed {recipe.seed + k}")
                accuracies.append(evaluate(model, test, tta=role_params.train.tta)["accuracy"])
                seconds.append(took)
            macs, _ = count_macs_params(model.cpu(), example)
            rows.append({"model": name, "recipe": label, "arch": f"{role_params.model.arch} w{role_params.model.width}",
                         "macs": macs, "epochs": epochs, "seeds": budget.seeds,
                         "train_seconds_mean": round(statistics.mean(seconds), 2),
                         "test_accuracy_mean": statistics.mean(accuracies),
                         "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                         "test_accuracies": accuracies})
    table = format_table(rows, budget.seconds)
    write_text(paths.search_dir / "compare.md", table)
    result = {"enabled": True, "budget_seconds": budget.seconds, "rows": rows}
    write_json(paths.compare_json, result)
    tracker.log_text(table, "compare.md")
    tracker.log_metrics({f"{r['recipe']}_{r['model']}.test_accuracy_{stat}": r[f"test_accuracy_{stat}"]
                         for r in rows for stat in ("mean", "std")})
    return result


def format_table(rows: list[dict], seconds: float) -> str:
    lines = [f"Defaults vs searched at the same wall-clock training budget ({seconds:g} s per model); test accuracy "
             f"over {rows[0]['seeds']} seeds (mean ± standard deviation).", "",
             "| model | recipe | arch | MACs | epochs in budget | train s (mean) | test accuracy | per seed |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['recipe']} | {r['arch']} | {r['macs']:,} | {r['epochs']} | "
                     f"{r['train_seconds_mean']:.1f} | "
                     f"{r['test_accuracy_mean']:.2%} ± {r['test_accuracy_std']:.2%} | "
                     f"{', '.join(f'{a:.2%}' for a in r['test_accuracies'])} |")
    by = {(r["model"], r["recipe"]): r for r in rows}
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        d, s = by[model, "defaults"], by[model, "searched"]
        gain = s["test_accuracy_mean"] - d["test_accuracy_mean"]
        noise = max(d["test_accuracy_std"], s["test_accuracy_std"])
        verdict = "larger than" if abs(gain) > 2 * noise else "within"
        cost = (f"; the searched model has {s['macs'] / d['macs']:.2f}x the MACs" if s["macs"] != d["macs"] else "")
        lines.append(f"- {model}: searched - defaults = {gain:+.2%}, {verdict} twice the larger seed spread "
                     f"({noise:.2%}){cost}")
    return "\n".join(lines) + "\n"
