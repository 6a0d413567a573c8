"""The `finetune-recipes` command: list and copy the recipes, predict with a trained model, export it to ONNX,
compare strategies, tune a recipe, cross-validate it and audit its labels."""

from __future__ import annotations

import argparse
import importlib
import io
import sys
from pathlib import Path

from ..catalog import copy_recipe, list_recipes
from ..errors import Parser, UserError, entrypoint


def read_texts(file: str | None, texts: list[str]) -> list[str]:
    """Texts from the command line, or one per line from a file ('-' for standard input). Lines end at "\n" only
    (a "\r" before it is dropped): a line break of Unicode's inside a text (U+2028, NEL) is part of the text, as
    in the training files. Blank lines are left out, and counted on stderr; a blank text argument is refused (its
    prediction would be the model's guess at nothing)."""
    if file:
        try:
            if file == "-":
                content = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="").read()
            else:
                content = Path(file).read_bytes().decode("utf-8")
        except OSError as error:
            raise UserError(f"cannot read {file}: {error.strerror}; pass a readable text file") from None
        except UnicodeDecodeError:
            raise UserError(f"{file} is not UTF-8 text; convert it (iconv -t UTF-8) or pass another file") from None
        lines = [line.removesuffix("\r") for line in content.split("\n")]
        texts = [text for text in lines if text.strip()]
        blank = len(lines) - len(texts) - (lines[-1] == "")  # the line break ending the file ends no line
        if blank:
            print(f"{file}: {blank} blank line(s) skipped", file=sys.stderr)
    empty = next((i for i, text in enumerate(texts) if not text.strip()), None)
    if empty is not None:
        raise UserError(f"text {empty + 1} of the arguments is blank; pass a text to classify, or leave it out")
    if not texts:
        raise UserError("no text to classify: pass texts as arguments or --file FILE (one text per line)")
    return texts


def warn_old_names(argv: list[str], renamed: dict[str, str]) -> None:
    """One warning per 0.1 flag name used (one name for one concept across the commands since 0.2)."""
    for old, new in renamed.items():
        if old in argv:
            print(f"warning: {old} is now {new}, as in every command; {old} goes in 0.3", file=sys.stderr)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="finetune-recipes", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list the recipes")
    cp = commands.add_parser("cp", help="copy a recipe out to adapt it")
    cp.add_argument("recipe")
    cp.add_argument("dest")
    cp.add_argument("--with_config", action="store_true", help="also copy its YAML config to DEST/configs/")
    # --config reads a config file in every other command; 0.1's `cp --config` still works, with a warning.
    cp.add_argument("--config", dest="with_config", action="store_true", help=argparse.SUPPRESS)
    predict = commands.add_parser("predict", help="labels and scores for raw texts")
    predict.add_argument("--model", required=True, help="a recipe's output_dir")
    predict.add_argument("--file", help="one text per line; '-' reads standard input")
    predict.add_argument("--batch_size", type=positive_int, default=64)
    predict.add_argument("--format", choices=["table", "jsonl"], default="table")
    predict.add_argument(
        "--mixed_precision", choices=["auto", "bf16", "no"], default="auto",
        help="auto: the run's own precision, bf16 where the CPU or GPU computes it natively; no: fp32",
    )  # fmt: skip
    predict.add_argument("--fp32", dest="mixed_precision", action="store_const", const="no", help=argparse.SUPPRESS)
    predict.add_argument("texts", nargs="*")
    export = commands.add_parser("export", help="a trained model as ONNX for ONNX Runtime (optionally int8)")
    export.add_argument("--model", required=True, help="a recipe's output_dir")
    export.add_argument("--onnx", action="store_true", required=True, help="export to ONNX (the one format)")
    export.add_argument("--quantize", action="store_true", help="int8 weights (ONNX Runtime dynamic quantisation)")
    export.add_argument("--output_dir", help="default: MODEL/onnx, or MODEL/onnx-int8 with --quantize")
    report = commands.add_parser("report", help="redraw a finished run's model card, report and pictures")
    report.add_argument("output_dir", help="a recipe's output_dir")
    commands.add_parser("compare", help="run several recipes on the same data and budget, one table", add_help=False)
    commands.add_parser("tune", help="an Optuna study over a recipe's SEARCH_SPACE; writes best.yaml", add_help=False)
    commands.add_parser("cv", help="k-fold cross-validation: out-of-fold predictions, mean ± std", add_help=False)
    audit = commands.add_parser("audit", help="the labels a finished cv's out-of-fold predictions doubt (cleanlab)")
    audit.add_argument("cv_dir", help="the --output_dir of a finished `finetune-recipes cv`")
    return parser


@entrypoint
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # its flags are the recipes' flags: it parses them itself
        from .compare import main as compare_main

        return compare_main(argv[1:])
    if argv[:1] in (["tune"], ["cv"]):  # likewise
        module = importlib.import_module(f".{argv[0]}", __package__)
        return module.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "ls":
        recipes = list_recipes()
        width = max(map(len, recipes))
        print("\n".join(f"{name:<{width}}  {doc}" for name, doc in recipes.items()))
    elif args.command == "cp":
        warn_old_names(argv, {"--config": "--with_config"})
        for path in copy_recipe(args.recipe, args.dest, args.with_config):
            print(f"copied {path}")
    elif args.command == "predict":
        from .predict import format_jsonl, format_table, predict

        warn_old_names(argv, {"--fp32": "--mixed_precision no"})
        texts = read_texts(args.file, args.texts)
        bf16 = {"auto": None, "bf16": True, "no": False}[args.mixed_precision]  # the recipes' flag and values
        results = predict(args.model, texts, args.batch_size, bf16=bf16)
        print(format_table(results) if args.format == "table" else format_jsonl(results))
    elif args.command == "export":
        from .predict import check_model_dir

        check_model_dir(Path(args.model))  # before export's imports (torch): a wrong path is refused at once
        from .export import export_onnx

        print(f"exported {export_onnx(args.model, args.output_dir, args.quantize)}")
    elif args.command == "audit":
        from .audit import main as audit_main

        print(f"wrote {', '.join(audit_main(args.cv_dir))} in {args.cv_dir}")
    elif args.command == "report":
        from ..reporting import report

        print(f"wrote {', '.join(report(args.output_dir))} in {args.output_dir}")
