"""`r2d submit`: `ray job submit` with the working directory, the upload's excludes and the git commit."""

from __future__ import annotations

import json
import subprocess

from r2d.cli import UPLOAD_EXCLUDES, submit_command
from r2d.run_tags import COMMIT_ENV, git_commit


def test_the_commit_travels_in_the_jobs_environment(tmp_path):
    """Under --working-dir the job runs in a copy without .git: the commit must go with it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()

    cmd = submit_command(["python", "jobs/distill.py", "--config", "x.yaml"], address="http://h:8265",
                         working_dir=str(repo), no_wait=True, submission_id="s1", excludes=["tests"])
    assert cmd[:3] == ["ray", "job", "submit"] and cmd[-5:] == ["--", "python", "jobs/distill.py", "--config", "x.yaml"]
    runtime_env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"] == {COMMIT_ENV: head}
    assert runtime_env["excludes"] == [*UPLOAD_EXCLUDES, "tests"] and ".git" in UPLOAD_EXCLUDES
    for flag, value in (("--working-dir", str(repo)), ("--address", "http://h:8265"), ("--submission-id", "s1")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--no-wait" in cmd

    (repo / "a.txt").write_text("changed")  # uncommitted work is marked, not passed off as the commit
    again = submit_command(["python", "x.py"], working_dir=str(repo))
    dirty = json.loads(again[again.index("--runtime-env-json") + 1])["env_vars"][COMMIT_ENV]
    assert dirty == f"{head}+dirty" == git_commit(mark_dirty=True, cwd=str(repo))


def test_submit_parses_through_the_cli_entry_point(capsys):
    """`r2d submit` goes through the same main() as the other subcommands (which take dotted overrides)."""
    from r2d.cli import main

    assert main(["submit", "--address", "http://127.0.0.1:1"]) == 2  # no job after --: one line, exit 2
    assert "give the job after --" in capsys.readouterr().err
