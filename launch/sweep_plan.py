"""Sweep planning: a config's `get_sweep(arg)` expanded into named runs, and the order to run them.

A config file declares its sweep next to `get_config`: `get_sweep(arg) -> list[dict]`, one dict of
dotted config overrides per member, built with `product` and `zip` below (a config file imports
`launch.sweep_plan` inside `get_sweep`), e.g.
  product(("loss.name", ["sigmoid", "ipo"]), ("loss.beta", [0.5, 1.0]))       # 4 members
  zip(("loss.beta", [1.0, 2.0]), ("loss.gamma", [0.5, 1.0]))                  # 2 members
Each member becomes one run of `python -m dpo_jax.main --config=FILE[:arg] --workdir=DIR/NAME
--config.KEY=VALUE ...`; NAME lists the keys that vary across members (`loss.name=ipo,loss.beta=0.5`).
Members that train an SFT reference (config.sft.steps > 0) share one SFT model, DIR/sft_model (one
per group of members whose SFT-relevant keys differ, see SFT_CHANGING); in `launch_order` one
member of each group whose model is missing goes first (it trains the model).
The runs share JAX's persistent compilation cache (DIR/jax_cache): beta and the other loss
hyper-parameters are traced, so after the first member of each loss most members compile nothing.
A run with DIR/NAME/report.json is finished; one with checkpoints but no report is interrupted and
resumes by running its command again.
"""

from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import sys
from typing import Any, Optional, Sequence

from configs import common
from dpo_jax import paths

Axis = Any  # (dotted_key, values) or an already-expanded list of member dicts
MAIN = ("-m", "dpo_jax.main")
# Keys that do not change the SFT stage: members differing only in these share one SFT model.
# A prefix ending with '.' covers its whole section.
SFT_NEUTRAL = ("loss.", "reference.", "eval.", "model.lora.", "train.steps", "train.log_every", "train.eval_every",
               "logging.", "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "train.export_final",
               "train.peak_flops", "train.on_nonfinite", "train.max_skipped_steps", "data.batch_size",
               "data.eval_batch_size", "data.list_size", "optim.lr", "optim.warmup_steps", "optim.schedule", "optim.end_lr_frac", "optim.grad_accum",
               "online.")
# Keys that change the SFT stage (model, data, the optimizer's update rule, the SFT section, ...):
# members differing in one of these train separate SFT models. Every key of configs/base.py is in
# exactly one of SFT_NEUTRAL and SFT_CHANGING (tests/configs/test_base_keys.py); a key in neither
# counts as SFT-changing.
SFT_CHANGING = ("seed", "model.path", "model.arch.", "model.dtype", "model.param_dtype", "model.remat",
                "model.scan_min_layers", "model.attention", "model.attention_block", "model.tokenizer",
                "data.source", "data.name", "data.format",
                "data.train_split", "data.eval_split", "data.eval_fraction", "data.eval_source", "data.max_length",
                "data.max_prompt_length", "data.truncation_mode", "data.layout", "data.prefix_min_saving",
                "data.logit_slots", "data.min_bucket", "data.pack_length", "data.num_threads", "data.strict",
                "data.num_epochs", "optim.name", "optim.weight_decay", "optim.b1", "optim.b2", "optim.eps",
                "optim.momentum", "optim.clip_norm", "logprobs.",
                "sft.", "synthetic.", "distributed.", "mesh.")
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


# ----------------------------------------------------------------------------------------------
# Declaring a sweep.

def _members(axis: Axis, where: str) -> list[dict]:
    if isinstance(axis, tuple) and len(axis) == 2 and isinstance(axis[0], str):
        key, values = axis
        if not _KEY.match(key):
            raise ValueError(f"{where}: {key!r} is not a dotted config key like 'loss.beta'")
        values = list(values)
        if not values:
            raise ValueError(f"{where}: no values for {key!r}")
        return [{key: v} for v in values]
    if isinstance(axis, (list, tuple)) and all(isinstance(m, dict) for m in axis):
        return [dict(m) for m in axis]
    raise ValueError(f"{where}: expected (dotted_key, values) or a list of member dicts, got {axis!r}")


def _merge(a: dict, b: dict, where: str) -> dict:
    for k in a.keys() & b.keys():
        if a[k] != b[k]:
            raise ValueError(f"{where}: {k!r} is set twice, to {a[k]!r} and {b[k]!r}")
    return {**a, **b}


def product(*axes: Axis) -> list[dict]:
    """Every combination of the axes' values: product((k1, [a, b]), (k2, [c, d])) has 4 members.
    An axis is (dotted_key, values) or a list of member dicts (e.g. the result of `zip`)."""
    out = [{}]
    for i, axis in enumerate(axes):
        ms = _members(axis, f"product axis {i}")
        out = [_merge(a, b, f"product axis {i}") for a in out for b in ms]
    return out


