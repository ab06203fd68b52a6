r"""Peak host memory (RSS) of loading a Hugging Face checkpoint: whole on the host, then placed on
the mesh, against streamed straight into the shardings (`hf.load_model(..., mesh=...)`).

    python benchmarks/load_memory.py --dir /tmp [--keep] [--devices 8] [--fsdp 8]

Generates a random bfloat16 Llama checkpoint of about 1.1B parameters (TinyLlama's shape: vocab
32000, hidden 2048, MLP 5632, 22 layers, 32/4 heads; about 2.2 GB) under a new temporary
directory in --dir, writing one tensor at a time (`hf_stream.write_safetensors`, shards of
--shard-gb with an index), and deletes it at the end unless --keep. `--checkpoint DIR` measures an
existing checkpoint instead. Each loader then runs in a fresh process with --devices fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count), so each peak is its own:
- host: `hf.load_model(dir)` (host arrays), then `jax.device_put` into the parameter shardings of
  a mesh with `fsdp` = --fsdp (what `train.init_state` does with it);
- streamed: `hf.load_model(dir, mesh=mesh)`.
On CPU the devices' buffers are host memory, so a process's RSS holds the loaded model itself.
Peak = VmHWM of /proc/self/status; baseline = VmRSS after importing jax and the package and
creating the devices and the mesh. Prints one JSON line; the bar: streamed peak <= 1.3x the
checkpoint's bytes, baseline included.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

GB = 1e9


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def llama_config(args):
    from dpo_jax.models.transformer import ModelConfig

    return ModelConfig(family="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=args.kv_heads, max_position_embeddings=2048, tie_embeddings=False,
                       dtype="bfloat16", param_dtype="bfloat16", bos_token_id=1, eos_token_id=2)


def generate(out: pathlib.Path, args) -> int:
    """A random bfloat16 checkpoint of `llama_config(args)` in `out`, written one tensor at a time;
    returns its tensor bytes."""
    import ml_dtypes
    import numpy as np

    from dpo_jax.models import hf, hf_stream
    from dpo_jax.models.hf_config import config_to_hf

    cfg = llama_config(args)
    rng = np.random.default_rng(0)

    def make(name, shape):
        if name.endswith("norm.weight"):
            return np.ones(shape, ml_dtypes.bfloat16)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    entries = [hf_stream.Entry(name, r.shape, np.dtype(ml_dtypes.bfloat16), lambda n=name, s=r.shape: make(n, s))
               for r in hf.rules(cfg) for _, name in hf._expand(r, cfg.num_layers)]
    shards = hf.group_shards(entries, int(args.shard_gb * GB))
    fnames = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    out.mkdir(parents=True, exist_ok=True)
    for fname, shard in zip(fnames, shards):
        hf_stream.write_safetensors(out / fname, shard, metadata={"format": "pt"})
    total = sum(e.nbytes for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": {e.name: f for f, s in zip(fnames, shards) for e in s}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    return total


def child(args) -> None:
    """One loader in this process; prints its JSON line."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    from flax import nnx

    from dpo_jax import sharding
    from dpo_jax.models import hf

    mesh = sharding.make_mesh({"data": -1, "fsdp": args.fsdp, "tensor": 1})
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    if args.child == "streamed":
        model = hf.load_model(args.checkpoint, dtype="bfloat16", param_dtype="bfloat16", mesh=mesh)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    else:
        model = hf.load_model(args.checkpoint, dtype="bfloat16", param_dtype="bfloat16")
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        params = jax.device_put(params, sharding.param_shardings(params, graphdef, mesh))
        del model, state
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    leaves = jax.tree.leaves(params)
    on_device = sum(sum(s.data.nbytes for s in x.addressable_shards) for x in leaves)
    print(json.dumps({"loader": args.child, "baseline_rss_bytes": baseline, "peak_rss_bytes": _status_bytes("VmHWM"),
                      "device_bytes": on_device, "sharded": sum(not x.sharding.is_fully_replicated for x in leaves),
                      "params": len(leaves), "seconds": round(seconds, 2)}))


def run_child(loader: str, checkpoint: pathlib.Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, "--checkpoint", str(checkpoint),
           "--devices", str(args.devices), "--fsdp", str(args.fsdp)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"{loader} loader failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary checkpoint directory goes")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--checkpoint", default="", help="measure this checkpoint instead of generating one")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--fsdp", type=int, default=8)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--child", choices=["host", "streamed"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    tmp = None
    if args.checkpoint:
        checkpoint = pathlib.Path(args.checkpoint)
    else:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="load_memory-", dir=args.dir))
        checkpoint = tmp / "ckpt"
    try:
        if tmp is not None:
            generate(checkpoint, args)
        size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        results = {loader: run_child(loader, checkpoint, args) for loader in ("host", "streamed")}
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    host, streamed = results["host"], results["streamed"]
    print(json.dumps({
        "checkpoint": str(checkpoint) if args.keep or args.checkpoint else "(deleted)",
        "checkpoint_bytes": size, "devices": args.devices, "fsdp": args.fsdp,
        "baseline_rss_bytes": {k: v["baseline_rss_bytes"] for k, v in results.items()},
        "peak_rss_bytes": {k: v["peak_rss_bytes"] for k, v in results.items()},
        "device_bytes": {k: v["device_bytes"] for k, v in results.items()},
        "seconds": {k: v["seconds"] for k, v in results.items()},
        "streamed_peak_over_checkpoint": round(streamed["peak_rss_bytes"] / size, 3),
        "streamed_above_baseline_over_checkpoint": round(
            (streamed["peak_rss_bytes"] - streamed["baseline_rss_bytes"]) / size, 3),
        "host_peak_over_checkpoint": round(host["peak_rss_bytes"] / size, 3),
        "host_over_streamed_peak": round(host["peak_rss_bytes"] / streamed["peak_rss_bytes"], 3),
        "meets_bar": streamed["peak_rss_bytes"] <= 1.3 * size}))


if __name__ == "__main__":
    main()
