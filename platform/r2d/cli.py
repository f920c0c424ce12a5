"""The ``r2d`` command: preflight, job submission, registry lineage and promotion from a shell.

    r2d check --config FILE [--config OVERRIDES] [--cluster cluster.yaml] [key=value ...]
    r2d submit [--address URL] [--no-wait] -- python jobs/train_cpo.py --config FILE
    r2d lineage models:/r2d@champion            # back to traces, teacher and prompt sources
    r2d lineage --traces-digest 3f2a9c...       # forward to every model trained on those traces
    r2d promote --candidate models:/r2d@challenger [--dry-run] [--config FILE] [key=value ...]
    r2d promote --rollback [--dry-run]

Exit codes: 0 done (checked clean, submitted, promoted, already the champion, rolled back, printed),
1 problems found or candidate not promoted, 2 bad input (unknown model, alias or version, unreachable
tracking server, bad config: one line).
"""

from __future__ import annotations

import argparse
import json
import sys

from r2d.config import ConfigError, load_config
from r2d.tracking import TrackingError, connect


def _lineage(args) -> int:
    from r2d.registry.lineage import format_back, format_forward, trace_back, trace_forward

    cfg = load_config(args.config, args.overrides)
    client = connect(cfg.tracking.uri, cfg.tracking.connect_timeout_s)
    if args.traces_digest:
        result = trace_forward(client, args.traces_digest)
        text = format_forward(result)
    else:
        result = trace_back(client, args.model_uri)
        text = format_back(result)
    print(json.dumps(result, indent=2, default=str) if args.json else text)
    return 0


def add_promote_args(parser: argparse.ArgumentParser) -> None:
    """The promotion options, shared by ``r2d promote`` and jobs/promote.py."""
    parser.add_argument("--candidate", default="",
                        help="model URI to promote (default models:/<tracking.registered_model>@challenger)")
    parser.add_argument("--dry-run", action="store_true", help="decide and report; change nothing, evaluate nothing")
    parser.add_argument("--rollback", action="store_true", help="move champion back to the previous champion")
    parser.add_argument("--reuse-only", action="store_true",
                        help="never run evaluations; a version without one counts as partial data")
    parser.add_argument("--suite-digest", default=None, help="suite digest of the evaluations to compare "
                        "(default: computed from eval.suites)")
    parser.add_argument("--config", action="append", default=None,
                        help="YAML config file (defaults when omitted); repeat to lay an override file over it")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. gates.max_over_refusal=0.3")


def _promote(args) -> int:
    cfg = load_config(args.config, args.overrides)
    candidate = args.candidate or f"models:/{cfg.tracking.registered_model}@challenger"
    from r2d.registry.promote import run_promotion

    code, report = run_promotion(cfg, candidate, args.dry_run, args.rollback, args.reuse_only, args.suite_digest)
    print(report)
    return code


def _check(args) -> int:
    import yaml

    from r2d.preflight import check

    cfg = load_config(args.config, args.overrides)
    cluster = yaml.safe_load(open(args.cluster)) if args.cluster else None
    report = check(cfg, cluster, args.nodes)
    for line in report.lines():
        print(line)
    verdict = f"{len(report.problems)} problem(s)" if report.problems else "ready"
    print(f"r2d check: {verdict} ({', '.join(args.config or ['defaults'])}"
          f"{', cluster ' + args.cluster if args.cluster else ''})", file=sys.stderr)
    return 1 if report.problems else 0


UPLOAD_EXCLUDES = [".venv", ".git", ".r2d", "**/__pycache__", "*.egg-info", ".pytest_cache", "demo-report",
                   "ablation", "benchmarks/results"]
"""What `r2d submit` leaves out of the uploaded working directory (Ray's limit is 500 MiB)."""


