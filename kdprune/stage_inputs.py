"""What each stage reads and writes: the one table `dvc.yaml` is written from and resume fingerprints.

`deps` are paths: `kdprune` (the whole package) and `kdprune/NAME.py` name the code that runs, wherever it is
installed; every other path is inside the project. `params` are params.yaml keys (a section or a dotted key).
`data_source`: the stage also reads `data.path`, wherever it lives. DVC sees that only when it is inside the
project (keep local image folders in `datasets/` for `dvc repro`); resume hashes it anywhere.

`dvc.yaml` is generated: edit this table, then `python -m kdprune.stage_inputs` rewrites it (a test checks the
two agree).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "kdprune"
NO_CACHE = {"cache": False}


@dataclass(frozen=True)
class StageInputs:
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple = ()  # each a path, or (path, DVC options); the first is the stage's main output
    metrics: tuple = ()
    plots: tuple = ()
    data_source: bool = False
    note: str = ""  # the comment above the stage in dvc.yaml

    def outputs(self) -> list[str]:
        """Every path the stage writes (outs, metrics, plots)."""
        return [out if isinstance(out, str) else out[0] for out in (*self.outs, *self.metrics, *self.plots)]


def _curve(role: str) -> tuple:
    return (f"plots/{role}.csv", {"cache": False, "x": "epoch", "y": "val_loss"})


def _search(role: str, note: str = "") -> StageInputs:
    from kdprune.search import BUDGET_KEYS, CODE_FILES, trial_keys

    upstream = ("models/teacher.pt", "data/prepared.pt") if role == "student" else ("data/prepared.pt",)
    return StageInputs(
        deps=(*upstream, *(f"{PACKAGE}/{name}.py" for name in CODE_FILES)),
        params=(*BUDGET_KEYS[role], *trial_keys(role)),
        outs=(f"search/{role}.json", (f"search/{role}-study.db", {"cache": False, "persist": True}),
              (f"search/{role}-trials.csv", NO_CACHE)), note=note)


def table() -> dict[str, StageInputs]:
    """Every stage, in the order the pipeline runs them."""
    return {
        "prepare": StageInputs(
            deps=(PACKAGE, "datasets"), params=("seed", "data"), outs=("data/prepared.pt",), data_source=True,
            note="data.path outside the project: resume hashes it; DVC sees only datasets/ (keep images there)"),
        "search-teacher": _search(
            "teacher", "Meta-optimization / meta-regularization (Optuna), right before the stage that trains with its "
                    "best point; search.enabled false: {\"enabled\": false}. Deps and params: exactly what the trials "
                    "read and run (kdprune/search.py: trial_keys, CODE_FILES), plus the budget. The study database "
                    "persists: an unchanged study resumes (raise n_trials to add trials), a changed one is a new "
                    "study in it; change search.seed for new trials."),
        "teacher": StageInputs(
            deps=(PACKAGE, "data/prepared.pt", "search/teacher.json"), params=("seed", "teacher", "search.enabled"),
            outs=("models/teacher.pt",), metrics=(("metrics/teacher.json", NO_CACHE),), plots=(_curve("teacher"),)),
        "search-student": _search("student"),
        "student": StageInputs(
            deps=(PACKAGE, "data/prepared.pt", "search/student.json"), params=("seed", "student", "search.enabled"),
            outs=("models/student.pt",), metrics=(("metrics/student.json", NO_CACHE),), plots=(_curve("student"),)),
        "distill": StageInputs(
            deps=(PACKAGE, "data/prepared.pt", "search/student.json", "models/teacher.pt"),
            params=("seed", "student", "distill", "search.enabled"),
            outs=("models/distilled.pt",), metrics=(("metrics/distilled.json", NO_CACHE),),
            plots=(_curve("distilled"),)),
        "compare": StageInputs(
            deps=(PACKAGE, "data/prepared.pt", "search/teacher.json", "search/student.json", "models/teacher.pt"),
            params=("seed", "search.enabled", "search.compare", "teacher", "student", "distill"),
            metrics=(("search/compare.json", NO_CACHE),),
            note="Optional (search.compare.enabled): defaults vs searched at the same wall-clock budget, over seeds."),
        "prune": StageInputs(
            deps=(PACKAGE, "data/prepared.pt", "search/student.json", "models/teacher.pt", "models/distilled.pt"),
            params=("seed", "prune", "distill", "search.enabled"),
            outs=("models/pruned.pt", ("plots/sensitivity.png", NO_CACHE),
                  ("models/latency-table.json", {"persist": True})),
            metrics=(("metrics/pruned.json", NO_CACHE),), plots=(_curve("pruned"),),
            note="models/latency-table.json: the runtime's per-layer latency table a latency target is spent with; "
                 "it persists (measured once per architecture, runtime, batch and threads: reruns choose the same "
                 "channels)."),
        "export": StageInputs(
            deps=(PACKAGE, "data/prepared.pt", "models/pruned.pt"),
            params=("seed", "export", "prune.finetune.tta", "evaluate.latency_batch", "evaluate.latency_repeats",
                    "evaluate.latency_threads"),
            outs=("models/served.onnx", "models/pruned.onnx"), metrics=(("metrics/export.json", NO_CACHE),),
            note="The pruned model as served (pixels / 255 in, logits out) in ONNX; written only within "
                 "export.tolerance. With export.quantize: int8, served.onnx is its INT8 version where that is not "
                 "worse and is faster (timed like evaluate)."),
        "evaluate": StageInputs(
            deps=(PACKAGE, "data/prepared.pt", "models/teacher.pt", "models/student.pt", "models/distilled.pt",
                  "models/pruned.pt", "models/served.onnx", "metrics/export.json", "search/student.json"),
            params=("evaluate", "teacher.train.tta", "student.train.tta", "prune.finetune.tta", "prune.target",
                    "prune.latency_target", "search.enabled"),
            outs=(("reports/report.json", NO_CACHE), ("reports/table.md", NO_CACHE),
                  ("reports/per_class.md", NO_CACHE), ("reports/per_class.json", NO_CACHE),
                  ("reports/confusion.png", NO_CACHE)),
            metrics=(("reports/metrics.json", NO_CACHE),),
            note="reports/metrics.json has no timings: `dvc metrics diff` shows what the models changed."),
        "register": StageInputs(
            deps=(PACKAGE, "data/prepared.pt", "models/pruned.pt", "models/served.onnx", "reports/report.json"),
            params=("registry", "prune.finetune.tta"), outs=(("reports/registration.json", NO_CACHE),),
            note="prune.finetune.tta: the registered model does the flip average when it is on."),
    }


# ------------------------------------------------------------------------------------------- dvc.yaml
HEADER = """\
# GENERATED from kdprune/stage_inputs.py (`python -m kdprune.stage_inputs`): edit the table there, not here.
# One stage per kdprune stage function; each command is `kdprune stage NAME` (activate .venv first).
#
# Code: a stage depends on the whole `kdprune` package (.dvcignore leaves out __pycache__), the search stages on
# the modules their trials run. Data: `prepare` depends on `datasets/`; keep local image folders or archives there
# (`dvc add datasets/NAME`), so replacing an image marks `prepare` changed. digits ships with scikit-learn, cifar10
# is checked by its md5. Params: each stage lists the params.yaml sections (or keys) it reads. Metrics, plots and
# reports are small `cache: false` files committed to git, so `dvc exp show`, `dvc metrics diff` and
# `dvc plots diff` compare them across commits and experiments.
stages:
"""

FOOTER = """
# `dvc plots show` renders these: validation accuracy and losses per epoch, all models on one chart.
plots:
""" + "".join(f"""  - {y}:
      x: epoch
      y:
