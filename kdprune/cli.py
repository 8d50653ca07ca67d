"""`kdprune run | stage | serve | predict`: the command line.

Errors in the user's input (a KdpruneError, an OSError on a project file) end as one line and exit 2, interrupts
(SIGINT, SIGTERM) as one line and exit 130 / 143; `--debug` (or KDPRUNE_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdprune.errors import KdpruneError
from kdprune.signals import exit_on_sigterm
from kdprune.telemetry import switch_off as telemetry_off


DATA_PARALLEL_STAGES = ("teacher", "student", "distill", "prune")
# --smoke: the whole graph in about a minute, to check a setup (new data, a new machine); -S given after it win.
# Its outputs differ from params.yaml's, so a smoke run is never recorded in dvc.lock (like any -S).
SMOKE_OVERRIDES = (
    "data.max_train=256", "data.max_test=128",
    "teacher.train.epochs=1", "teacher.train.warmup_epochs=0", "student.train.epochs=1",
    "student.train.warmup_epochs=0", "distill.dkd.warmup_epochs=0",
    "prune.finetune.epochs=1", "prune.finetune.warmup_epochs=0", "prune.sparsity.epochs=1", "prune.round_epochs=1",
    "prune.sensitivity=[]", "prune.latency_repeats=3", "search.n_trials=2",
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S distill.temperature=2 (repeatable)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: $KDPRUNE_DEVICE, else cuda if present)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (also: KDPRUNE_TRACKING=off)")
    parser.add_argument("--debug", action="store_true", help="full tracebacks (also: KDPRUNE_DEBUG=1)")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick smoke test: 1 epoch per model, 256 training images, 2 search trials "
                             "(applied before -S; not recorded in dvc.lock)")


def make_parser() -> argparse.ArgumentParser:
    """The argument parser: built from light modules only, so every `--help` answers without loading torch."""
    from kdprune.stage_names import STAGE_NAMES as STAGES

    parser = argparse.ArgumentParser(prog="kdprune", description="Teacher -> distilled student -> pruned student -> registry.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow (MLflow parent run, DVC commit)")
    _common(run)
    run.add_argument("--force", action="store_true", help="rerun every stage, even those whose outputs are up to date")
    stage = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name", help=f"one of: {', '.join(STAGES)}")
    _common(stage)
    serve = sub.add_parser("serve", help="serve the pipeline on params' serve.cron against a Prefect server")
    _common(serve)
    deploy = sub.add_parser("deploy", help="deploy the pipeline on a Prefect work pool (serve.cron schedule); "
                                           "`prefect worker start --pool POOL` processes run it")
    _common(deploy)
    deploy.add_argument("--pool", default="kdprune", help="work pool (created as type process if missing)")
    deploy.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    deploy.add_argument("--source", default=None,
                        help="where workers get the code: this folder (default) or a git URL they can clone")
    predict = sub.add_parser("predict", help="print the class and probability of each image")
    predict.add_argument("--model", default=None, metavar="models:/NAME@ALIAS | PATH",
                         help="a registered model (MLFLOW_TRACKING_URI's registry) or a model file such as "
                              "models/pruned.pt (default: models:/<registry.model_name>@<registry.alias> of params)")
    predict.add_argument("-p", "--params", default="params.yaml", help="params file, for the default model")
    predict.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a param, e.g. -S registry.alias=candidate (repeatable)")
    predict.add_argument("--debug", action="store_true", help="full tracebacks (also: KDPRUNE_DEBUG=1)")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    return parser


def predict_command(args: argparse.Namespace) -> None:
    """One line per image: path, class, probability (tab-separated)."""
    from kdprune.predict import predict

    model, data = args.model, None
    if model is None:  # the project's champion: it must fit the project's data, when that is prepared here
        from kdprune import config
        from kdprune.project import Paths

        registry = config.load(args.params, args.overrides).registry
        model, data = f"models:/{registry.model_name}@{registry.alias}", Paths(Path(".")).prepared
    for path, label, probability in predict(model, args.images, data):
        print(f"{path}\t{label}\t{probability:.4f}")


def tracking_on(args: argparse.Namespace) -> bool:
    return not (args.no_tracking or os.environ.get("KDPRUNE_TRACKING", "").lower() in ("off", "0", "false"))


def tracker_for(args: argparse.Namespace, params=None):
    """MLflow unless switched off; a stage run nests under $KDPRUNE_PARENT_RUN_ID when set, else, when DVC runs
    it (`dvc repro`, `dvc exp run`), under one parent run per DVC invocation / experiment."""
    from kdprune import distributed
    from kdprune.lineage import dvc_context, dvc_invocation, run_context
    from kdprune.tracking import MlflowTracker, NullTracker

    if not tracking_on(args) or not distributed.is_main():  # under torchrun only rank 0 logs
        return NullTracker()
    tracker = MlflowTracker(run_id=os.environ.get("KDPRUNE_PARENT_RUN_ID") or None)
    key = None if tracker.run_id else dvc_invocation()
    if key:
        exp = dvc_context().get("kdprune.dvc_exp")
        context = {k: v for k, v in run_context().items() if k != "kdprune.dvc_stage"}
        tracker.run_id = tracker.group_run(key, f"dvc exp run {exp}" if exp else "dvc repro", context,
                                           params.model_dump() if params is not None else None)
    return tracker


def project_drivers() -> bool:
    """Make the Prefect drivers importable; False when they are absent.

    flows/ and tasks/ are folders of the project checkout beside kdprune/, not installed packages (generic
    top-level names like `tasks` would shadow, or be shadowed by, a user's own modules): the checkout goes first
    on sys.path of the kdprune process, whose workers inherit it.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "flows" / "pipeline.py").is_file():
        return False
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return True