def submit_command(entrypoint: list[str], address: str = "", working_dir: str = ".", no_wait: bool = False,
                   excludes: list[str] | None = None, submission_id: str = "", commit: str = "") -> list[str]:
    """The ``ray job submit`` command line: the working directory and, in its runtime env, the git commit.

    Under ``--working-dir`` the job runs in a copy without ``.git``; the commit travels in
    ``R2D_GIT_COMMIT`` so that the lineage of whatever the job produces names it.
    """
    from r2d.run_tags import COMMIT_ENV, git_commit

    runtime_env = {"excludes": [*UPLOAD_EXCLUDES, *(excludes or [])],
                   "env_vars": {COMMIT_ENV: commit or git_commit(mark_dirty=True, cwd=working_dir)}}
    cmd = ["ray", "job", "submit", "--working-dir", working_dir, "--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--address", address] if address else []
    cmd += ["--submission-id", submission_id] if submission_id else []
    cmd += ["--no-wait"] if no_wait else []
    return [*cmd, "--", *entrypoint]


def _submit(args) -> int:
    import shutil
    import subprocess

    entrypoint = [a for a in args.entrypoint if a != "--"] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        print("r2d submit: give the job after --, e.g. r2d submit -- python jobs/distill.py --config FILE",
              file=sys.stderr)
        return 2
    cmd = submit_command(entrypoint, args.address, args.working_dir, args.no_wait, args.exclude, args.submission_id)
    cmd[0] = shutil.which("ray") or cmd[0]
    print("r2d submit: " + " ".join(cmd[:3]) + " ... -- " + " ".join(entrypoint), file=sys.stderr)
    return subprocess.run(cmd).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="preflight: sources, models, storage, resources and gates, before ray up")
    chk.add_argument("--config", action="append", default=None,
                     help="YAML config file; repeat to lay an override file over it")
    chk.add_argument("--cluster", default="", help="Ray cluster launcher file (cluster.yaml) the run is meant for")
    chk.add_argument("--nodes", type=int, default=1, help="nodes the run spans (default: from --cluster, else 1)")
    chk.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.storage_path=s3://bucket/ckpt")
    chk.set_defaults(func=_check)
    sub_ = sub.add_parser("submit", help="ray job submit with the working directory and the git commit")
    sub_.add_argument("--address", default="", help="Ray dashboard address (default: RAY_ADDRESS)")
    sub_.add_argument("--working-dir", default=".", help="folder to upload (default: the current one)")
    sub_.add_argument("--no-wait", action="store_true", help="return once submitted")
    sub_.add_argument("--submission-id", default="", help="the job's submission id")
    sub_.add_argument("--exclude", action="append", default=[], help="more paths to leave out of the upload")
    sub_.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the job's command line")
    sub_.set_defaults(func=_submit)
    lin = sub.add_parser("lineage", help="print a model version's lineage, or the models trained on a traces digest")
    lin.add_argument("model_uri", nargs="?", default="", help="models:/name@alias or models:/name/version")
    lin.add_argument("--traces-digest", default="", help="search forward from this traces digest instead")
    lin.add_argument("--json", action="store_true", help="print the structured chain as JSON")
    lin.add_argument("--config", action="append", default=None, help="YAML config file (for tracking settings)")
    lin.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tracking.uri=http://127.0.0.1:5000")
    lin.set_defaults(func=_lineage)
    pro = sub.add_parser("promote", help="gate a candidate against the champion and move the alias")
    add_promote_args(pro)
    pro.set_defaults(func=_promote)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``r2d`` script."""
    parser = build_parser()
    # Overrides may follow the options (`r2d lineage models:/r2d@champion --config X a.b=c`),
    # which argparse leaves unparsed once a subcommand's positionals are filled.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):  # submit takes none: everything after -- is the job's
        args.overrides = [*args.overrides, *extra]
    if args.command == "lineage" and not (args.model_uri or args.traces_digest):
        parser.error("lineage: give a model URI (models:/r2d@champion) or --traces-digest DIGEST")
    if args.command == "lineage" and args.model_uri and "=" in args.model_uri:
        args.overrides, args.model_uri = [args.model_uri, *args.overrides], ""
        if not args.traces_digest:
            parser.error("lineage: give a model URI (models:/r2d@champion) or --traces-digest DIGEST")
    try:
        return args.func(args)
    except (TrackingError, ConfigError) as err:
        print(f"r2d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
