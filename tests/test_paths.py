"""Workdirs on a bucket: `dpo_jax.paths` and a whole run with its workdir at `gs://bucket/run`.

The bucket is a fake: fsspec's `gs`/`gcs` protocol (what `epath.Path('gs://...')` opens through
its fsspec backend) is bound to a directory of the test, with object-store rules (no append
mode), and orbax's TensorStore GCS driver spec is pointed at the same directory. So the code
runs the `gs://` branches of epath and orbax (commit_success.txt instead of renames); a write
that bypassed epath (a plain `open` or `os.makedirs` on the URI) would land under the working
directory as `gs:/...`, which the tests check stays empty.
"""

import json
import os
import sys

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend

from dpo_jax import paths


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The fake bucket root: `gs://b/x` is `<root>/b/x`; yields the root (a pathlib.Path)."""
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from orbax.checkpoint._src.path import gcs_utils

    root = tmp_path / "bucket_root"
    root.mkdir()

    class FakeGCS(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):
            path = path[0] if isinstance(path, list) else os.fspath(path)
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    path = path[len(prefix):]
            return path.rstrip("/")

        def open(self, path, mode="rb", *args, **kwargs):
            if "a" in mode or "+" in mode:
                raise NotImplementedError(f"object stores cannot open {path} in mode {mode!r}")
            return super().open(path, mode, *args, **kwargs)

    registry = sys.modules["fsspec.registry"]
    saved = {k: registry._registry.get(k) for k in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda p: {"driver": "file", "path": str(root / str(p).removeprefix("gs://"))})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:9")  # a missed gcs access fails fast
    monkeypatch.setenv(paths.LOCAL_DIR_ENV, str(tmp_path / "local"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    for name, cls in saved.items():
        if cls is None:
            registry._registry.pop(name, None)
        else:
            registry._registry[name] = cls
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert not list(cwd.iterdir()), f"written beside epath: {list(cwd.rglob('*'))}"


def test_helpers_on_the_bucket(bucket):
    run = "gs://b/run"
    assert not paths.is_local(run) and paths.is_local("/tmp/x") and paths.is_local("rel/x")
    assert paths.join(run, "a", "b.txt") == "gs://b/run/a/b.txt"
    assert isinstance(paths.path(run), epath.Path)
    paths.write_text(paths.join(run, "x.json"), "{}")
    paths.append_text(paths.join(run, "m.jsonl"), "1\n")
    paths.append_text(paths.join(run, "m.jsonl"), "2\n")  # no append mode there: read and rewrite
    assert (bucket / "b/run/x.json").read_text() == "{}"
    assert (bucket / "b/run/m.jsonl").read_text() == "1\n2\n"
    assert paths.exists(paths.join(run, "x.json")) and not paths.exists(paths.join(run, "y"))
    with pytest.raises(NotImplementedError):
        with paths.path(paths.join(run, "m.jsonl")).open("a") as f:
            f.write("3\n")


def test_local_dir_upload_and_local_copy(bucket, tmp_path):
    local = paths.local_dir("gs://b/run", "data")
    assert local.startswith(str(tmp_path / "local")) and local.endswith("data")
    assert local != paths.local_dir("gs://b/run2", "data")
    assert paths.local_dir("/x/run", "data") == "/x/run/data"
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 100)
    paths.upload_dir(src, "gs://b/run/final")
    assert (bucket / "b/run/final/sub/w.bin").read_bytes() == b"\0" * 100
    copy = paths.local_copy("gs://b/run/final")
    assert open(os.path.join(copy, "sub", "w.bin"), "rb").read() == b"\0" * 100
    assert os.path.exists(os.path.join(copy, "config.json"))
    assert paths.local_copy(str(src)) == str(src)


def test_metrics_writer_and_tensorboard_on_the_bucket(bucket):
    from dpo_jax.train import metrics

    w = metrics.Writer("gs://b/run", tensorboard=True)
    for step in range(1, 5):
        w.write(step, {"loss": 1.0 / step})
    w.truncate_after(2)
    w.close()
    rows = metrics.read_jsonl("gs://b/run/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    events = list((bucket / "b/run/tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_wandb_run_id_on_the_bucket_and_its_files_local(bucket, tmp_path):
    from dpo_jax.train import trackers

    rid = trackers.run_id("gs://b/run")
    assert (bucket / "b/run" / trackers.RUN_ID_FILE).read_text().strip() == rid
    assert trackers.run_id("gs://b/run") == rid
    pytest.importorskip("wandb")
    t = trackers.WandbTracker("gs://b/run", {"mode": "offline"})
    try:
        assert t.run_id == rid
        assert str(t.run.dir).startswith(str(tmp_path / "local"))
    finally:
        t.close()


def test_reference_cache_on_the_bucket(bucket):
    from dpo_jax.train import reference_cache

    values = {k: np.arange(3, dtype=np.float32) + i for i, k in enumerate(reference_cache.KEYS)}
    first = reference_cache.load_or_compute("gs://b/run/ref_cache", "k", lambda: values)
    assert (bucket / "b/run/ref_cache/k.npz").exists()
    again = reference_cache.load_or_compute("gs://b/run/ref_cache", "k", lambda: pytest.fail("recomputed"))
    for k in reference_cache.KEYS:
        np.testing.assert_array_equal(again[k], first[k])


def _config(steps):
    from configs import synthetic

    c = synthetic.get_config("runlocal=1")
    c.sft.update(steps=2, batch_size=8)
    c.train.update(steps=steps, checkpoint_every=2, log_every=1, progress=False, keep_checkpoints=10)
    c.eval.num_prompts = 0
    return c


def test_run_with_its_workdir_on_the_bucket_resumes_from_it(bucket, monkeypatch):
    """A tiny run (SFT stage, preference stage, export) writes every file to gs://b/run; a run
    with more steps resumes from the bucket's checkpoint; the same config again writes nothing."""
    from dpo_jax import runner
    from dpo_jax.train import checkpoint

    report = runner.run(_config(4), "gs://b/run")
    run = bucket / "b/run"
    for name in ("config.json", "run_info.json", "metrics.jsonl", "report.json", "final/config.json",
                 "sft/model/config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert (run / "checkpoints/4/commit_success.txt").exists()  # orbax's object-store commit
    assert list((run / "sft/checkpoints").iterdir())
    assert list((run / "final").glob("*.safetensors"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    restored = []
    restore_latest = checkpoint.Checkpointer.restore_latest

    def spy(self, *args, **kwargs):
        found = restore_latest(self, *args, **kwargs)
        restored.append((self.directory, found and found[0]))
        return found

    monkeypatch.setattr(checkpoint.Checkpointer, "restore_latest", spy)
    assert runner.run(_config(6), "gs://b/run")["steps"] == 6
    assert ("gs://b/run/checkpoints", 4) in restored
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r and "sft/loss" not in r]
    assert sorted(steps) == sorted(set(steps)) and max(steps) == 6
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert runner.run(_config(6), "gs://b/run")["steps"] == 6  # finished: nothing run or written
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
