"""configs/common.py: config arguments are parsed strictly; every config file rejects a misspelled
argument naming the file and the key, and its documented arguments resolve as they always have
(the expectations below are written by hand from each file's values)."""

import importlib
import pathlib

import pytest

from configs import common

REPO = pathlib.Path(__file__).resolve().parents[2]
ALLOWED = {"beta": 1.0, "loss": "sigmoid", "steps": 600, "runlocal": False, "policy": str}
NAME = "configs/x.py"


def parse(arg):
    return common.parse_args(arg, ALLOWED, NAME)


def get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


# ------------------------------------------------------------------------------------------- parser

@pytest.mark.parametrize("arg, expected", [
    ("", {}),
    (None, {}),
    ("steps=5", {"steps": 5}),
    ("beta=0.5,loss=ipo", {"beta": 0.5, "loss": "ipo"}),
    (" beta = 2 , steps=3 ,", {"beta": 2.0, "steps": 3}),  # spaces stripped, empty items skipped
    (",,beta=1e-1", {"beta": 0.1}),
    ("loss=sigmoid+sft", {"loss": "sigmoid+sft"}),
    ("loss=", {"loss": ""}),                       # an empty string is a string
    ("policy=/a/b=c", {"policy": "/a/b=c"}),       # the value is everything after the first '='
    ("runlocal=1", {"runlocal": True}),
    ("runlocal=True", {"runlocal": True}),
    ("runlocal=yes", {"runlocal": True}),
    ("runlocal=ON", {"runlocal": True}),
    ("runlocal=0", {"runlocal": False}),
    ("runlocal=false", {"runlocal": False}),
    ("runlocal=no", {"runlocal": False}),
])
def test_parse_args_accepts(arg, expected):
    defaults = {"beta": 1.0, "loss": "sigmoid", "steps": 600, "runlocal": False}
    a = parse(arg)
    assert a == {**defaults, **expected}
    assert all(type(a[k]) is type(defaults.get(k, "")) for k in a), a  # noqa: E721  (bool is not int)


def test_an_argument_without_default_is_absent_unless_given():
    assert "policy" not in parse("beta=2")
    assert parse("policy=X")["policy"] == "X"
    assert common.parse_args("n=3", {"n": int, "x": float, "f": bool}, NAME) == {"n": 3}


@pytest.mark.parametrize("arg, fragments", [
    ("runlocl=1", ["configs/x.py: unknown argument 'runlocl' in 'runlocl=1'",
                   "allowed: beta, loss, policy, runlocal, steps"]),
    ("beta=1,Beta=2", ["unknown argument 'Beta' in 'beta=1,Beta=2'"]),   # keys are case-sensitive
    ("runlocal", ["configs/x.py: argument 'runlocal' in 'runlocal' is not key=value (e.g. runlocal=1)",
                  "allowed: beta"]),
    ("beta=1,steps", ["argument 'steps' in 'beta=1,steps' is not key=value;"]),
    ("beta=1,beta=2", ["configs/x.py: argument 'beta' is given twice in 'beta=1,beta=2'"]),
    ("steps=1.5", ["configs/x.py: argument steps='1.5' in 'steps=1.5': '1.5' is not an int"]),
    ("steps=", ["argument steps='' in 'steps=': '' is not an int"]),
    ("beta=high", ["argument beta='high' in 'beta=high': 'high' is not a float"]),
    ("runlocal=2", ["argument runlocal='2' in 'runlocal=2': '2' is not a bool"]),
    ("runlocal=", ["'' is not a bool"]),
])
def test_parse_args_rejects(arg, fragments):
    with pytest.raises(ValueError) as e:
        parse(arg)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} missing from: {e.value}"


def test_no_arguments_allowed():
    assert common.parse_args("", {}, NAME) == {}
    with pytest.raises(ValueError, match=r"unknown argument 'a' in 'a=1'; allowed: \(none\)"):
        common.parse_args("a=1", {}, NAME)


@pytest.mark.parametrize("spec", [None, [1], dict, 1j])
def test_declaring_an_unsupported_type_is_a_type_error(spec):
    with pytest.raises(TypeError, match="argument 'k'"):
        common.parse_args("", {"k": spec}, NAME)


def test_format_args_round_trips():
    values = {"beta": 0.1 + 0.2, "steps": 7, "runlocal": True, "loss": "ipo", "flag": False}
    text = common.format_args(values)
    assert text == "beta=0.30000000000000004,steps=7,runlocal=True,loss=ipo,flag=False"
    assert common.parse_args(text, {k: type(v) for k, v in values.items()}, NAME) == values
    with pytest.raises(ValueError, match="cannot contain ','"):
        common.format_args({"data": "a,b"})


# ------------------------------------------------------------------------------------ config files

