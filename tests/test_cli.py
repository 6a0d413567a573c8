"""The `finetune-recipes` command: ls, cp (a copy runs from anywhere), predict, compare's argument checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FP32, run_inline

from finetune_recipes.catalog import copy_recipe, list_recipes
from finetune_recipes.tools.cli import main
from finetune_recipes.tools.predict import predict

RECIPES = {
    "contrastive",
    "distill",
    "feature_extraction",
    "frozen_base_pooler",
    "full_finetune",
    "llrd",
    "lora",
    "progressive_unfreezing",
    "static_embeddings",
}


def test_ls_lists_every_recipe_with_its_docstring(capsys):
    main(["ls"])
    out = capsys.readouterr().out
    assert set(list_recipes()) == RECIPES
    for name, description in list_recipes().items():
        assert description and f"{name}" in out and description in out


def test_cp_copies_a_recipe_and_its_config_that_run_from_another_folder(tiny_args, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    copied = copy_recipe("full_finetune", dest, with_config=True)
    assert [p.relative_to(dest) for p in copied] == [Path("full_finetune.py"), Path("configs/full_finetune.yaml")]
    args = [str(a) for a in tiny_args]
    proc = subprocess.run(
        [sys.executable, "full_finetune.py", *args, "--num_train_epochs", "1"],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["eval_samples"] == 30


def test_cp_refuses_to_overwrite_and_unknown_recipes(tmp_path, capsys):
    copy_recipe("llrd", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["cp", "llrd", str(tmp_path)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cp", "no_such_recipe", str(tmp_path)])
    assert f"recipes: {', '.join(sorted(RECIPES))}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "out"
    run_inline(
        "full_finetune", "--model_name_or_path", tiny_model, "--train_file", tiny_data["train"],
        "--validation_file", tiny_data["validation"], "--max_length", "32", "--num_train_epochs", "6",
        "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--output_dir", out, *FP32,
    )  # fmt: skip
    return out


def test_predict_table_jsonl_and_file(trained, tmp_path, capsys):
    main(["predict", "--model", str(trained), "market bank profit", "goal team win"])
    said = capsys.readouterr()
    table = said.out.splitlines()
    assert table[0].split() == ["label", "score", "text"] and len(table) == 3
    assert "Loading weights" not in said.err  # transformers' bar for a sub-second load, beside the table
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()  # as it was: a recipe's long loads still show it
    texts = tmp_path / "texts.txt"
    texts.write_text("market bank profit\n\ngoal team win\nphone chip code\n")
    main(["predict", "--model", str(trained), "--file", str(texts), "--format", "jsonl"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["market bank profit", "goal team win", "phone chip code"]
    assert all(r["label"] in {"business", "sport", "tech"} and 0 < r["score"] <= 1 for r in rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--model", "/no/such/dir", "text"], "does not exist"),
        (["predict", "--model", "."], "no text to classify"),
        (["predict", "--model", ".", "--file", "/no/such/file"], "cannot read /no/such/file"),
        (["compare", "--recipes", "full_finetune,nope"], "no recipe 'nope'"),
        (["compare", "--learnig_rate", "1"], "learnig_rate"),
        (["predict", "--model", ".", "--batch_size", "0", "text"], "'0' is not a positive integer"),
        (["predict"], "the following arguments are required: --model"),
    ],
)
def test_bad_cli_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_cp_into_a_new_directory_creates_it(tmp_path):
    copied = copy_recipe("lora", f"{tmp_path / 'new' / 'dir'}/", with_config=True)
    assert [p.relative_to(tmp_path) for p in copied] == [Path("new/dir/lora.py"), Path("new/dir/configs/lora.yaml")]


def test_a_copy_owns_its_loss_a_class_weighted_one_changes_the_result(tiny_args, tmp_path):
    # The user's edit, in the copied file only: cross-entropy where only the first label (business) counts.
    copy = copy_recipe("full_finetune", tmp_path / "mine")[0]
    source = copy.read_text()
    own_loss = """            logits = model(**batch).logits
            weight = torch.tensor([1.0, 0.0, 0.0], device=logits.device)
            loss = torch.nn.functional.cross_entropy(logits, labels, weight=weight)
