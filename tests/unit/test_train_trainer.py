"""Driver-side helpers: sizing the run and reading the traces' manifest without loading rows."""

import pytest

from r2d.config import load_config
from r2d.train.trainer import count_rows, parquet_files, planned_steps, read_manifest, traces_uri
from r2d.train.synthetic import write_synthetic_traces


def test_planned_steps_from_epochs_or_max_steps():
    cfg = load_config(None, ["train.epochs=2", "train.batch_size=4", "train.grad_accum=2",
                             "resources.train_workers=2"])
    # 2 epochs x 100 rows / (4 x 2 x 2 rows per step) = 12.5 -> 13
    assert planned_steps(cfg, 100) == 13
    assert planned_steps(load_config(None, ["train.max_steps=7"]), 100) == 7


def test_rows_and_manifest_come_from_files_not_rows(tmp_path):
    folder = write_synthetic_traces(tmp_path / "t", 10, distill_run_id="abc")
    assert count_rows(*parquet_files(str(folder))) == 10  # manifest.json beside the Parquet is not read as data
    # what distillation leaves beside the data: drop records, engine errors, an unfinished chunk
    (folder / "drops").mkdir()
    (folder / "drops" / "chunk-1.jsonl").write_text('{"prompt_id": "x", "reason": "too_long"}\n')
    (folder / "errors.jsonl").write_text('{"prompt_id": "y", "error": "boom"}\n')
    (folder / "_tmp" / "chunk-2").mkdir(parents=True)
    (folder / "_tmp" / "chunk-2" / "part.parquet").write_bytes(b"PAR1 half written")
    assert count_rows(*parquet_files(str(folder))) == 10
    assert all(f.endswith(".parquet") and "/_tmp/" not in f for f in parquet_files(str(folder))[0])
    manifest = read_manifest(str(folder))
    assert manifest["mlflow_run_id"] == "abc" and len(manifest["digest"]) == 64
    assert read_manifest(str(tmp_path)) == {}
    with pytest.raises(FileNotFoundError, match="train.traces"):
        parquet_files(str(tmp_path / "missing"))


def test_traces_default_to_the_distillation_output(tmp_path, monkeypatch):
    monkeypatch.setenv("R2D_WORKDIR", str(tmp_path))
    assert traces_uri(load_config(None, [])) == str(tmp_path / ".r2d/traces/tiny")
    assert traces_uri(load_config(None, ["train.traces=s3://b/t"])) == "s3://b/t"


def test_source_digest_follows_the_files_it_names(tmp_path, monkeypatch):
    from r2d import runtime

    def package(name: str, loop: str):
        """A package folder with train/loop.py, losses.py and a non-source file; the digest is read there."""
        root = tmp_path / name
        (root / "train").mkdir(parents=True)
        (root / "train" / "loop.py").write_text(loop)
        (root / "losses.py").write_text("y = 2\n")
        (root / "notes.txt").write_text(f"not source: {name}\n")
        monkeypatch.setattr(runtime, "package_dir", lambda: root)

    package("a", "x = 1\n")
    first = runtime.source_digest("train", "losses.py")
    assert runtime.source_digest("losses.py", "train") == first  # order does not matter
    assert runtime.source_digest("train") != first
    package("b", "x = 1\n")  # the same source elsewhere (another non-source file): the same digest
    assert runtime.source_digest("train", "losses.py") == first
    package("c", "x = 3\n")  # one byte changed in a named file: another
    assert runtime.source_digest("train", "losses.py") != first
    with pytest.raises(FileNotFoundError, match="'gone.py'"):
        runtime.source_digest("gone.py")


def test_reuse_keys_name_real_source_and_change_with_it(monkeypatch):
    """A finished training or evaluation is not reused once the code that made it changed."""
    from r2d import runtime
    from r2d.eval.evaluate import EVAL_SOURCE, eval_key, make_targets
    from r2d.train.run_log import TRAINING_SOURCE, train_key

    runtime.source_digest(*TRAINING_SOURCE)  # every name exists in the package
    runtime.source_digest(*EVAL_SOURCE)
    cfg = load_config(None, [])
    target = make_targets(cfg, [cfg.model.source])[0]
    before = train_key(cfg, "digest"), eval_key(cfg, target, "suites")
    monkeypatch.setattr(runtime, "source_digest", lambda *names: "changed")
    after = train_key(cfg, "digest"), eval_key(cfg, target, "suites")
    assert before[0] != after[0] and before[1] != after[1]


def test_checkpoints_of_other_settings_under_the_run_name_are_refused(tmp_path):
    """Ray Train resumes whatever the run folder holds: the newest checkpoint of another train key would be
    trained on and registered as this run's. The driver refuses it, naming the field and the way out."""
    import json

    from r2d.config import ConfigError
    from r2d.train.trainer import check_resumable

    cfg = load_config(None, [f"train.storage_path={tmp_path}", "train.run_name=demo"])
    check_resumable(cfg, "new")  # no folder yet: a fresh run
    run = tmp_path / "demo"
    (run / "_lease.json").parent.mkdir()
    (run / "_lease.json").write_text("{}")
    for name, key in [("checkpoint_2026-12-01_10-00-00.000001", "new"),
                      ("checkpoint_2026-12-01_11-00-00.000001", "old")]:
        (run / name).mkdir()
        (run / name / "state.json").write_text(json.dumps({"step": 10, "train_key": key}))
    with pytest.raises(ConfigError, match=rf"^train.run_name: 'demo' holds checkpoints of a run with other settings, "
                                          rf"student, traces or training code \(train key old; this run's is new\) "
                                          rf"in {run}; .* another train.run_name, or remove that folder"):
        check_resumable(cfg, "new")
    check_resumable(cfg, "old")  # the newest checkpoint is its own: resumed
    (run / "checkpoint_2026-12-01_11-00-00.000001" / "state.json").write_text(json.dumps({"step": 10}))
    check_resumable(cfg, "new")  # written before checkpoints stored the key: resumed as before
