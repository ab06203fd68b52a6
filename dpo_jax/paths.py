"""Workdir paths: every file a run writes goes through `etils.epath`, so a workdir is a local
directory or a bucket URI (`gs://bucket/run`; `s3://`, `az://` likewise) with the same code.

The rule, in one place:
- Files of the run (config.json, run_info.json, metrics.jsonl, report.json, wandb_run_id, the
  reference cache, TensorBoard events, the exported models, checkpoints through orbax) are read
  and written with `path(...)`, never with `open` / `os.path` on the workdir string.
- Object stores cannot append or rename atomically: `append_text` rewrites the whole object
  there (metrics.jsonl is small), `write_text` writes the object in one piece (a local file goes
  through a temporary file and `os.replace`, as before).
- Libraries that need a local directory get one from `local_dir(workdir, name)`: the workdir's own
  subdirectory when it is local, else a per-workdir directory under `$DPO_JAX_LOCAL_DIR` (default
  `<tmp>/dpo_jax`) on this machine. Used for the synthetic data files and tokenizer (read by
  `datasets` / `transformers`), the W&B run directory, the Hugging Face exports (written locally,
  then copied with `upload_dir`) and models read back from the workdir (`local_copy`).
- TensorBoard: tensorboardX opens `<scheme>://` event files through a writer factory;
  `tensorboard_logdir` registers one that writes through epath (the whole event file per flush,
  as tensorboardX's own GCS writer does).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]
LOCAL_DIR_ENV = "DPO_JAX_LOCAL_DIR"


def path(p: PathLike) -> epath.Path:
    """The epath of `p` (a local path or a `scheme://` URI)."""
    return epath.Path(os.fspath(p)) if not isinstance(p, epath.Path) else p


def is_local(p: PathLike) -> bool:
    """Whether `p` is a local path (no `scheme://`)."""
    return "://" not in os.fspath(p)


def join(p: PathLike, *parts: str) -> str:
    """`p / parts` as a string (a URI stays a URI)."""
    return os.fspath(path(p).joinpath(*parts))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def write_bytes(p: PathLike, data: bytes) -> None:
    """Write `data` whole: readers never see half a file (local: temporary file and os.replace;
    an object store: one object, written on close)."""
    p = path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(p):
        p.write_bytes(data)
        return
    tmp = f"{p}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, p)


def write_text(p: PathLike, text: str) -> None:
    """`write_bytes` of `text` in UTF-8."""
    write_bytes(p, text.encode("utf-8"))


def append_text(p: PathLike, text: str) -> None:
    """Append `text` to `p` (an object store: read and rewrite the object)."""
    p = path(p)
    if is_local(p):
        with open(p, "a") as f:
            f.write(text)
        return
    p.write_text((p.read_text() if p.exists() else "") + text)


def local_root() -> str:
    """This machine's directory for local copies: `$DPO_JAX_LOCAL_DIR`, default `<tmp>/dpo_jax`."""
    return os.environ.get(LOCAL_DIR_ENV) or os.path.join(tempfile.gettempdir(), "dpo_jax")


def local_dir(workdir: PathLike, name: str) -> str:
    """A local directory for `name` of `workdir`: workdir/name when the workdir is local, else
    `$DPO_JAX_LOCAL_DIR/<workdir, readable>-<hash>/name` on this machine."""
    if is_local(workdir):
        return os.path.join(os.fspath(workdir), name)
    uri = os.fspath(workdir).rstrip("/")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[1])[-80:]
    return os.path.join(local_root(), f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}", name)


def upload_dir(local: PathLike, dest: PathLike) -> None:
    """Copy the files of the local directory `local` to `dest` (any filesystem), replacing files
    of the same name; `config.json`, the mark of a complete model, is written last."""
    local = os.fspath(local)
    files = sorted((os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs),
                   key=lambda rel: (rel == "config.json", rel))
    for rel in files:
        out = path(dest) / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(local, rel), "rb") as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst)


def local_copy(p: PathLike) -> str:
    """`p` itself when local, else a local copy of the directory `p` (`local_dir(p, "copy")`; a
    file is fetched again when its size differs, each one written whole, so processes on one
    machine may copy at once)."""
    if is_local(p):
        return os.fspath(p)
    src, dest = path(p), local_dir(p, "copy")
    for f in _files(src):
        out = os.path.join(dest, os.fspath(f.relative_to(src)))
        if os.path.exists(out) and os.path.getsize(out) == f.stat().length:
            continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        with f.open("rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, out)
    return dest


def _files(p: epath.Path) -> list[epath.Path]:
    """Every file under the directory `p` (epath allows no recursive glob on object stores)."""
    out = []
    for child in sorted(p.iterdir()):
        out.extend(_files(child) if child.is_dir() else [child])
    return out


# ------------------------------------------------------------------------------ TensorBoard

class _EpathRecordWriter:
    """A tensorboardX record file on any epath filesystem: buffered, the whole file written per flush."""

    def __init__(self, p: str):
        self.path, self.buffer, self.closed = path(p), io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _EpathRecordWriterFactory:
    def open(self, p: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(p)

    def directory_check(self, p: str) -> None:
        path(p).mkdir(parents=True, exist_ok=True)


def tensorboard_logdir(p: PathLike) -> str:
    """The logdir to give tensorboardX's SummaryWriter for `p`: a local path as is; for a URI its
    scheme is routed through epath (tensorboardX's own gs:// writer needs google-cloud-storage)."""
    p = os.fspath(p)
    if not is_local(p):
        from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

        record_writer.register_writer_factory(p.split("://", 1)[0], _EpathRecordWriterFactory())
    return p