""" + "".join(f"        plots/{m}.csv: {y}\n" for m in ("teacher", "student", "distilled", "pruned"))
    for y in ("val_accuracy", "train_loss"))


def _item(entry) -> str:
    if isinstance(entry, str):
        return entry
    path, options = entry
    return f"{path}: {{{', '.join(f'{k}: {str(v).lower() if isinstance(v, bool) else v}' for k, v in options.items())}}}"


def _flow_list(key: str, entries, indent: int = 4, width: int = 118) -> list[str]:
    """`key: [a, b, ...]`, wrapped under the bracket."""
    lead = " " * indent + f"{key}: ["
    lines, line = [], lead
    items = [_item(e) for e in entries]
    for i, text in enumerate(items):
        piece = text + (", " if i < len(items) - 1 else "]")
        if len(line) + len(piece.rstrip()) > width and line.strip() != lead.strip():
            lines.append(line.rstrip())
            line = " " * len(lead) + piece
        else:
            line += piece
    lines.append(line)
    return lines


def _wrap_comment(text: str, indent: int = 2, width: int = 118) -> list[str]:
    lines, line = [], " " * indent + "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = " " * indent + "#"
        line += " " + word
    return [*lines, line]


def dvc_yaml() -> str:
    out = [HEADER.rstrip("\n")]
    for name, stage in table().items():
        out.append("")
        if stage.note:
            out += _wrap_comment(stage.note)
        out.append(f"  {name}:")
        out.append(f"    cmd: kdprune stage {name}")
        for key in ("deps", "params", "outs", "metrics", "plots"):
            if getattr(stage, key):
                out += _flow_list(key, getattr(stage, key))
    return "\n".join(out) + "\n" + FOOTER


def main(argv: list[str] | None = None) -> int:
    """Write dvc.yaml beside the package (or to the given path)."""
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "dvc.yaml"
    from kdprune.io import write_text

    write_text(target, dvc_yaml())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
