"""Arguments of config files: `--config=FILE:key=value,...` parsed strictly.

Every config file declares the arguments it takes, with their defaults, and parses its `arg` with
`parse_args`; `get_config(arg)` and `get_sweep(arg)` of a file take the same arguments (the sweep
launcher calls both with the one `arg` of `--config=FILE:arg`).

Syntax: items separated by ',', each `key=value` (key and value stripped of spaces; the value is
everything after the first '=', so it may hold further '=' but no ','); empty items are skipped
(`beta=1,` is `beta=1`). Errors (ValueError, naming the file, the argument and what is allowed):
an unknown key, an item without '=' (a bare `runlocal` is an error, write `runlocal=1`), a key given
twice, and a value that does not convert to the argument's type:
  str    the value as written ('' allowed)
  int    int(value)
  float  float(value)
  bool   1, true, yes, on | 0, false, no, off (any case)

Command-line overrides (`--config.train.steps=5`): `check_keys` names an unknown key and the
nearest valid one (ml_collections itself raises an AttributeError with the last part only).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from ml_collections import config_dict

TYPES = (str, int, float, bool)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _spec(key: str, spec: Any) -> tuple[type, Any, bool]:
    """(type, default, has_default) of one declared argument: a type alone, or a default of a type."""
    if isinstance(spec, type):
        if spec not in TYPES:
            raise TypeError(f"argument {key!r}: type {spec.__name__} is not one of str, int, float, bool")
        return spec, None, False
    kind = bool if isinstance(spec, bool) else type(spec)
    if kind not in TYPES:
        raise TypeError(f"argument {key!r}: default {spec!r} is not a str, int, float or bool")
    return kind, spec, True


def convert(kind: type, value: str) -> Any:
    """`value` as `kind` (str, int, float or bool, see the module docstring); ValueError if it is not one."""
    if kind is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a bool (1, true, yes, on | 0, false, no, off)")
    if kind is str:
        return value
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{value!r} is not {'an int' if kind is int else 'a float'}") from None


def parse_args(arg: str, allowed: Mapping[str, Any], config: str) -> dict[str, Any]:
    """`key=value,...` -> {key: typed value} for every key of `allowed`, defaults filled in.

    `allowed` maps each argument to its default, whose type converts the value (str, int, float,
    bool), or to one of those types alone: an argument without a default, absent from the result
    unless given. `config` names the config file in errors, e.g. 'configs/synthetic.py'.
      parse_args("steps=5", {"beta": 1.0, "steps": 600, "policy": str}, "configs/x.py")
        == {"beta": 1.0, "steps": 5}
    """
    specs = {key: _spec(key, spec) for key, spec in allowed.items()}
    names = ", ".join(sorted(specs)) or "(none)"
    given: dict[str, Any] = {}
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:
            hint = f" (e.g. {key}=1)" if key in specs and specs[key][0] is bool else ""
            raise ValueError(f"{config}: argument {item.strip()!r} in {arg!r} is not key=value{hint}; "
                             f"allowed: {names}")
        if key not in specs:
            raise ValueError(f"{config}: unknown argument {key!r} in {arg!r}; allowed: {names}")
        if key in given:
            raise ValueError(f"{config}: argument {key!r} is given twice in {arg!r}")
        try:
            given[key] = convert(specs[key][0], value)
        except ValueError as e:
            raise ValueError(f"{config}: argument {key}={value!r} in {arg!r}: {e}") from None
    defaults = {key: default for key, (_, default, has_default) in specs.items() if has_default}
    return {**defaults, **given}


def format_args(values: Mapping[str, Any]) -> str:
    """The `arg` string of `values` ({key: value} -> 'key=value,...'), which `parse_args` reads back."""
    out = []
    for key, value in values.items():
        text = repr(value) if isinstance(value, float) else str(value)
        if "," in text:
            raise ValueError(f"argument {key}={text!r}: a value cannot contain ','")
        out.append(f"{key}={text}")
    return ",".join(out)


def command_line_overrides(argv: Sequence[str], flag: str = "config") -> tuple[Optional[str], list[str]]:
    """(the value of `--<flag>`, the dotted keys of its overrides `--<flag>.<key>[=value]` and
    `--no<flag>.<key>`) in a command line, e.g. (['--config=c.py', '--config.train.steps=5'] ->
    ('c.py', ['train.steps']))."""
    path, keys = None, []
    for i, arg in enumerate(argv):
        if m := re.match(rf"^--?{re.escape(flag)}(=(.*))?$", arg):
            path = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
        elif m := re.match(rf"^--?(no)?{re.escape(flag)}\.([^=]+)", arg):
            keys.append(m.group(2))
    return path, keys


def split_overrides(argv: Sequence[str], flag: str = "config") -> tuple[list[tuple[str, str, str, int]], list[str]]:
    """The trainer's override syntax split off a command line: `--<flag>.KEY=VALUE` and
    `--<flag>.KEY VALUE` -> ([(KEY, VALUE text, the argument as given, how many other arguments
    came before it)], the other arguments in order). A ValueError names an override without a value."""
    prefix, overrides, rest, i = f"--{flag}.", [], [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith(prefix):
            rest.append(arg)
            continue
        key, eq, value = arg[len(prefix):].partition("=")
        if not eq:
            if i >= len(argv):
                raise ValueError(f"{arg}: no value; expected {prefix}KEY=VALUE, e.g. {prefix}train.steps=100")
            value, i = argv[i], i + 1
        overrides.append((key, value, arg, len(rest)))
    return overrides, rest


def config_keys(config: config_dict.ConfigDict) -> list[str]:
    """Every dotted key of a ConfigDict, sections included: ['train', 'train.steps', ...]."""
    keys = []
    for k, v in config.items():
        keys.append(k)
        if isinstance(v, config_dict.ConfigDict):
            keys += [f"{k}.{sub}" for sub in config_keys(v)]
    return keys


def check_keys(config: config_dict.ConfigDict, keys: Iterable[str], flag: str = "config") -> None:
    """ValueError naming the first of `keys` (dotted) that `config` lacks and its nearest valid key."""
    valid = config_keys(config)
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean --{flag}.{near[0]}?" if near else "the keys are listed in configs/base.py"
            raise ValueError(f"--{flag}.{key}: unknown config key {key!r}; {hint}")
