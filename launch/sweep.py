"""Sweeps: a config's `get_sweep(arg)` expanded into named runs, run here or printed for pods/clusters.

  python -m launch.sweep --config=configs/synthetic.py[:arg] --root=DIR [--parallel N] [--dry_run]
      [--config.KEY=VALUE ...] [--only NAME ...] [--seeds N] [--fused] [--print_pod | --print_slurm]

Declaring and expanding a sweep (`product`, `zip`, `expand`, run names, shared SFT models, the
launch order) is `sweep_plan.py`. DIR/manifest.json records the runs, their overrides, commands and
status.
`--config.KEY=VALUE` (the trainer's syntax) overrides KEY in every member, after the sweep's own values.
--seeds=N repeats every member with config `seed` = base + 0 .. N-1 (workdirs `NAME,seed=S`, each seed
its own SFT model); `launch.aggregate` reports per-seed rows and their means with standard errors.

Running (`run_local`): N processes at a time (default: 1 on an accelerator host, else min(2, CPU
cores)); a run with DIR/NAME/report.json is finished and skipped; an interrupted run (checkpoints,
no report) resumes by running its command again. The first member of a group sharing an SFT model
runs alone until the model appears (the trainer writes it atomically), then the rest start.
Local members share JAX's persistent compilation cache (DIR/jax_cache), so most compile nothing.
`run_local` is one executor of the expanded runs; `pod_script` and `slurm_script` print the others.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

from dpo_jax import multihost
from launch.manifest import initial_state, log_dir, write_manifest
from launch.sweep_plan import (Run, expand, launch_order, override_args, parse_config_args, run_status, sft_ready,
                               varying_keys)


# ----------------------------------------------------------------------------------------------
# The manifest and the local executor.

def run_local(runs: Sequence[Run], root: str, *, parallel: int = 1, meta: Optional[dict] = None,
              poll_s: float = 0.5, log: Callable[[str], None] = print,
              listed: Optional[Sequence[Run]] = None) -> dict[str, dict]:
    """Run the unfinished runs, `parallel` processes at a time; returns {name: state} (status,
    returncode, seconds, log). Output of each run goes to root/logs/NAME.log (`log_dir`). A run that needs an
    SFT model nobody has written yet waits while another run of its group is running (that one
    writes it). On SIGINT/SIGTERM every running child gets SIGTERM (it checkpoints and stops).
    The manifest lists `listed` (default: `runs`; the whole sweep when only some members run)."""
    if parallel < 1:
        raise ValueError(f"--parallel={parallel}; must be >= 1")
    meta = dict(meta or {})
    listed = list(listed if listed is not None else runs)
    state = initial_state(root, [*listed, *runs])
    queue = launch_order(runs)
    skipped = [r.name for r in runs if state[r.name]["status"] == "finished"]
    for name in skipped:
        log(f"skip (finished): {name}")
    os.makedirs(log_dir(root), exist_ok=True)
    running: dict[str, tuple[Run, subprocess.Popen, float, Any]] = {}
    write_manifest(root, listed, state, meta)

    def start(r: Run):
        log_path = os.path.join(log_dir(root), f"{r.name}.log")
        f = open(log_path, "a")  # pylint: disable=consider-using-with
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} ({state[r.name]['status']}) {r.command_line()}\n")
        f.flush()
        proc = subprocess.Popen(r.command, stdout=f, stderr=subprocess.STDOUT,  # pylint: disable=consider-using-with
                                env={**os.environ, **r.env}, start_new_session=True)
        running[r.name] = (r, proc, time.time(), f)
        state[r.name].update(status="running", log=log_path, pid=proc.pid)
        log(f"start [{len(running)} running] {r.name}")

    def finish(name: str, rc: int, stopped: bool = False):
        r, _, t0, f = running.pop(name)
        f.close()
        preempted = stopped or rc == multihost.PREEMPTED_EXIT  # checkpointed: a re-run resumes
        status = "finished" if run_status(r) == "finished" else ("failed" if rc and not preempted else "interrupted")
        state[name].update(status=status, returncode=rc, seconds=round(time.time() - t0, 1))
        state[name].pop("pid", None)
        log(f"{status} ({rc}) in {state[name]['seconds']:.0f} s: {name}  [log: {state[name]['log']}]")

    def ready(r: Run) -> bool:
        return sft_ready(r) or not any(o.sft_model_dir == r.sft_model_dir for o, *_ in running.values())

    try:
        while queue or running:
            for r in list(queue):
                if len(running) >= parallel:
                    break
                if ready(r):
                    queue.remove(r)
                    start(r)
                    write_manifest(root, listed, state, meta)
            time.sleep(poll_s)
            for name, (_, proc, _, _) in list(running.items()):
                if proc.poll() is not None:
                    finish(name, proc.returncode)
                    write_manifest(root, listed, state, meta)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM to the launcher (main)
        log(f"interrupted: stopping {len(running)} running runs (SIGTERM: they checkpoint and exit)")
        for _, proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for name, (_, proc, _, _) in list(running.items()):
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            finish(name, proc.returncode, stopped=True)
        write_manifest(root, listed, state, meta)
        raise
    return {r.name: state[r.name] for r in runs}


# ----------------------------------------------------------------------------------------------
# Other executors: printed scripts for TPU pods and Slurm clusters.

def _first_notice(runs: Sequence[Run]) -> list[str]:
    firsts = [r for r in launch_order(runs) if not sft_ready(r)]
    seen, lines = set(), []
    for r in firsts:
        if r.sft_model_dir not in seen:
            seen.add(r.sft_model_dir)
            lines.append(f"# {r.name} trains the shared SFT model {r.sft_model_dir}")
    return lines


def pod_script(runs: Sequence[Run], config_spec: str) -> str:
    """A bash script running the unfinished runs one after another on a TPU pod (launch/tpu_pod.sh;
    set TPU_NAME and ZONE). The root must be a directory every worker sees (e.g. NFS / gcsfuse)."""
    order = launch_order(runs)
    lines = ["#!/bin/bash", f"# sweep of {config_spec}: {len(order)} runs on a TPU pod (TPU_NAME, ZONE)",
             "set -euo pipefail", *_first_notice(runs)]
    lines += [shlex.join(["launch/tpu_pod.sh", *r.args]) for r in order]
    return "\n".join(lines) + "\n"


def slurm_script(runs: Sequence[Run], config_spec: str) -> str:
    """A bash script submitting one Slurm job per unfinished run (launch/slurm.sbatch); runs that read
    a shared SFT model still to be trained depend (afterok) on the job that trains it."""
    order = launch_order(runs)
    lines = ["#!/bin/bash", f"# sweep of {config_spec}: {len(order)} Slurm jobs", "set -euo pipefail",
             *_first_notice(runs)]
    builders: dict[str, str] = {}
    for i, r in enumerate(order):
        job = ["sbatch", "--parsable", f"--job-name=dpo-{i:03d}"]
        dep = builders.get(r.sft_model_dir) if not sft_ready(r) else None
        if dep:
            job.append(f'--dependency=afterok:"${dep}"')
        cmd = " ".join(job) + " " + shlex.join(["launch/slurm.sbatch", *r.args])
        if not sft_ready(r) and r.sft_model_dir not in builders:
            builders[r.sft_model_dir] = f"job{i}"
            lines.append(f"job{i}=$({cmd})")
        else:
            lines.append(cmd)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line.

def default_parallel() -> int:
    """1 on a host where JAX would use an accelerator (a CUDA, ROCm or TPU plugin is installed and
    JAX_PLATFORMS does not say cpu): members would compete for its memory. Otherwise
    min(2, CPU cores): a small member keeps about one core busy, so two share a 2-core CPU well."""
    platforms = {p for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p}
    if not platforms or platforms - {"cpu"}:
        import pkgutil  # pylint: disable=g-import-not-at-top

        if any(m.name.startswith(("jax_cuda", "jax_rocm", "jax_plugins", "libtpu")) for m in pkgutil.iter_modules()):
            return 1
    return max(1, min(2, os.cpu_count() or 1))


def _interrupt(signum, frame):  # SIGTERM to the launcher: stop like Ctrl-C
    del signum, frame
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
                                epilog="--config.KEY=VALUE (repeatable): override KEY in every member, after the "
                                       "sweep's own values (the trainer's syntax)")
    p.add_argument("--config", required=True, help="config file with get_sweep, e.g. configs/synthetic.py[:arg]")
    p.add_argument("--root", required=True, help="sweep directory: one workdir per run, manifest.json, logs/")
    p.add_argument("--parallel", type=int, default=None,
                   help="runs at a time (local); default: 1 with an accelerator, else min(2, CPU cores)")
    p.add_argument("--dry_run", action="store_true", help="print the commands that would run, in order")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these members")
    p.add_argument("--compile_cache", default="", metavar="DIR",
                   help="JAX compilation cache shared by the local runs (default ROOT/jax_cache; 'none': off)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="run every member with N seeds "
                   "(config seed = the member's seed + 0 .. N-1; each seed trains its own SFT model)")
    p.add_argument("--fused", action="store_true", help="train the members that differ only in loss "
                   "hyper-parameters as one program each group (launch/fused_sweep.py)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--print_pod", action="store_true", help="print a TPU-pod script (launch/tpu_pod.sh)")
    out.add_argument("--print_slurm", action="store_true", help="print a Slurm submission script")
    try:
        extra, rest = parse_config_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        p.error(str(e))
    a = p.parse_args(rest)
    try:
        cache = None if a.compile_cache == "none" else a.compile_cache
        runs = expand(a.config, a.root, extra=extra, compile_cache=cache, seeds=a.seeds)
    except ValueError as e:
        p.error(str(e))
    listed = runs
    if a.only:
        unknown = sorted(set(a.only) - {r.name for r in runs})
        if unknown:
            p.error(f"--only: no members named {unknown}; members: {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in a.only]
    if a.print_pod or a.print_slurm:
        sys.stdout.write(pod_script(runs, a.config) if a.print_pod else slurm_script(runs, a.config))
        return 0
    parallel = 1 if a.fused else a.parallel if a.parallel is not None else default_parallel()
    meta = {"config": a.config, "root": a.root, "parallel": parallel, "extra": extra, "seeds": a.seeds,
            "fused": a.fused, "sweep_keys": varying_keys([r.overrides for r in listed]), "cwd": os.getcwd()}
    if a.fused:
        from launch import fused_sweep  # pylint: disable=g-import-not-at-top

        base = [sys.executable, "-m", "launch.sweep", f"--config={a.config}", f"--root={a.root}", "--fused",
                *([f"--seeds={a.seeds}"] if a.seeds > 1 else []),
                *([f"--compile_cache={a.compile_cache}"] if a.compile_cache else []), *override_args(extra)]
        command = lambda names: [*base, *(f"--only={n}" for n in names)]  # noqa: E731
        try:
            return 1 if fused_sweep.run(a.config, runs, dry_run=a.dry_run, root=a.root, meta=meta, listed=listed,
                                        group_command=command) else 0
        except KeyboardInterrupt:
            return 130
    if a.dry_run:
        for r in runs:
            if run_status(r) == "finished":
                print(f"# skip (finished): {r.name}", file=sys.stderr)
        for r in launch_order(runs):
            print(r.command_line())
        return 0
    print(f"sweep: {len(runs)} runs, {parallel} at a time, in {a.root}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.time()
    try:
        state = run_local(runs, a.root, parallel=parallel, meta=meta, listed=listed)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    counts = {s: sum(v["status"] == s for v in state.values()) for s in ("finished", "failed", "interrupted")}
    print(f"sweep: {counts['finished']}/{len(runs)} finished, {counts['failed']} failed, "
          f"{counts['interrupted']} interrupted in {time.time() - t0:.0f} s; manifest: "
          f"{os.path.join(a.root, 'manifest.json')}")
    return 0 if counts["finished"] == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