def _drivers() -> None:
    if not project_drivers():
        raise KdpruneError("run, serve and deploy need the project checkout (flows/ beside kdprune/): "
                           "install it with `pip install -e .` from a clone")


def _run_one_stage(name, params, paths, tracker, device) -> dict:
    from kdprune.runner import SEARCH_STAGES, run_stage

    if name in SEARCH_STAGES and params.search.enabled and params.search.runner != "threads":
        # processes or Dask: trial workers on Prefect's task runner (threads need nothing beyond the core)
        try:
            if not project_drivers():
                raise ImportError("flows/ is not beside kdprune/")
            from flows.search import run_search
        except ImportError as error:
            raise KdpruneError(f"search.runner: {params.search.runner} runs its workers through Prefect, which is "
                               f"not available here ({error}); install the project (`bash scripts/setup.sh`) or "
                               "use search.runner: threads") from None
        return run_search(name, params, paths, tracker, device)
    return run_stage(name, params, paths, tracker, device)


def _distributed_setup(args: argparse.Namespace, params, device):
    """Under torchrun (WORLD_SIZE > 1): only training stages, each rank on its device in one process group."""
    from kdprune import distributed

    if distributed.world_size() > 1 and getattr(args, "name", None) not in DATA_PARALLEL_STAGES:
        what = " ".join([args.command, getattr(args, "name", "")]).strip()
        raise KdpruneError(f"torchrun runs only the training stages ({', '.join(DATA_PARALLEL_STAGES)}): "
                           f"run `kdprune {what}` without it")
    if distributed.world_size() > 1 and args.name == "prune" and params.prune.latency_target is not None:
        # each rank would time its own copy and could cut different channels: the ranks' models would not match
        raise KdpruneError("prune.latency_target measures latency in each process: run the prune stage without "
                           "torchrun (or prune to prune.target, a MACs fraction)")
    return distributed.setup(device)


