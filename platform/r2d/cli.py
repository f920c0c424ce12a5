"""The ``r2d`` command: registry lineage and promotion from a shell.

    r2d lineage models:/r2d@champion            # back to traces, teacher and prompt sources
    r2d lineage --traces-digest 3f2a9c...       # forward to every model trained on those traces
    r2d promote --candidate models:/r2d@challenger [--dry-run] [--config FILE] [key=value ...]
    r2d promote --rollback [--dry-run]

Exit codes: 0 done (promoted, already the champion, rolled back, printed), 1 candidate not promoted,
2 bad input (unknown model, alias or version, unreachable tracking server, bad config: one line).
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
    parser.add_argument("--config", default=None, help="YAML config file (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. gates.max_over_refusal=0.3")


def _promote(args) -> int:
    cfg = load_config(args.config, args.overrides)
    candidate = args.candidate or f"models:/{cfg.tracking.registered_model}@challenger"
    from r2d.registry.promote import run_promotion

    code, report = run_promotion(cfg, candidate, args.dry_run, args.rollback, args.reuse_only, args.suite_digest)
    print(report)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lin = sub.add_parser("lineage", help="print a model version's lineage, or the models trained on a traces digest")
    lin.add_argument("model_uri", nargs="?", default="", help="models:/name@alias or models:/name/version")
    lin.add_argument("--traces-digest", default="", help="search forward from this traces digest instead")
    lin.add_argument("--json", action="store_true", help="print the structured chain as JSON")
    lin.add_argument("--config", default=None, help="YAML config file (for tracking settings)")
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
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
