"""Configuration: YAML defaults under command-line flags, type conversion, clear errors, the entry point."""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass

import pytest
import yaml

from finetune_recipes.config import (
    RUN_CONTROL,
    SECRETS,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    config_to_dict,
)
from finetune_recipes.errors import UserError, entrypoint
from finetune_recipes.parsing import parse_config

TYPES = (ModelArguments, DataArguments, TrainingArguments)


@dataclass
class RecipeArguments:
    """A recipe's own flags, parsed beside the shared ones."""

    pooling: str = "mean"
    layer_decay: float = 1.0


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str, name: str = "config.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def parse(*args, **kw) -> tuple:
    return parse_config(*TYPES, args=[str(a) for a in args], **kw)


def test_defaults_without_config():
    model, data, train = parse()
    assert model == ModelArguments() and data == DataArguments() and train == TrainingArguments()


def test_yaml_values_and_cli_wins(write_yaml):
    path = write_yaml("learning_rate: 5e-5\nseed: 7\noutput_dir: from_yaml\nmax_length: 96\n")
    model, data, train = parse("--config", path, "--seed", "9", "--max_length", "32")
    assert train.seed == 9 and data.max_length == 32  # the command line overrides the file
    assert train.output_dir == "from_yaml"  # the file overrides the dataclass default
    assert model.model_name_or_path == ModelArguments().model_name_or_path


def test_config_equals_form(write_yaml):
    (_, _, train) = parse(f"--config={write_yaml('seed: 3')}")
    assert train.seed == 3


def test_exponent_without_dot_is_a_float(write_yaml):
    # PyYAML (YAML 1.1) reads 5e-5 as the string "5e-5".
    assert yaml.safe_load("x: 5e-5")["x"] == "5e-5"
    (_, _, train) = parse("--config", write_yaml("learning_rate: 5e-5\nweight_decay: 1e-2\n"))
    assert isinstance(train.learning_rate, float) and train.learning_rate == pytest.approx(5e-5)
    assert isinstance(train.weight_decay, float) and train.weight_decay == pytest.approx(0.01)


def test_yaml_values_get_the_flag_type(write_yaml):
    text = "checkpointing_steps: 500\nnum_train_epochs: 3\nvalidation_split_percentage: 10\nsave_total_limit: 4\n"
    (_, data, train) = parse("--config", write_yaml(text))
    assert train.checkpointing_steps == "500"  # a str flag: checkpoint_due calls .isdigit() on it
    assert isinstance(train.num_train_epochs, float) and train.num_train_epochs == 3.0
    assert isinstance(data.validation_split_percentage, float)
    assert train.save_total_limit == 4


def test_yaml_null_keeps_none(write_yaml):
    (model, _, train) = parse(
        "--config", write_yaml("max_train_steps: null\ntokenizer_name: ~\nsave_total_limit: null")
    )
    assert train.max_train_steps is None and model.tokenizer_name is None and train.save_total_limit is None


def test_yaml_bad_value_names_the_key(write_yaml):
    with pytest.raises(UserError, match=r"key 'learning_rate' .* 'fast'"):
        parse("--config", write_yaml("learning_rate: fast"))
    with pytest.raises(UserError, match="key 'seed'"):
        parse("--config", write_yaml("seed: 1.5"))


def test_yaml_boolean_for_a_string_flag_asks_for_quotes(write_yaml):
    with pytest.raises(UserError, match=r"mixed_precision.*boolean.*quote"):
        parse("--config", write_yaml("mixed_precision: no"))
    (_, _, train) = parse("--config", write_yaml("mixed_precision: 'no'"))
    assert train.mixed_precision == "no"


def test_unknown_yaml_key_is_named(write_yaml):
    path = write_yaml("learning_rat: 1e-3\n")
    with pytest.raises(UserError, match=r"unknown key 'learning_rat' in .*; did you mean 'learning_rate'\?$") as info:
        parse("--config", path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"unknown key 'xyzzy' in .*; run with --help to list the valid keys$"):
        parse("--config", write_yaml("xyzzy: 1\n"))