def config_files():
    """Every config file: configs/**/*.py defining get_config, as (path relative to the repo, module)."""
    out = []
    for path in sorted((REPO / "configs").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        module = importlib.import_module(rel[:-3].replace("/", "."))
        if callable(getattr(module, "get_config", None)):
            out.append((rel, module))
    return out


FILES = config_files()
# A valid argument of each file that needs one (hf.py: policy and data are required).
REQUIRED = {"configs/hf.py": "policy=X,data=Y"}


def test_every_config_file_is_found():
    names = {rel for rel, _ in FILES}
    assert {"configs/base.py", "configs/synthetic.py", "configs/hf.py", "configs/paper/dpo_hh.py"} <= names
    assert len([n for n in names if n.startswith("configs/paper/")]) == 8


@pytest.mark.parametrize("rel, module", FILES, ids=[rel for rel, _ in FILES])
def test_a_misspelled_argument_names_the_file_and_the_key(rel, module):
    arg = ",".join(filter(None, [REQUIRED.get(rel), "runlocl=1"]))
    functions = [module.get_config] + ([module.get_sweep] if hasattr(module, "get_sweep") else [])
    for fn in functions:
        with pytest.raises(ValueError) as e:
            fn(arg)
        msg = str(e.value)
        assert msg.startswith(f"{rel}: unknown argument 'runlocl' in {arg!r}; allowed: "), msg
        allowed = msg.split("allowed: ")[1]
        if hasattr(module, "ARGS"):
            assert allowed == ", ".join(sorted(module.ARGS)), msg


def test_a_bare_flag_is_an_error_not_a_full_run():
    from configs import synthetic

    with pytest.raises(ValueError, match=r"configs/synthetic.py: argument 'runlocal' .* \(e.g. runlocal=1\)"):
        synthetic.get_config("runlocal")


def test_the_sweep_launcher_reports_a_misspelled_argument(tmp_path, monkeypatch):
    from launch import sweep_plan

    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="configs/synthetic.py: unknown argument 'runlocl'"):
        sweep_plan.expand("configs/synthetic.py:runlocl=1", str(tmp_path))


# (file, arg, {dotted key: expected value}): the documented arguments, each changing what it names.
SYNTHETIC_FULL = {"loss.name": "sigmoid", "loss.beta": 1.0, "train.steps": 600, "sft.steps": 600,
                  "synthetic.n_sft": 20000, "synthetic.n_pairs": 20000, "synthetic.n_eval": 512, "data.batch_size": 64,
                  "data.eval_batch_size": 256, "eval.num_prompts": 256, "eval.samples_per_prompt": 4,
                  "train.eval_every": 200, "train.checkpoint_every": 200, "synthetic.label": "bradley_terry"}
SYNTHETIC_SMALL = {"train.steps": 10, "sft.steps": 10, "synthetic.n_sft": 512, "synthetic.n_pairs": 512,
                   "synthetic.n_eval": 64, "data.batch_size": 16, "data.eval_batch_size": 32, "eval.num_prompts": 16,
                   "eval.samples_per_prompt": 2, "train.log_every": 5, "train.eval_every": 0,
                   "train.checkpoint_every": 5}
HF = {"model.path": "X", "data.source": "Y", "model.tokenizer": "", "reference.mode": "frozen", "reference.path": "",
      "data.eval_source": "", "data.eval_fraction": 0.05, "data.batch_size": 8, "loss.name": "sigmoid",
      "loss.beta": 0.1, "train.steps": 1000, "optim.lr": 5e-7}
