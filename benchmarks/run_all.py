"""``make bench``: every benchmark section, one results file, one table.

    python benchmarks/run_all.py [--quick] [--only distill,train,serve,engines] [--gpu]

Each section runs in its own Python process (its own Ray, its memory returned when it
ends) and hands back its rows as JSON. The results land in
``benchmarks/results/<YYYY-MM-DD>.json`` with the machine, load, versions and commit;
the Markdown table is printed and saved beside it. A section that fails becomes a row
saying so; the others still run. A missed target gets a profile under
``benchmarks/results/profiles/`` (torch.profiler for training, py-spy for the pipelines).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, Row, format_table, machine_info, py_spy_record, repo_path  # noqa: E402

SECTIONS = {"distill": "bench_distill.py", "train": "bench_train.py", "serve": "bench_serving.py",
            "engines": "bench_engines.py"}
"""--only name -> the script that measures it."""


def run_section(name: str, quick: bool, gpu: bool, timeout_s: float) -> tuple[list[Row], float]:
    """Run one section's script in a child process; returns its rows and wall seconds."""
    script = Path(__file__).resolve().parent / SECTIONS[name]
    out = RESULTS / f".rows-{name}.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, str(script), "--rows-json", str(out), "--profile-dir", str(RESULTS / "profiles")]
    argv += ["--quick"] if quick else []
    argv += ["--gpu"] if gpu and name == "train" else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, timeout=timeout_s, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        log = proc.stdout
    except subprocess.TimeoutExpired as err:
        log = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        proc = None
    seconds = time.perf_counter() - start
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    (RESULTS / "logs" / f"{name}.log").write_text(log)
    for line in log.splitlines():
        if line.startswith("  "):  # the section's own progress lines
            print(line, flush=True)
    if out.exists():
        rows = [Row(**{k: v for k, v in r.items() if k not in ("ratio", "met")}) for r in json.loads(out.read_text())]
        out.unlink()
        return rows, seconds
    why = "timed out" if proc is None else f"exit {proc.returncode}: {log.strip().splitlines()[-1:] or ''}"
    return [Row(name, "section failed", None, "", note=f"{why}; see results/logs/{name}.log")], seconds


def profile_missed(rows: list[Row]) -> None:
    """py-spy the distillation pipeline when its target was missed (training profiles itself)."""
    missed = [r for r in rows if r.met is False and r.section == "distill" and "transformers" in r.name]
    if not missed:
        return
    # A short run is enough to show where the time goes (the profile is a share, not a rate).
    argv = [sys.executable, str(Path(__file__).resolve().parent / "bench_distill.py"), "--child", "ours-transformers",
            "--n", "8", "--max-tokens", "16"]
    path = py_spy_record(argv, RESULTS / "profiles" / "distill-ours-transformers.pyspy.txt")
    for r in missed:
        r.extra["profile"] = repo_path(path) if path else "py-spy not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a few minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--gpu", action="store_true", help="also run training on CUDA in bf16 (skipped without)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per section")
    parser.add_argument("--no-profile", action="store_true", help="do not profile missed targets")
    parser.add_argument("--merge", action="store_true",
                        help="replace only these sections' rows in today's results file, keep the others")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; expected some of {list(SECTIONS)}")

    # 1. where and on what
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"bench: {info['cpus']} cpus, load {info.get('load_avg_1m', '?')}, commit {info['commit']}, "
          f"cuda {info['cuda']}", flush=True)

    # 2. every section in its own process
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for name in names:
        print(f"[{name}]", flush=True)
        got, seconds[name] = run_section(name, args.quick, args.gpu, args.timeout)
        rows += got
    if not args.no_profile:
        profile_missed(rows)

    # 3. results file and table
    path = RESULTS / f"{date.today().isoformat()}{'-quick' if args.quick else ''}.json"
    reruns = {}
    if args.merge and path.exists():  # earlier sections kept, in their order; these replace their own rows
        old = json.loads(path.read_text())
        kept = [Row(**{k: v for k, v in r.items() if k not in ("ratio", "met")}) for r in old["rows"]]
        new = {r.section for r in rows}
        order = list(dict.fromkeys([*(r.section for r in kept), *(r.section for r in rows)]))
        rows = [r for sec in order for r in (rows if sec in new else kept) if r.section == sec]
        seconds = {**old.get("section_seconds", {}), **seconds}
        reruns = {**old.get("reruns", {}), **{n: info["commit"] for n in names}}
        info = {**old["machine"], "rerun_machine": info}
    table = format_table(rows)
    result = {"date": date.today().isoformat(), "quick": args.quick, "machine": info,
              "load_avg_1m_end": _load(), "section_seconds": seconds, "total_seconds": time.perf_counter() - started,
              "reruns": reruns, "rows": [r.as_dict() for r in rows], "table": table}
    path.write_text(json.dumps(result, indent=2, default=str))
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {path.relative_to(ROOT)} in {result['total_seconds']:.0f}s")
    return 0


def _load() -> float | None:
    try:
        import os

        return os.getloadavg()[0]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