@pytest.mark.parametrize("key", ["help", "config"])
def test_parser_internal_keys_are_not_config_keys(write_yaml, key):
    with pytest.raises(UserError, match=f"unknown key '{key}'"):
        parse("--config", write_yaml(f"{key}: x.yaml"))


def test_unknown_cli_flag():
    with pytest.raises(UserError, match=r"--learning_rtae.*--help"):
        parse("--learning_rtae", "1e-3")


@pytest.mark.parametrize("flag", ["--learning_rat", "--conf"])
def test_prefix_of_a_flag_is_not_accepted(write_yaml, flag):
    with pytest.raises(UserError, match=flag):
        parse(flag, write_yaml("seed: 1") if flag == "--conf" else "1e-3")


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=r"cannot read config .*missing\.yaml"):
        parse("--config", tmp_path / "missing.yaml")


def test_config_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="cannot read config"):
        parse("--config", tmp_path)


def test_invalid_yaml(write_yaml):
    with pytest.raises(UserError, match="cannot read config"):
        parse("--config", write_yaml("seed: [1,\n"))


@pytest.mark.parametrize("text", ["- seed\n- 3\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(write_yaml, text):
    with pytest.raises(UserError, match="not a mapping"):
        parse("--config", write_yaml(text))


def test_empty_yaml_means_defaults(write_yaml):
    assert parse("--config", write_yaml("# only a comment\n")) == parse()


def test_bool_flag_without_value():
    (_, data, train) = parse("--overwrite_output_dir", "--group_by_length")
    assert train.overwrite_output_dir is True and data.group_by_length is True
    (_, _, train) = parse("--overwrite_output_dir", "false")
    assert train.overwrite_output_dir is False


def test_bool_from_yaml_and_cli_override(write_yaml):
    path = write_yaml("overwrite_output_dir: true\ngroup_by_length: 'yes'\n")
    (_, data, train) = parse("--config", path)
    assert train.overwrite_output_dir is True and data.group_by_length is True
    (_, _, train) = parse("--config", path, "--overwrite_output_dir", "no")
    assert train.overwrite_output_dir is False


def test_default_config_used_when_present(write_yaml):
    default = write_yaml("seed: 11\n", "default.yaml")
    (_, _, train) = parse(default_config=default)
    assert train.seed == 11
    (_, _, train) = parse("--seed", "12", default_config=default)
    assert train.seed == 12


def test_default_config_ignored_when_missing(tmp_path):
    assert parse(default_config=tmp_path / "nope.yaml") == parse()


def test_explicit_config_replaces_default_config(write_yaml):
    default = write_yaml("seed: 11\nmax_length: 50\n", "default.yaml")
    explicit = write_yaml("seed: 13\n", "explicit.yaml")
    (_, data, train) = parse("--config", explicit, default_config=default)
    assert train.seed == 13 and data.max_length == DataArguments().max_length  # not merged with the default


def test_args_default_to_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipe.py", "--seed", "5"])
    (_, _, train) = parse_config(*TYPES)
    assert train.seed == 5


def test_extra_dataclass_returned_in_order(write_yaml):
    parsed = parse_config(*TYPES, RecipeArguments, args=["--config", str(write_yaml("layer_decay: 0.9\n"))])
    assert len(parsed) == 4
    assert parsed[3] == RecipeArguments(pooling="mean", layer_decay=0.9)


def test_config_to_dict_round_trips(write_yaml):
    args = ["--model_name_or_path", "some/model", "--train_file", "t.csv", "--learning_rate", "3e-5"]
    args += ["--checkpointing_steps", "100", "--max_train_samples", "7", "--pooling", "cls"]
    parsed = parse_config(*TYPES, RecipeArguments, args=args)
    flat = config_to_dict(*parsed)
    # No key collides; what to do with an existing run (overwrite, resume) is not part of a config, and a
    # secret (the Hub token) is never written.
    assert not set(RUN_CONTROL) & set(flat) and not set(SECRETS) & set(flat)
    fields_in_all = sum(len(dataclasses.fields(t)) for t in (*TYPES, RecipeArguments))
    assert len(flat) == fields_in_all - len(RUN_CONTROL) - len(SECRETS)
    assert flat["learning_rate"] == 3e-5 and flat["pooling"] == "cls"
    path = write_yaml(yaml.safe_dump(flat), "resolved.yaml")
    assert parse_config(*TYPES, RecipeArguments, args=["--config", str(path)]) == parsed


def test_entrypoint_user_error_is_one_line_and_exit_2(capsys):
    @entrypoint
    def main():
        raise UserError("the thing is wrong; fix the thing")

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: the thing is wrong; fix the thing\n"
    assert "Traceback" not in err


def test_entrypoint_wraps_a_bad_flag(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipe.py", "--no_such_flag", "1"])
    main = entrypoint(lambda: parse_config(*TYPES))
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--no_such_flag" in err


def test_entrypoint_returns_the_result_and_keeps_the_name():
    def main():
        return 41 + 1

    wrapped = entrypoint(main)
    assert wrapped() == 42 and wrapped.__name__ == "main"


def test_entrypoint_lets_other_errors_through(capsys):
    @entrypoint
    def main():
        raise RuntimeError("a bug, not a user mistake")

    with pytest.raises(RuntimeError, match="a bug"):
        main()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("per_device_train_batch_size", 0, "per_device_train_batch_size is 0"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps is 0"),
        ("logging_steps", 0, "logging_steps is 0"),
        ("mixed_precision", "fp32", "mixed_precision 'fp32'"),
        ("checkpointing_steps", "steps", "checkpointing_steps 'steps'"),
        ("early_stopping_patience", 2, "needs --metric_for_best_model"),
        ("eval_strategy", "no", "eval_strategy 'no' is not one of epoch, steps"),
        ("eval_strategy", "steps", "eval_strategy steps needs --eval_steps"),
    ],
)
def test_training_arguments_reject_values_that_would_fail_later(field, value, message):
    from finetune_recipes.config import TrainingArguments
    from finetune_recipes.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        TrainingArguments(**{field: value})


def test_a_recipe_copied_without_its_yaml_falls_back_to_the_packaged_one(tmp_path):
    from finetune_recipes.config import DataArguments, ModelArguments, TrainingArguments
    from finetune_recipes.parsing import parse_config

    missing = tmp_path / "configs" / "full_finetune.yaml"
    _, _, args = parse_config(ModelArguments, DataArguments, TrainingArguments, args=[], default_config=missing)
    assert args.output_dir == "outputs/full_finetune" and args.mixed_precision == "auto"


def test_every_numeric_flag_has_bounds():
    """A new int or float flag of any recipe declares its range in its field's metadata, so a value that would
    exhaust memory or time (or make no sense) is one line before the run starts."""
    import typing

    from finetune_recipes.catalog import list_recipes, recipe_types
    from finetune_recipes.config import RANGE, SHARED_TYPES

    types = {*SHARED_TYPES, *(t for recipe in list_recipes() for t in recipe_types(recipe))}
    unbounded = [
        f"{t.__name__}.{f.name}"
        for t in types
        for f in dataclasses.fields(t)
        if re.search(r"\b(int|float)\b", str(typing.get_type_hints(t)[f.name])) and RANGE not in f.metadata
    ]
    assert len(types) > 5 and not unbounded


def test_an_unknown_metric_for_best_model_is_refused_at_parse_time_unless_a_metric_name_may_report_it():
    from finetune_recipes.config import DataArguments, TrainingArguments
    from finetune_recipes.errors import UserError
    from finetune_recipes.parsing import check_combination

    with pytest.raises(UserError, match="metric_for_best_model 'loss' is not one of accuracy, f1_macro"):
        check_combination((DataArguments(), TrainingArguments(metric_for_best_model="loss")))
    check_combination((DataArguments(metric_name="mcc.py"), TrainingArguments(metric_for_best_model="mcc")))
