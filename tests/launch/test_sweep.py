"""launch.sweep: the manifest, dry runs, skip / resume, the shared SFT model, parallel runs, pod and
Slurm scripts. The scheduling tests run a fake trainer (a script that mimics the run
layout: workdir/checkpoints, workdir/report.json, the shared SFT model written atomically); one
test runs the real `dpo_jax.main` on tiny runs end to end."""

import json
import os
import pathlib
import shlex
import sys
import textwrap
import time

import pandas as pd
import pytest

from launch import sweep, sweep_plan

REPO = pathlib.Path(__file__).resolve().parents[2]
SYNTHETIC = str(REPO / "configs" / "synthetic.py")

FAKE_MAIN = textwrap.dedent("""
    import json, os, signal, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir, sft = args["workdir"], args.get("config.sft.model_dir")
    name = os.path.basename(workdir)
    def event(kind):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({"run": name, "event": kind, "t": time.time()}) + "\\n")
    def sigterm(*_):  # like the trainer: checkpoint, exit 0
        event("sigterm")
        sys.exit(0)
    signal.signal(signal.SIGTERM, sigterm)
    event("start")
    if name in os.environ.get("FAKE_DIE", "").split(";"):
        sys.exit(7)
    os.makedirs(workdir, exist_ok=True)
    resumed = any(os.path.isdir(os.path.join(workdir, *p, "checkpoints")) for p in ((), ("sft",)))
    if sft and not os.path.exists(os.path.join(sft, "config.json")):
        os.makedirs(os.path.join(workdir, "sft", "checkpoints"), exist_ok=True)
        time.sleep(0.2)
        tmp = sft + ".tmp-%d" % os.getpid()
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")
        os.replace(tmp, sft)
        event("sft")
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
    time.sleep(float(os.environ.get("FAKE_RUN_S", "0.3")))
    if name in os.environ.get("FAKE_FAIL", "").split(";"):
        event("fail")
        sys.exit(3)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump({"resumed": resumed, "args": args}, f)
    event("end")
""")


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_config(tmp_path, sweep_body: str, name: str = "cfg.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent("""
        from configs import synthetic
        from launch import sweep_plan

        def get_config(arg=""):
            return synthetic.get_config(arg)

        def get_sweep(arg=""):
            return {}
    """).format(sweep_body))
    return str(path)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(entry, events()) for the fake trainer; runs from the repository root like the real one."""
    monkeypatch.chdir(REPO)
    script = tmp_path / "fake_main.py"
    script.write_text(FAKE_MAIN)
    log = tmp_path / "events.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))

    def events():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [sys.executable, str(script)], events


# ---------------------------------------------------------------------------------------------- running

def test_manifest_sft_once_parallel_skip_and_resume(tmp_path, fake, monkeypatch):
    entry, events = fake
    monkeypatch.setenv("FAKE_RUN_S", "0.5")
    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.beta", [0.25, 0.5, 1.0, 2.0]))')
    root = str(tmp_path / "sweep")
    runs = sweep_plan.expand(cfg, root, entry=entry)
    # a finished run (report.json) is skipped; an interrupted one (checkpoints) is run again and resumes
    os.makedirs(os.path.join(runs[1].workdir, "checkpoints"))
    os.makedirs(runs[3].workdir)
    write_json(os.path.join(runs[3].workdir, "report.json"), {"fake": "finished"})
    assert [sweep_plan.run_status(r) for r in runs] == ["pending", "interrupted", "pending", "finished"]

    state = sweep.run_local(runs, root, parallel=2, poll_s=0.05, log=lambda _: None)
    assert {n: s["status"] for n, s in state.items()} == {r.name: "finished" for r in runs}
    ev = events()
    assert sorted(e["run"] for e in ev if e["event"] == "start") == sorted(r.name for r in runs[:3])
    sft_events = [e for e in ev if e["event"] == "sft"]
    assert [e["run"] for e in sft_events] == [runs[0].name]  # trained once, by the first member
    assert [r.name for r in runs if os.path.isdir(os.path.join(r.workdir, "sft"))] == [runs[0].name]
    starts = {e["run"]: e["t"] for e in ev if e["event"] == "start"}
    assert min(starts[r.name] for r in runs[1:3]) >= sft_events[0]["t"]  # the others wait for the model
    running, most = 0, 0
    for e in sorted((e for e in ev if e["event"] in ("start", "end")), key=lambda e: e["t"]):
        running += 1 if e["event"] == "start" else -1
        most = max(most, running)
    assert most == 2  # two at a time, never more
    report = lambda r: read_json(os.path.join(r.workdir, "report.json"))  # noqa: E731
    assert report(runs[1])["resumed"] and not report(runs[2])["resumed"]
    assert report(runs[3]) == {"fake": "finished"}  # untouched

    manifest = read_json(os.path.join(root, "manifest.json"))
    assert [m["name"] for m in manifest["runs"]] == [r.name for r in runs]
    for m, r in zip(manifest["runs"], runs):
        assert m["overrides"] == {"loss.beta": r.overrides["loss.beta"]}
        assert m["command"] == r.command and m["env"] == r.env
        assert m["command_line"] == shlex.join([*(f"{k}={v}" for k, v in r.env.items()), *r.command])
        assert m["status"] == "finished" and m["sft_model_dir"] == os.path.join(root, "sft_model")
    assert "returncode" not in manifest["runs"][3] and manifest["runs"][0]["returncode"] == 0
    assert os.path.exists(os.path.join(root, "logs", f"{runs[0].name}.log"))

    # a second launch has nothing left to do, and keeps what the first recorded
    again = sweep.run_local(runs, root, parallel=2, poll_s=0.05, log=lambda _: None)
    assert all(s["status"] == "finished" for s in again.values()) and len(events()) == len(ev)
    assert read_json(os.path.join(root, "manifest.json"))["runs"] == manifest["runs"]


def test_failed_builder_hands_sft_to_the_next_member(tmp_path, fake, monkeypatch):
    entry, events = fake
    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.beta", [0.5, 1.0, 2.0]))')
    root = str(tmp_path / "sweep")
    runs = sweep_plan.expand(cfg, root, entry=entry)
    monkeypatch.setenv("FAKE_DIE", runs[0].name)  # the first member dies before its SFT stage
    state = sweep.run_local(runs, root, parallel=3, poll_s=0.05, log=lambda _: None)
    assert state[runs[0].name]["status"] == "failed" and state[runs[0].name]["returncode"] == 7
    assert [e["run"] for e in events() if e["event"] == "sft"] == [runs[1].name]
    assert state[runs[1].name]["status"] == state[runs[2].name]["status"] == "finished"
    manifest = read_json(os.path.join(root, "manifest.json"))
    assert [r["status"] for r in manifest["runs"]] == ["failed", "finished", "finished"]


def test_interrupted_launcher_stops_its_runs_and_a_relaunch_resumes_them(tmp_path, fake, monkeypatch):
    entry, events = fake
    monkeypatch.setenv("FAKE_RUN_S", "30")
    runs = sweep_plan.expand(write_config(tmp_path, 'sweep_plan.product(("loss.beta", [0.5, 1.0]))'),
                             str(tmp_path / "sweep"), entry=entry)

    def ctrl_c(message):  # Ctrl-C once the first run is past its SFT stage
        if message.startswith("start"):
            deadline = time.time() + 20
            while not any(e["event"] == "sft" for e in events()) and time.time() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sweep.run_local(runs, str(tmp_path / "sweep"), poll_s=0.05, log=ctrl_c)
    assert [e["event"] for e in events()] == ["start", "sft", "sigterm"]
    manifest = read_json(tmp_path / "sweep" / "manifest.json")
    assert [r["status"] for r in manifest["runs"]] == ["interrupted", "pending"]
    assert sweep_plan.run_status(runs[0]) == "interrupted"  # its checkpoints are there
    monkeypatch.setenv("FAKE_RUN_S", "0.1")
    state = sweep.run_local(runs, str(tmp_path / "sweep"), poll_s=0.05, log=lambda _: None)
    assert all(s["status"] == "finished" for s in state.values())
    assert read_json(os.path.join(runs[0].workdir, "report.json"))["resumed"]


def test_only_some_members_run_and_the_manifest_lists_all(tmp_path, fake):
    entry, events = fake
    runs = sweep_plan.expand(write_config(tmp_path, 'sweep_plan.product(("loss.beta", [0.5, 1.0, 2.0]))'),
                             str(tmp_path / "sweep"), entry=entry)
    state = sweep.run_local(runs[2:], str(tmp_path / "sweep"), poll_s=0.05, log=lambda _: None, listed=runs)
    assert list(state) == [runs[2].name] and state[runs[2].name]["status"] == "finished"
    assert [e["run"] for e in events() if e["event"] == "sft"] == [runs[2].name]
    manifest = read_json(tmp_path / "sweep" / "manifest.json")
    assert [(r["name"], r["status"]) for r in manifest["runs"]] == [
        (runs[0].name, "pending"), (runs[1].name, "pending"), (runs[2].name, "finished")]


def test_default_parallel(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert sweep.default_parallel() == 2  # a CPU host: two members share the 2 cores
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert sweep.default_parallel() == 1


def test_dry_run_prints_the_exact_commands_in_launch_order(tmp_path, fake, capsys):
    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.name", ["sigmoid", "ipo"]), ("loss.beta", [0.5, 1.0]))')
    root = str(tmp_path / "sweep")
    runs = sweep_plan.expand(cfg, root)
    os.makedirs(runs[0].workdir)
    write_json(os.path.join(runs[0].workdir, "report.json"), {})
    assert sweep.main([f"--config={cfg}", f"--root={root}", "--dry_run", "--config.train.steps=7"]) == 0
    out, err = capsys.readouterr()
    expected = [r for r in sweep_plan.expand(cfg, root, extra={"train.steps": 7})][1:]
    assert out.splitlines() == [r.command_line() for r in expected]
    assert out.splitlines()[0].startswith(f"JAX_COMPILATION_CACHE_DIR={root}/jax_cache ")
    assert all("--config.train.steps=7" in line for line in out.splitlines())
    assert f"# skip (finished): {runs[0].name}" in err
    assert not os.path.exists(os.path.join(root, "manifest.json"))  # a dry run writes nothing


def test_dry_run_fused_prints_each_groups_command_and_its_members_runs(tmp_path, capsys):
    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.name", ["sigmoid", "ipo"]), ("loss.beta", [0.5, 1.0]))')
    root = str(tmp_path / "sweep")
    assert sweep.main([f"--config={cfg}", f"--root={root}", "--dry_run", "--fused", "--config.train.steps", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = sweep_plan.expand(cfg, root, extra={"train.steps": 7})
    groups = [runs[:2], runs[2:]]  # one group per loss: the members differ in beta only
    assert len(lines) == 2 * 4
    for k, group in enumerate(groups):
        header, command, *members = lines[4 * k: 4 * k + 4]
        assert header == f"# fused group of 2: {[r.name for r in group]}"
        argv = shlex.split(command)
        assert argv[:3] == [sys.executable, "-m", "launch.sweep"] and "--fused" in argv
        assert f"--config={cfg}" in argv and f"--root={root}" in argv and "--config.train.steps=7" in argv
        assert [a for a in argv if a.startswith("--only=")] == [f"--only={r.name}" for r in group]
        assert members == [f"#   {r.name} equals: {r.command_line()}" for r in group]
    assert not os.path.exists(os.path.join(root, "manifest.json"))  # a dry run writes nothing


def test_dry_run_with_seeds(tmp_path, capsys):
    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.beta", [0.5, 1.0]))')
    root = str(tmp_path / "sweep")
    assert sweep.main([f"--config={cfg}", f"--root={root}", "--dry_run", "--seeds=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for beta, seed in [(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)]:
        line = next(x for x in lines if f"--workdir={root}/loss.beta={beta},seed={seed} " in x)
        assert f"--config.seed={seed}" in line and f"--config.sft.model_dir={root}/sft_model.seed={seed}" in line


def test_print_pod_and_slurm(tmp_path, capsys):
    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.beta", [0.5, 1.0, 2.0]))')
    root = str(tmp_path / "sweep")
    runs = sweep_plan.expand(cfg, root)
    assert sweep.main([f"--config={cfg}", f"--root={root}", "--print_pod"]) == 0
    pod = capsys.readouterr().out.splitlines()
    calls = [shlex.split(line) for line in pod if line.startswith("launch/tpu_pod.sh")]
    assert calls == [["launch/tpu_pod.sh", *r.args] for r in runs]
    assert f"# {runs[0].name} trains the shared SFT model {root}/sft_model" in pod
    assert sweep.main([f"--config={cfg}", f"--root={root}", "--print_slurm"]) == 0
    slurm = capsys.readouterr().out.splitlines()
    jobs = [line for line in slurm if "sbatch" in line]
    assert jobs[0].startswith("job0=$(sbatch --parsable --job-name=dpo-000 launch/slurm.sbatch ")
    assert all('--dependency=afterok:"$job0"' in j for j in jobs[1:])
    assert shlex.split(jobs[2].split(" launch/slurm.sbatch ", 1)[1]) == runs[2].args


def test_real_runs_share_one_sft_model_two_at_a_time_and_a_fused_sweep_aggregates_alike(tmp_path, monkeypatch):
    """dpo_jax.main on tiny runs: the first trains the SFT model, then both run; resumable layout;
    each run plots itself. The same members as a fused sweep: the same manifest and results.csv."""
    from launch import aggregate  # pylint: disable=g-import-not-at-top

    monkeypatch.chdir(REPO)
    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.beta", [0.5, 1.0]))')
    root, fused_root = str(tmp_path / "sweep"), str(tmp_path / "fused")
    tiny = ["--config.sft.steps=2", "--config.train.steps=2", "--config.train.export_final=False",
            "--config.train.peak_flops=1.0", "--config.train.progress", "False", "--config.eval.num_prompts=4"]
    code = sweep.main([f"--config={cfg}:runlocal=1", f"--root={root}", "--parallel=2", *tiny])
    manifest = read_json(os.path.join(root, "manifest.json"))
    logs = {r["name"]: pathlib.Path(r["log"]).read_text()[-3000:] for r in manifest["runs"]}
    assert code == 0, logs
    assert [r["status"] for r in manifest["runs"]] == ["finished", "finished"], logs
    trained_sft = [r["name"] for r in manifest["runs"] if os.path.isdir(os.path.join(r["workdir"], "sft"))]
    assert trained_sft == ["loss.beta=0.5"]
    assert os.path.exists(os.path.join(root, "sft_model", "config.json"))
    for r in manifest["runs"]:
        report = read_json(os.path.join(r["workdir"], "report.json"))
        assert report["steps"] == 2 and "eval/loss" in report and "sample/kl" in report
        config = read_json(os.path.join(r["workdir"], "config.json"))
        assert config["loss"]["beta"] == r["overrides"]["loss.beta"]
        assert config["train"]["progress"] is False
        assert config["sft"]["model_dir"] == os.path.join(root, "sft_model")
        with open(os.path.join(r["workdir"], "plots", "reward_kl.png"), "rb") as f:  # the run's own plot
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    assert sweep.main([f"--config={cfg}:runlocal=1", f"--root={fused_root}", "--fused", *tiny]) == 0
    fused = read_json(os.path.join(fused_root, "manifest.json"))
    assert {k for k in fused if k != "fused"} == {k for k in manifest if k != "fused"}
    assert fused["fused"] and not manifest["fused"] and fused["extra"] == manifest["extra"]
    assert [r["name"] for r in fused["runs"]] == [r["name"] for r in manifest["runs"]]
    for f, p in zip(fused["runs"], manifest["runs"]):
        assert set(f) == set(p) and f["status"] == "finished" and f["returncode"] == 0
        assert f["overrides"] == p["overrides"] and f["command"] == [a.replace(root, fused_root) for a in p["command"]]
        assert os.path.exists(f["log"]) and os.path.exists(os.path.join(f["workdir"], "plots", "reward_kl.png"))
    tables = [pd.read_csv(aggregate.aggregate(d)["csv"]) for d in (root, fused_root)]
    assert list(tables[0].columns) == list(tables[1].columns)
    assert len(tables[1].columns) < 150  # the swept keys, report and metrics; not the SFT model's config
    for col in ("run", "status", "loss.beta"):
        assert list(tables[1][col]) == list(tables[0][col])
    assert list(tables[1]["status"]) == ["finished", "finished"]
    assert sweep.main([f"--config={cfg}:runlocal=1", f"--root={fused_root}", "--fused", *tiny]) == 0  # all done
    assert read_json(os.path.join(fused_root, "manifest.json"))["runs"] == fused["runs"]  # records kept
    assert pathlib.Path(fused["runs"][1]["log"]).read_text().splitlines()[-1].startswith("=== finished (0) in ")


def test_bench_takes_the_trainers_override_syntax():
    from dpo_jax import bench  # pylint: disable=g-import-not-at-top

    cfg, _ = bench.parse_args(["--config.data.layout=prefix", "--config.model.arch.hidden_size", "32",
                               "--config.data.logit_slots=False", "--config.data.batch_size=4", "--steps", "2"])
    want = bench.BenchConfig(layout="prefix", hidden_size=32, logit_slots=False, pairs=4, steps=2)
    assert cfg == want
    training = cfg.training_config()
    assert (training.data.layout, training.model.arch.hidden_size, training.data.batch_size) == ("prefix", 32, 4)
    with pytest.raises(SystemExit):
        bench.parse_args(["--config.loss.beta=0.5"])  # a key no benchmark field sets