CASES = [
    ("base", "", {"loss.name": "sigmoid", "loss.beta": 0.1, "train.steps": 100}),
    ("synthetic", "", SYNTHETIC_FULL),
    ("synthetic", "runlocal=1", {**SYNTHETIC_FULL, **SYNTHETIC_SMALL}),
    ("synthetic", "runlocal=0", SYNTHETIC_FULL),
    ("synthetic", "beta=0.5", {**SYNTHETIC_FULL, "loss.beta": 0.5}),
    ("synthetic", "loss=ipo", {**SYNTHETIC_FULL, "loss.name": "ipo"}),
    ("synthetic", "steps=3", {**SYNTHETIC_FULL, "train.steps": 3}),
    ("synthetic", "loss=sigmoid+sft,beta=2,steps=7", {"loss.name": "sigmoid+sft", "loss.beta": 2.0, "train.steps": 7}),
    ("synthetic", "runlocal=1,steps=7,beta=0.25", {**SYNTHETIC_SMALL, "loss.beta": 0.25}),  # runlocal wins on steps
    ("hf", "policy=X,data=Y", HF),
    ("hf", "policy=X,data=Y,reference=R,tokenizer=T,eval=Z,loss=robust,beta=0.2,steps=5,batch=4",
     {**HF, "reference.path": "R", "model.tokenizer": "T", "data.eval_source": "Z", "data.eval_fraction": 0.0,
      "loss.name": "robust", "loss.beta": 0.2, "train.steps": 5, "data.batch_size": 4}),
    ("paper.dpo_hh", "", {"model.path": "EleutherAI/pythia-2.8b", "loss.name": "sigmoid", "loss.beta": 0.1,
                          "reference.mode": "frozen", "optim.lr": 1e-6, "train.steps": 2512}),
    ("paper.dpo_hh", "stage=sft", {"loss.name": "sft", "reference.mode": "none", "optim.lr": 5e-7}),
    ("paper.dpo_hh", "stage=dpo,policy=/tmp/hh_sft/final,beta=0.2",
     {"model.path": "/tmp/hh_sft/final", "loss.name": "sigmoid", "loss.beta": 0.2, "optim.lr": 1e-6}),
    ("paper.dpo_imdb", "", {"model.path": "gpt2-large", "data.source": "imdb_preference_pairs.jsonl",
                            "loss.beta": 0.1, "train.steps": 1000}),
    ("paper.dpo_imdb", "policy=SFT,data=pairs.jsonl,beta=5,steps=20",
     {"model.path": "SFT", "data.source": "pairs.jsonl", "loss.beta": 5.0, "train.steps": 20}),
    ("paper.ipo_synthetic", "", {**SYNTHETIC_FULL, "loss.name": "ipo", "loss.beta": 1.0, "train.steps": 2000,
                                 "synthetic.label": "argmax"}),
    ("paper.ipo_synthetic", "loss=sigmoid,beta=0.5,steps=30",
     {"loss.name": "sigmoid", "loss.beta": 0.5, "train.steps": 30, "synthetic.label": "argmax"}),
    ("paper.ipo_synthetic", "runlocal=1", {**SYNTHETIC_SMALL, "loss.name": "ipo", "synthetic.label": "argmax"}),
    ("paper.kto_zephyr", "", {"loss.name": "kto", "loss.beta": 0.1, "train.steps": 1910}),
    ("paper.kto_zephyr", "beta=0.3", {"loss.beta": 0.3}),
    ("paper.orpo_mistral", "", {"loss.name": "orpo", "loss.beta": 0.1, "train.steps": 9515}),
    ("paper.orpo_mistral", "beta=0.2", {"loss.beta": 0.2}),
    ("paper.simpo_mistral", "", {"loss.name": "simpo", "loss.beta": 2.0, "loss.gamma": 1.6, "train.steps": 477}),
    ("paper.simpo_mistral", "beta=2.5,gamma=1", {"loss.beta": 2.5, "loss.gamma": 1.0}),
    ("paper.tulu3_dpo", "", {"loss.name": "sigmoid_norm", "loss.beta": 5.0, "train.steps": 2132}),
    ("paper.tulu3_dpo", "beta=3", {"loss.beta": 3.0}),
    ("paper.zephyr_dpo", "", {"loss.beta": 0.1, "train.steps": 5730, "optim.warmup_steps": 573}),
    ("paper.zephyr_dpo", "epochs=1,beta=0.01", {"loss.beta": 0.01, "train.steps": 1910, "optim.warmup_steps": 191}),
]


@pytest.mark.parametrize("name, arg, expected", CASES, ids=[f"{n}:{a}" for n, a, _ in CASES])
def test_documented_arguments_resolve_as_before(name, arg, expected):
    c = importlib.import_module(f"configs.{name}").get_config(arg)
    for key, value in expected.items():
        got = get(c, key)
        assert got == value and type(got) is type(value), f"configs/{name}.py:{arg}: {key} = {got!r}, expected {value!r}"


@pytest.mark.parametrize("name", ["dpo_hh", "dpo_imdb", "kto_zephyr", "orpo_mistral", "simpo_mistral", "tulu3_dpo",
                                  "zephyr_dpo"])
def test_paper_runlocal_and_dir(name, tmp_path):
    module = importlib.import_module(f"configs.paper.{name}")
    full, small = module.get_config(""), module.get_config(f"runlocal=1,dir={tmp_path}")
    assert small.model.path == "" and small.train.steps == 4 and small.data.source.startswith(str(tmp_path))
    assert small.loss.name == full.loss.name and small.loss.beta == full.loss.beta
    assert module.get_config(f"runlocal=0,dir={tmp_path}") == full


@pytest.mark.parametrize("arg, steps", [("", [300]), ("beta=2", [300]), ("runlocal=0", [300]), ("runlocal=1", None),
                                        ("steps=5", None), ("runlocal=1,steps=5", None)])
def test_synthetic_sweep_steps(arg, steps):
    from configs import synthetic

    members = synthetic.get_sweep(arg)
    assert len(members) == 12
    assert sorted({m["loss.name"] for m in members}) == ["ipo", "sigmoid", "simpo"]
    assert [m.get("train.steps") for m in members] == (steps or [None]) * 12


def test_sweeps_of_hf_and_paper_configs():
    from configs import hf
    from configs.paper import dpo_imdb, ipo_synthetic

    assert hf.get_sweep("policy=X,data=Y,loss=ipo") == [{"loss.beta": b} for b in (0.01, 0.05, 0.1, 0.5)]
    assert dpo_imdb.get_sweep("policy=P,data=D") == [{"loss.beta": b} for b in (0.05, 0.1, 1.0, 5.0)]
    assert len(ipo_synthetic.get_sweep("runlocal=1")) == 8
