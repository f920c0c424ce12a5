"""Promote a candidate model version to champion when it passes the gates, or roll back.

    python jobs/promote.py --config jobs/configs/tiny.yaml --candidate models:/r2d@challenger
    python jobs/promote.py --config jobs/configs/tiny.yaml --candidate models:/r2d@challenger --dry-run
    python jobs/promote.py --config jobs/configs/tiny.yaml --rollback

Exit codes: 0 promoted or rolled back, 1 not promoted (the reason names the gate and the
amount), 2 bad input (unknown model or alias, unreachable tracking server, bad config).
"""

import argparse
import sys

from r2d.cli import add_promote_args
from r2d.config import ConfigError, load_config
from r2d.promote import promote, rollback
from r2d.tracking import TrackingError, connect


def main(argv=None) -> int:
    # 1. config
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_promote_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        candidate = args.candidate or f"models:/{cfg.tracking.registered_model}@challenger"
        # 2. registry (fails fast, naming the URI, when the tracking server is down)
        client = connect(cfg.tracking.uri, cfg.tracking.connect_timeout_s)
        # 3. work: roll back, or evaluate/reuse, gate and move the alias
        if args.rollback:
            out = rollback(cfg, client, cfg.tracking.registered_model, dry_run=args.dry_run)
            verb = "rolled back" if out["acted"] else "would roll back (dry run)"
            print(f"{verb}: {out['name']} champion v{out['from_version']} -> v{out['to_version']}")
            return 0
        result = promote(cfg, client, candidate, dry_run=args.dry_run, evaluate=not args.reuse_only,
                         suite_digest=args.suite_digest)
    except (TrackingError, ConfigError) as err:
        print(f"promote: error: {err}", file=sys.stderr)
        return 2
    # 4. report
    print(result.report())
    return 0 if result.decision.promoted else 1


if __name__ == "__main__":
    sys.exit(main())