def zip(*axes: Axis) -> list[dict]:  # pylint: disable=redefined-builtin
    """Member i takes the i-th value of every axis; all axes must have the same length."""
    lists = [_members(axis, f"zip axis {i}") for i, axis in enumerate(axes)]
    lengths = [len(m) for m in lists]
    if len(set(lengths)) > 1:
        raise ValueError(f"zip: axes have different lengths {lengths}")
    out = []
    for row in builtins.zip(*lists):
        merged = {}
        for m in row:
            merged = _merge(merged, m, "zip")
        out.append(merged)
    return out


# ----------------------------------------------------------------------------------------------
# Expanding a sweep into runs.

@dataclasses.dataclass
class Run:
    """One member of a sweep: its name, workdir, overrides and the command that trains it."""

    name: str
    workdir: str
    overrides: dict
    args: list  # the arguments of dpo_jax.main
    command: list  # the full local command line (interpreter + module + args)
    sft_model_dir: Optional[str] = None  # shared SFT model this run reads (or writes, if first)
    env: dict = dataclasses.field(default_factory=dict)  # set for the local process, on top of os.environ

    def command_line(self) -> str:
        """The shell line that runs it here: `VAR=value ... command`."""
        return shlex.join([*(f"{k}={v}" for k, v in self.env.items()), *self.command])


def split_config_spec(spec: str) -> tuple[str, str]:
    """'configs/x.py:a=1,b=2' -> ('configs/x.py', 'a=1,b=2')."""
    path, _, arg = spec.partition(":")
    return path, arg


