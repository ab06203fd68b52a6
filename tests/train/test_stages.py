"""dpo_jax/train/stages.py's stage building, without training: which rows evaluate, how a split is
named, the drop report, the format/loss rule for detected formats. Stages run end to end in
tests/test_runner.py."""

import json

import pytest

from dpo_jax import build, config_check, losses
from dpo_jax.data import pipeline
from dpo_jax.train import stages


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from configs import synthetic

    config = synthetic.get_config("runlocal=1")
    files = build.synthetic_files(config, str(tmp_path_factory.mktemp("world")))
    return config, files, build.tokenizer(files.tokenizer)


def _stage(config, files, tok, path, *, steps, eval_path=None, objective=("sigmoid",)):
    obj = losses.Objective(objective)
    return stages.make_stage(config, "train", "/unused", objective=obj, hp=obj.params(beta=1.0), steps=steps,
                             optim_cfg=config.optim, ref_mode="frozen", train_path=path, eval_path=eval_path,
                             tok=tok, batch_size=config.data.batch_size)


def test_evaluate_only_evaluates_every_row_and_training_holds_out(world):
    config, files, tok = world
    config = config.copy_and_resolve_references()
    config.data.eval_fraction = 0.25
    only_eval = _stage(config, files, tok, files.train, steps=0)
    assert only_eval.eval_rows is only_eval.train_rows  # no hold-out: every row is scored
    trained = _stage(config, files, tok, files.train, steps=3)
    assert len(trained.eval_rows) + len(trained.train_rows) == len(only_eval.train_rows)
    assert trained.eval_source.endswith("(held-out 0.25 of split 'train')")
    assert trained.train_source.endswith("(train part, 0.75 of split 'train')")
    report = trained.data_reports["train"]
    assert report["kept"] + report["dropped"] == len(trained.train_rows)


def test_detected_unpaired_rows_refuse_a_paired_loss(world, tmp_path):
    config, files, tok = world
    rows = [json.loads(line) for line in open(files.train)][:8]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": True}) + "\n"
                            for r in rows))
    with pytest.raises(ValueError, match=r"unpaired.jsonl: detected format='unpaired'.*sigmoid"):
        _stage(config, files, tok, str(path), steps=3, eval_path=str(path))
    config_check.check_format_for_losses("unpaired", losses.Objective(("sft",)))  # one-completion losses take them


def test_the_drop_report_names_the_file(world):
    config, files, tok = world
    stage = _stage(config, files, tok, files.train, steps=3)
    assert stage.data_reports["train"]["source"] == files.train
    assert pipeline.drop_summary(stage.data_reports["train"]).startswith(f"{files.train}: ")