def os_error_line(error: OSError) -> str:
    """'path: No space left on device' - the file and the reason, without the errno noise."""
    where = error.filename if error.filename is not None else ""
    reason = error.strerror or str(error)
    return f"{where}: {reason}" if where else reason


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "predict":
        predict_command(args)
        return 0
    from contextlib import nullcontext

    from kdprune import config, distributed
    from kdprune import data as data_mod
    from kdprune.lock import project_lock
    from kdprune.project import Paths, resolve_device

    if args.smoke:
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
    params = config.load(args.params, args.overrides)
    device = _distributed_setup(args, params, resolve_device(args.device))
    if args.command == "serve":
        _drivers()
        from flows.pipeline import serve

        serve(args.params, params.serve.cron, args.overrides, args.device, tracking=tracking_on(args))
        return 0
    if args.command == "deploy":
        _drivers()
        from flows.deployment import deploy

        deployment_id = deploy(args.params, args.overrides, params.serve.cron, pool=args.pool, name=args.name,
                               source=args.source, device=args.device, tracking=tracking_on(args))
        print(f"deployment kdprune-pipeline/{args.name} ({deployment_id}) on work pool {args.pool!r}, "
              f"cron {params.serve.cron!r}; start workers with: prefect worker start --pool {args.pool}")
        return 0
    if args.command == "run" or args.name == "prepare":
        data_mod.check_source(params.data)  # a missing path or unreadable archive fails before any server starts
    what = f"kdprune {args.command}" + (f" {args.name}" if args.command == "stage" else "")
    # under torchrun, rank 0 holds the project lock for all the ranks of its stage
    with project_lock(Path("."), what) if distributed.is_main() else nullcontext():
        tracker = tracker_for(args, params)  # MLflow's store is checked here: an unreachable one fails in seconds
        tracker.close_orphans()  # runs left RUNNING by a killed kdprune process
        if args.command == "stage":
            from kdprune.lineage import check_inputs_unchanged, inputs_fingerprint

            before = inputs_fingerprint(args.params)
            summary = _run_one_stage(args.name, params, Paths(Path(".")), tracker, device)
            if args.name == "evaluate" and isinstance(summary.get("models"), dict) and tracker.run_id:
                # the parent run (a `dvc exp run`'s, a `dvc repro`'s) carries the report's numbers, as the flow's does
                from kdprune.run_metrics import report_metrics

                tracker.log_metrics(report_metrics(summary))
                tracker.set_tags({"kd_gain": summary.get("kd_gain", {}).get("verdict", "")})
            check_inputs_unchanged(before, args.params, what)  # else `dvc repro` would record what was not used
            if distributed.is_main():
                print(f"{args.name}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))
        else:
            _drivers()
            from flows.pipeline import run_pipeline

            run_pipeline(params_path=args.params, overrides=args.overrides, device=str(device),
                         tracking=tracking_on(args), force=args.force, debug=args.debug)
        not_logged = tracker.not_logged()
    if not_logged:  # the outputs are saved; say once what the tracking server did not get
        print(f"kdprune: error: {not_logged}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    telemetry_off()
    exit_on_sigterm()
    args = make_parser().parse_args(argv)
    args.debug = args.debug or os.environ.get("KDPRUNE_DEBUG", "").lower() in ("1", "true", "on")
    try:
        return _dispatch(args)
    except KdpruneError as error:
        line, code, caught = str(error), 2, error
    except OSError as error:  # a project file that cannot be read or written: full disk, read-only folder
        line, code, caught = os_error_line(error), 2, error
    except KeyboardInterrupt as error:
        line, code, caught = "interrupted (SIGINT); open runs were marked KILLED", 130, error
    except SystemExit as error:
        if error.code != 143:
            raise
        line, code, caught = "terminated (SIGTERM); open runs were marked FAILED", 143, error
    if args.debug:
        import traceback

        traceback.print_exception(caught)
    print(f"kdprune: error: {line}", file=sys.stderr)
    if argv is None and code in (130, 143):
        # Interrupted as a command: the runs are marked and the server stopped, so skip the interpreter's teardown,
        # which took about 20 s after a signal (library threads and atexit hooks).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