def load_config_module(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"--config: no config file {path!r}")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def format_value(key: str, value: Any) -> str:
    """A value as the command line (ml_collections config_flags) parses it back."""
    if value is None:
        raise ValueError(f"{key}: None cannot be passed on the command line; leave the key out instead")
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def parse_value(text: str) -> Any:
    """'0.5' -> 0.5, 'True' -> True, '(1, 2)' -> (1, 2), anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: dict, where: str = ""):
    """A copy of `config` with the dotted overrides set; unknown keys and wrong types are errors."""
    c = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for i, p in enumerate(parents):
            if not hasattr(node, "keys") or p not in node:
                raise ValueError(f"{where}config key {key!r}: no section {'.'.join(parents[:i + 1])!r}")
            node = node[p]
        if not hasattr(node, "keys") or leaf not in node:
            options = sorted(node.keys()) if hasattr(node, "keys") else []
            raise ValueError(f"{where}config key {key!r} does not exist; keys of that section: {', '.join(options)}")
        try:
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}config key {key!r}={value!r}: {e}") from None
    return c


def short_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(short_value(v) for v in value)
    return _UNSAFE.sub("_", format_value("", value))


def varying_keys(members: Sequence[dict]) -> list[str]:
    """Keys whose value differs across members (or is missing in some), in order of appearance."""
    keys = list(dict.fromkeys(k for m in members for k in m))
    return [k for k in keys if len({json.dumps(m.get(k, "<unset>"), sort_keys=True, default=str)
                                    for m in members}) > 1]


def member_name(member: dict, keys: Sequence[str]) -> str:
    parts = [f"{k}={short_value(member[k])}" for k in keys if k in member]
    return ",".join(parts) or "run"


def matching_rules(key: str, rules: Sequence[str]) -> list[str]:
    """The rules of `rules` that cover `key`: a rule ending with '.' covers its section, another one key."""
    return [r for r in rules if (key.startswith(r) if r.endswith(".") else key == r)]


def _sft_neutral(key: str) -> bool:
    return bool(matching_rules(key, SFT_NEUTRAL))


def compile_cache_env(cache_dir: str) -> dict:
    """JAX's persistent compilation cache in `cache_dir`, shared by the members: the programs do not
    depend on beta or other loss hyper-parameters (traced), so most members compile nothing. A
    maximum size turns on JAX's file lock, which makes the cache safe for parallel runs. Nothing is
    set when the environment already names a cache directory or `cache_dir` is empty."""
    if not cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1"}


def expand(config_spec: str, root: str, *, extra: Optional[dict] = None, entry: Optional[Sequence[str]] = None,
           validate: bool = True, compile_cache: Optional[str] = "", seeds: int = 1) -> list[Run]:
    """The runs of the sweep declared by `get_sweep(arg)` in the config file of `config_spec`.

    `extra` overrides apply to every member (after the sweep's own); `entry` is the command prefix
    (default: this interpreter, `-m dpo_jax.main`); `compile_cache` the shared compilation cache
    (default root/jax_cache; None: none). `seeds` > 1 repeats every member with `seed` = its base
    seed (the member's, else the config's) + 0 .. seeds-1, named `...,seed=S`; `seed` changes the
    SFT stage, so each seed trains its own SFT model. Every member's config is built and validated
    (`dpo_jax.config_check.validate`) before anything runs."""
    path, arg = split_config_spec(config_spec)
    module = load_config_module(path)
    if not callable(getattr(module, "get_sweep", None)):
        raise ValueError(f"{path} declares no sweep: add `def get_sweep(arg) -> list[dict]` next to get_config")
    members = module.get_sweep(arg)
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise ValueError(f"{path}: get_sweep({arg!r}) must return a non-empty list of dicts, got {members!r}")
    for i, m in enumerate(members):
        for k in m:
            if not isinstance(k, str) or not _KEY.match(k):
                raise ValueError(f"{path}: get_sweep member {i}: {k!r} is not a dotted config key")
    members = [{**m, **(extra or {})} for m in members]
    base = module.get_config(arg)
    if seeds < 1:
        raise ValueError(f"--seeds={seeds}; must be >= 1")
    if seeds > 1:
        members = [{**m, "seed": int(m.get("seed", base.seed)) + i} for m in members for i in range(seeds)]
    keys = varying_keys(members)
    names = [member_name(m, keys) for m in members]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: get_sweep({arg!r}) has identical members: {dup}")
    configs = [apply_overrides(base, m, where=f"sweep member {n!r}: ") for m, n in builtins.zip(members, names)]
    if validate:
        from dpo_jax import config_check  # pylint: disable=g-import-not-at-top

        for n, c in builtins.zip(names, configs):
            try:
                config_check.validate(c)
            except ValueError as e:
                raise ValueError(f"sweep member {n!r}: {e}") from None
    groups = [tuple((k, json.dumps(v, default=str)) for k, v in sorted(m.items()) if not _sft_neutral(k))
              if c.sft.steps > 0 and "sft.model_dir" not in m else None for m, c in builtins.zip(members, configs)]
    distinct = list(dict.fromkeys(g for g in groups if g is not None))
    group_keys = varying_keys([dict(g) for g in distinct])
    prefix = tuple(entry) if entry is not None else (sys.executable, *MAIN)
    env = compile_cache_env(os.path.join(root, "jax_cache") if compile_cache == "" else compile_cache)
    runs = []
    for m, n, g in builtins.zip(members, names, groups):
        sft_dir = None
        if g is not None:
            sub = member_name({k: json.loads(v) for k, v in g}, group_keys) if len(distinct) > 1 else ""
            sft_dir = os.path.join(root, "sft_model" + (f".{sub}" if sub else ""))
        workdir = os.path.join(root, n)
        args = [f"--config={config_spec}", f"--workdir={workdir}"]
        args += override_args(m)
        if sft_dir:
            args.append(f"--config.sft.model_dir={sft_dir}")
        runs.append(Run(name=n, workdir=workdir, overrides=m, args=args, command=[*prefix, *args], env=dict(env),
                        sft_model_dir=sft_dir))
    return runs


CONFIG_FLAG = "--config."


def parse_config_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """Split the trainer's override syntax off a command line: `--config.KEY=VALUE` and
    `--config.KEY VALUE` -> ({KEY: parse_value(VALUE)}, the other arguments in order)."""
    split, rest = common.split_overrides(list(argv))
    overrides = {}
    for key, value, arg, _ in split:
        if not _KEY.match(key):
            raise ValueError(f"{arg}: {key!r} is not a dotted config key; expected e.g. --config.train.steps=100")
        overrides[key] = parse_value(value.strip())
    return overrides, rest


def override_args(overrides: dict) -> list[str]:
    """{KEY: value} -> ['--config.KEY=VALUE', ...], as the trainer parses them back."""
    return [f"{CONFIG_FLAG}{k}={format_value(k, v)}" for k, v in overrides.items()]


# ----------------------------------------------------------------------------------------------
# Status and launch order.

def run_status(run: Run) -> str:
    """finished (report.json), interrupted (checkpoints but no report) or pending."""
    if paths.exists(paths.join(run.workdir, "report.json")):
        return "finished"
    if any(paths.path(run.workdir).joinpath(*p, "checkpoints").is_dir() for p in ((), ("sft",))):
        return "interrupted"
    return "pending"


def sft_ready(run: Run) -> bool:
    return run.sft_model_dir is None or paths.exists(paths.join(run.sft_model_dir, "config.json"))


def launch_order(runs: Sequence[Run]) -> list[Run]:
    """Runs to run, in order: in each SFT group whose model is missing, one run goes first (the one
    whose SFT stage was interrupted, if any, else the first)."""
    todo = [r for r in runs if run_status(r) != "finished"]
    todo.sort(key=lambda r: not paths.path(r.workdir).joinpath("sft", "checkpoints").is_dir())
    first, seen = [], set()
    for r in todo:
        if not sft_ready(r) and r.sft_model_dir not in seen:
            seen.add(r.sft_model_dir)
            first.append(r)
    return first + [r for r in todo if r not in first]