"""
    theirs = "loss = data.task.loss(model(**batch).logits, labels)  # cross-entropy, BCE or MSE; class-weighted\n"
    theirs = " " * 12 + theirs
    assert source.count(theirs) == 1
    copy.write_text(
        source.replace(theirs, own_loss).replace(
            "from pathlib import Path\n", "from pathlib import Path\n\nimport torch\n"
        )
    )
    args = replace_flag(replace_flag(tiny_args, "--num_train_epochs", "6"), "--learning_rate", "3e-3")
    run_inline("full_finetune", *args, "--output_dir", tmp_path / "plain")
    run_inline(copy, *args, "--output_dir", tmp_path / "weighted")
    texts = [
        line.split(",")[0] for line in Path(args[args.index("--validation_file") + 1]).read_text().splitlines()[1:]
    ]
    labels = {d: [p["label"] for p in predict(tmp_path / d, texts)] for d in ("plain", "weighted")}
    # Only business examples give a gradient: the weighted model says business for (almost) everything.
    assert labels["weighted"].count("business") >= 0.9 * len(texts)
    assert labels["plain"].count("business") <= 0.6 * len(texts), labels["plain"]  # a third are business


def test_a_copy_owns_its_defaults_an_edit_takes_effect(tiny_args, tmp_path):
    copy = copy_recipe("llrd", tmp_path / "mine")[0]
    source = copy.read_text()
    assert source.count('        default=0.85, metadata={RANGE: (0, 1, "above")') == 1
    copy.write_text(
        source.replace(
            '        default=0.85, metadata={RANGE: (0, 1, "above")',
            '        default=0.5, metadata={RANGE: (0, 1, "above")',
        )
    )
    args = replace_flag(tiny_args, "--num_train_epochs", "1")
    proc = run_inline(copy, *args)
    saved = yaml.safe_load((tmp_path / "out" / "recipe_config.yaml").read_text())
    assert saved["layer_decay"] == 0.5
    # The copy came without its YAML: it reads the packaged one, and says so in one line.
    said = [line for line in proc.stderr.splitlines() if line.startswith("config: ")]
    assert len(said) == 1 and said[0].split()[1].endswith("configs/llrd.yaml")


def replace_flag(args: list, flag: str, value: str) -> list:
    args = [str(a) for a in args]
    args[args.index(flag) + 1] = value
    return args


def test_predict_on_a_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    texts = tmp_path / "latin1.txt"
    texts.write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(tmp_path), "--file", str(texts)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "is not UTF-8 text" in err[0], err


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder): what 'nothing written' is checked against."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--model", "{tmp}", "text"], "holds no saved model (no config.json)"),
        (["predict", "--model", "{model}", "text"], "holds no trained classification head (classifier.bias"),
        (["cp", "llrd", "{tmp}/a_file/llrd.py"], "a_file is a file, not a folder"),
        (["cp", "llrd", "{tmp}/a_file"], "a_file is a file, not a folder"),
        (["compare", "--output_dir", "{tmp}/a_file"], "output_dir {tmp}/a_file is a file"),
        (["compare", "--output_dir", "{tmp}", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["compare", "--output_dir", "{tmp}", "--recipes", "full_finetune", "--lora_r", "4"], "takes --lora_r"),
        (["compare", "--output_dir", "{tmp}", "--no_baseline=1"], "ignored explicit argument '1'"),
        (["compare", "--output_dir", "{tmp}", "--learning_rate", "nan"], "learning_rate is nan"),
    ],
)
def test_bad_input_leaves_every_file_as_it_was(argv, message, tiny_model, tmp_path, capsys):
    (tmp_path / "a_file").write_text("mine")
    before = snapshot(tmp_path)
    argv = [a.format(tmp=tmp_path, model=tiny_model) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in err[-1], err
    assert "Traceback" not in "\n".join(err) and "usage:" not in "\n".join(err)
    assert snapshot(tmp_path) == before


def test_compare_routes_a_recipe_flag_to_the_recipes_that_take_it(capsys):
    from finetune_recipes.tools.compare import route_flags

    routes = route_flags(["llrd", "full_finetune"], ["--layer_decay", "0.5", "--seed", "3", "--group_by_length"])
    assert routes == {
        "llrd": ["--layer_decay", "0.5", "--seed", "3", "--group_by_length"],
        "full_finetune": ["--seed", "3", "--group_by_length"],
    }
    assert capsys.readouterr().err.strip() == "--layer_decay goes to llrd only: the others do not take it"
    # A recipe's flags from a dataclass it imports (the pooler's feature cache) or extends go to it too.
    routes = route_flags(["feature_extraction", "frozen_base_pooler", "lora"], ["--encode_batch_size", "8"])
    assert routes == {
        "feature_extraction": ["--encode_batch_size", "8"],
        "frozen_base_pooler": ["--encode_batch_size", "8"],
        "lora": [],
    }


def test_compare_leaves_out_a_recipe_that_does_not_take_the_datas_task(tmp_path, capsys):
    from tiny import regression_rows, topic_rows, write_csv

    from finetune_recipes.config import DataArguments
    from finetune_recipes.errors import UserError
    from finetune_recipes.tools.compare import for_the_task

    scores = write_csv(tmp_path / "scores.csv", regression_rows(30, 0))
    data = DataArguments(train_file=str(scores), label_column="score")
    kept = for_the_task(list(list_recipes()), False, data, seed=0)
    assert kept == [r for r in list_recipes() if r != "contrastive"]
    assert "compare: contrastive left out: it takes single_label_classification or multi_label_classification; " in (
        capsys.readouterr().out
    )
    with pytest.raises(UserError, match="contrastive takes .* data, and this data is regression: leave it out"):
        for_the_task(["full_finetune", "contrastive"], True, data, seed=0)
    topics = DataArguments(train_file=str(write_csv(tmp_path / "topics.csv", topic_rows(30, 0))))
    assert for_the_task(list(list_recipes()), True, topics, seed=0) == list(list_recipes())


def test_compare_and_tune_take_distill_only_with_a_teacher(capsys):
    from finetune_recipes.errors import UserError
    from finetune_recipes.tools.compare import parse_args
    from finetune_recipes.tools.tune import run_study

    known, _ = parse_args(["--train_file", "t.csv"])
    assert "distill" not in known.recipes and "full_finetune" in known.recipes
    assert "compare: distill left out: it needs --teacher (pass it to compare distill too)" in capsys.readouterr().out
    known, _ = parse_args(["--train_file", "t.csv", "--teacher", "outputs/full_finetune"])
    assert "distill" in known.recipes
    with pytest.raises(UserError, match="distill needs --teacher; pass it, or leave distill out of --recipes"):
        parse_args(["--recipes", "distill,llrd"])
    with pytest.raises(UserError, match=r"distill needs --teacher for every trial; pass it \(tune distill --teacher"):
        run_study("distill", ["--train_file", "t.csv"])
    for tool, said in (("compare", "distill only when --teacher is given"), ("tune", "distill's --teacher")):
        with pytest.raises(SystemExit):
            main([tool, "--help"])
        assert said in " ".join(capsys.readouterr().out.split())  # their help says so


@pytest.mark.parametrize(
    "holding, recorded, message",
    [
        ("comparison.md", True, "holds an earlier comparison"),
        ("comparison.md", False, "holds 'comparison.md', which compare did not write"),  # the name proves nothing
        ("notes.txt", False, "holds 'notes.txt', which compare did not write"),
    ],
)
def test_compare_refuses_an_earlier_comparison_or_a_users_file(holding, recorded, message, tmp_path, capsys):
    from finetune_recipes.ownership import write_manifest

    (tmp_path / holding).write_text("mine")
    if recorded:
        write_manifest(tmp_path, [holding], set())
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit):
        main(["compare", "--output_dir", str(tmp_path), "--recipes", "full_finetune"])
    assert message in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_compare_takes_its_own_leftovers_as_its_own(tmp_path, capsys, monkeypatch):
    """What the manifest lists is compare's; a killed comparison's temporary names (its feature caches, a table
    half-written) are removed; the feature_cache it wrote is kept (the next runs read it)."""
    from finetune_recipes.ownership import write_manifest
    from finetune_recipes.tools import compare

    (tmp_path / "feature_cache").mkdir()
    write_manifest(tmp_path, ["feature_cache"], set())
    (tmp_path / ".feature_cache_x1.tmp").mkdir()
    (tmp_path / ".comparison.md.tmp").write_text("half")
    with pytest.raises(SystemExit):
        main(["compare", "--output_dir", str(tmp_path), "--recipes", "full_finetune"])
    assert "holds an earlier comparison" in capsys.readouterr().err  # not "which compare did not write"
    lock = compare.claim_compare_dir(tmp_path, True, {"full_finetune"}, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".finetune_recipes.json",
        ".finetune_recipes.lock",
        "feature_cache",
        "logs",
    ]
    os.close(lock)


def test_every_flag_a_message_or_help_names_exists():
    """Issue 39, item 10: `cv --output_dir` once hinted at "cv's own --output_dir", which cv did not have. Every
    --flag named in a string of the package or the recipes (messages, help texts; not docstrings) is a flag of
    some command (a recipe's dataclass field, or what a tool's --help lists); the 0.1 names a tool still reads
    (with a warning) and the placeholder of "--flag value pairs" aside."""
    import ast
    import contextlib
    import dataclasses
    import io
    import re

    from finetune_recipes.catalog import recipe_types, recipes_dir
    from finetune_recipes.config import SHARED_TYPES

    types = {*SHARED_TYPES, *(t for recipe in list_recipes() for t in recipe_types(recipe))}
    known = {f"--{f.name}" for t in types for f in dataclasses.fields(t)} | {"--config"}  # every recipe's FILE
    for command in ["predict", "export", "report", "audit", "ls", "cp", "cv llrd", "tune llrd", "compare"]:
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
            main([*command.split(), "--help"])
        known |= set(re.findall(r"--[a-z0-9_]+", shown.getvalue()))
        assert "%%" not in shown.getvalue(), command  # help renders as written (issue 42): 95%, not 95%%
    package = Path(__import__("finetune_recipes").__file__).parent
    named: dict[str, str] = {}
    for path in [*package.rglob("*.py"), *recipes_dir().glob("*.py")]:
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_]+", node.value):
                    named.setdefault(flag, path.name)
    unknown = {flag: where for flag, where in named.items() if flag not in known}
    assert unknown == {"--cv_dir": "cv.py", "--study_dir": "tune.py", "--fp32": "cli.py", "--flag": "catalog.py"}
    assert len(named) > 60  # the search finds the flags the messages name


def test_the_0_1_names_still_work_with_a_warning(trained, tmp_path, capsys):
    """Issue 42, item 1: one name for one concept. `cp --config` (copy the YAML) read like every other command's
    --config FILE, and predict's --fp32 was the recipes' --mixed_precision no: both renamed, the old kept."""
    main(["cp", "llrd", str(tmp_path / "a"), "--config"])
    assert (tmp_path / "a" / "configs" / "llrd.yaml").is_file()
    assert "warning: --config is now --with_config" in capsys.readouterr().err
    main(["predict", "--model", str(trained), "--fp32", "goal team win"])
    old = capsys.readouterr()
    main(["predict", "--model", str(trained), "--mixed_precision", "no", "goal team win"])
    assert capsys.readouterr().out == old.out and "warning: --fp32 is now --mixed_precision no" in old.err
