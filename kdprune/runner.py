"""The stage runner: one stage inside its own tracking run, skipped when its inputs and outputs are unchanged.

Both drivers (the CLI behind dvc.yaml, and the Prefect tasks) run stages only through `run_stage`.
"""

from __future__ import annotations

import torch

from kdprune import stages
from kdprune.config import Params
from kdprune.errors import KdpruneError
from kdprune.lineage import file_hash, run_context
from kdprune.project import Paths, stage_outputs
from kdprune.run_metrics import log_on_model_runs, summary_metrics
from kdprune.tracking import NullTracker

STAGES = {"prepare": stages.prepare, "search-teacher": stages.search_teacher, "teacher": stages.teacher,
          "search-student": stages.search_student, "student": stages.student, "distill": stages.distill,
          "compare": stages.compare, "prune": stages.prune, "export": stages.export, "evaluate": stages.evaluate,
          "register": stages.register}
SEARCH_STAGES = {"search-teacher": "teacher", "search-student": "student"}


def _stage_inputs_beyond_dvc(name: str, tracker) -> dict:
    """Inputs of a stage that dvc.yaml cannot see: the registry a registration went to."""
    return {"tracking": getattr(tracker, "tracking_uri", None)} if name == "register" else {}


def run_stage(name: str, params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None,
              resume: bool = False, **options) -> dict:
    """Run one stage inside its own tracking run (nested under the tracker's run, if any).

    With `resume`, a stage whose inputs and outputs are unchanged since it last finished is skipped (kdprune/resume.py);
    its summary is that of the finished run. Every finished stage is recorded, whoever ran it (flow, CLI, DVC).
    """
    from kdprune import resume as resume_mod

    if name not in STAGES:
        raise KdpruneError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    extra = _stage_inputs_beyond_dvc(name, tracker)
    tags = {"kdprune.stage": name, **run_context(paths.root)}
    output = stage_outputs(paths).get(name)
    if resume and (done := resume_mod.completed(paths.root, name, params, extra)) is not None:
        print(f"{name}: skipped, outputs up to date (inputs unchanged since it last finished)")
        with tracker.run(name, tags={**tags, "kdprune.skipped": "outputs up to date"}) as run:
            run.log_metrics(summary_metrics(name, done))
            if output is not None and output.is_file():
                run.set_tags({"kdprune.output_sha256": file_hash(output)})
        if name == "evaluate":  # the skipped model runs of this pipeline get their numbers as trained ones do
            log_on_model_runs(done, paths, tracker)
        return done
    with tracker.run(name, tags=tags) as run:
        summary = STAGES[name](params, paths, run, device, **options)
        if output is not None and output.is_file():  # how register finds the run that made each input
            run.set_tags({"kdprune.output_sha256": file_hash(output)})
    if name != "register" or summary.get("version") is not None or isinstance(tracker, NullTracker):
        resume_mod.mark_done(paths.root, name, params, summary, extra)  # a registration that never reached the registry is not done
    return summary
