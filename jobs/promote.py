"""Promote a candidate model version to champion when it passes the gates, or roll back.

    python jobs/promote.py --config jobs/configs/tiny.yaml --candidate models:/r2d@challenger
    python jobs/promote.py --config jobs/configs/tiny.yaml --candidate models:/r2d@challenger --dry-run
    python jobs/promote.py --config jobs/configs/tiny.yaml --rollback

Exit codes: 0 promoted, already the champion, or rolled back; 1 not promoted (the reason names
the gate and the amount); 2 bad input (unknown model or alias, unreachable tracking server, bad config).
"""

import argparse
import sys

from r2d.cli import add_promote_args
from r2d.config import load_config_or_exit
from r2d.registry.promote import run_promotion
from r2d.tracking import TrackingError


def main(argv=None) -> int:
    # 1. config
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_promote_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(args.config, args.overrides, parser.prog)
    try:
        candidate = args.candidate or f"models:/{cfg.tracking.registered_model}@challenger"
        # 2. work: roll back, or evaluate/reuse, gate and move the alias (the flow `r2d promote` runs)
        code, report = run_promotion(cfg, candidate, args.dry_run, args.rollback, args.reuse_only, args.suite_digest)
    except TrackingError as err:
        print(f"promote: error: {err}", file=sys.stderr)
        return 2
    # 3. report
    print(report)
    return code


if __name__ == "__main__":
    sys.exit(main())
