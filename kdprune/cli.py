"""`kdprune run | stage | serve | predict`: the command line. Errors in the user's input end as one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdprune.errors import KdpruneError

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S distill.temperature=2 (repeatable)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: $KDPRUNE_DEVICE, else cuda if present)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (also: KDPRUNE_TRACKING=off)")


def make_parser() -> argparse.ArgumentParser:
    from kdprune.stages import STAGES

    parser = argparse.ArgumentParser(prog="kdprune", description="Teacher -> distilled student -> pruned student -> registry.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow (MLflow parent run, DVC commit)")
    _common(run)
    stage = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name", help=f"one of: {', '.join(STAGES)}")
    _common(stage)
    serve = sub.add_parser("serve", help="serve the pipeline on params' serve.cron against a Prefect server")
    _common(serve)
    predict = sub.add_parser("predict", help="print the class and probability of each image")
    predict.add_argument("--model", default=None, metavar="models:/NAME@ALIAS | PATH",
                         help="a registered model (MLFLOW_TRACKING_URI's registry) or a model file such as "
                              "models/pruned.pt (default: models:/<registry.model_name>@<registry.alias> of params)")
    predict.add_argument("-p", "--params", default="params.yaml", help="params file, for the default model")
    predict.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a param, e.g. -S registry.alias=candidate (repeatable)")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    return parser


def predict_command(args: argparse.Namespace) -> None:
    """One line per image: path, class, probability (tab-separated)."""
    from kdprune.predict import predict

    model = args.model
    if model is None:
        from kdprune import config

        registry = config.load(args.params, args.overrides).registry
        model = f"models:/{registry.model_name}@{registry.alias}"
    for path, label, probability in predict(model, args.images):
        print(f"{path}\t{label}\t{probability:.4f}")


def tracker_for(args: argparse.Namespace):
    """MLflow unless switched off; a stage run nests under $KDPRUNE_PARENT_RUN_ID when set, else, when DVC runs
    it (`dvc repro`, `dvc exp run`), under one parent run per DVC invocation / experiment."""
    from kdprune.lineage import dvc_context, dvc_invocation, run_context
    from kdprune.tracking import MlflowTracker, NullTracker

    if args.no_tracking or os.environ.get("KDPRUNE_TRACKING", "").lower() in ("off", "0", "false"):
        return NullTracker()
    tracker = MlflowTracker(run_id=os.environ.get("KDPRUNE_PARENT_RUN_ID") or None)
    key = None if tracker.run_id else dvc_invocation()
    if key:
        exp = dvc_context().get("kdprune.dvc_exp")
        context = {k: v for k, v in run_context().items() if k != "kdprune.dvc_stage"}
        tracker.run_id = tracker.group_run(key, f"dvc exp run {exp}" if exp else "dvc repro", context)
    return tracker


def _run_one_stage(name, params, paths, tracker, device) -> dict:
    from kdprune.stages import SEARCH_STAGES, run_stage

    if name in SEARCH_STAGES and params.search.enabled:
        try:  # trial workers on Prefect's task runner (threads, processes or Dask) when Prefect is installed
            from flows.search import run_search
        except ImportError:
            return run_stage(name, params, paths, tracker, device)
        return run_search(name, params, paths, tracker, device)
    return run_stage(name, params, paths, tracker, device)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so open tracking runs are closed (marked FAILED), never left RUNNING."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    exit_on_sigterm()
    args = make_parser().parse_args(argv)
    try:
        if args.command == "predict":
            predict_command(args)
            return 0
        from kdprune import config
        from kdprune.stages import Paths, resolve_device

        params = config.load(args.params, args.overrides)
        device = resolve_device(args.device)
        if args.command == "stage":
            summary = _run_one_stage(args.name, params, Paths(Path(".")), tracker_for(args), device)
            print(f"{args.name}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))
        elif args.command == "run":
            from flows.pipeline import pipeline

            pipeline(params_path=args.params, overrides=args.overrides, device=str(device),
                     tracking=not args.no_tracking)
        else:
            from flows.pipeline import serve

            serve(args.params, params.serve.cron)
    except KdpruneError as error:
        print(f"kdprune: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
