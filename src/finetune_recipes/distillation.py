"""Distillation into a small student (Hinton et al. 2015): the teacher, any trained output, checked against the
data; its scores on every text computed once and cached; the training set that carries them, unlabelled texts
included; and the loss that mixes them with the labels.

Written here because transformers' Trainer has no distillation, and SetFit's DistillationSetFitTrainer distils
a SetFit model into another and needs labels (setfit#320). The teacher's scores are its saved model's logits,
so already calibrated (the scaling is folded into its output layer), in its label order mapped to the data's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, concatenate_datasets

from .atomic import atomic_path
from .config import MULTI, REGRESSION, SINGLE, DataArguments
from .data import ClassificationData, Task, raw_splits, tokenize
from .data.files import read_texts_file
from .errors import UserError, listing
from .readback import read_json, read_yaml
from .trained import RESTORE, check_model_dir, trained_logits

logger = logging.getLogger("finetune_recipes")


@dataclass(frozen=True)
class Teacher:
    """A trained output read back: where it is, what it predicts, the model it started from, its validation
    score, and the data flags of the run that trained it (empty when it kept no recipe_config.yaml)."""

    path: Path
    problem_type: str
    label_names: list[str]
    base_model: str | None
    score: tuple[str, float] | None
    data: dict

    def described(self) -> str:
        score = f" (validation {self.score[0]} {self.score[1]:.4f})" if self.score else ""
        return f"{self.path}{score}"


def read_teacher(path: str | None) -> Teacher:
    """The teacher at `path`, refused in one line when it is not a trained output."""
    if not path:
        raise UserError("distill needs --teacher DIR, a trained output (a recipe's output_dir) to learn from")
    folder = Path(path)
    check_model_dir(folder, flag="--teacher")
    if not (folder / "results.json").is_file():
        raise UserError(f"--teacher {folder} holds no results.json, so no trained run; pass a recipe's output_dir")
    config = read_json(folder / "config.json", RESTORE) if (folder / "config.json").exists() else {}
    results = read_json(folder / "results.json", RESTORE)
    saved = read_yaml(folder / "recipe_config.yaml", RESTORE) if (folder / "recipe_config.yaml").exists() else {}
    task = results.get("task", {})
    problem_type = task.get("problem_type") or config.get("problem_type") or SINGLE
    id2label = config.get("id2label") or {}
    names = [id2label[str(i)] for i in range(len(id2label))] if problem_type != REGRESSION else []
    primary = next(iter(task.get("metrics", [])), None)
    score = (primary, results[f"eval_{primary}"]) if primary and f"eval_{primary}" in results else None
    fields = {f.name for f in dataclasses.fields(DataArguments)}
    data = {k: v for k, v in saved.items() if k in fields}
    return Teacher(folder, problem_type, names, saved.get("model_name_or_path"), score, data)


def student_vectors(model_args, teacher: Teacher):
    """The model whose input table gives the student its vectors: --model_name_or_path when given, else the model
    the teacher started from (its recipe_config.yaml's), whose token table its fine-tuning began with."""
    from .config import ModelArguments

    given = model_args.model_name_or_path != ModelArguments.model_name_or_path
    if given or not teacher.base_model or teacher.base_model == model_args.model_name_or_path:
        return model_args
    logger.info("The student's vectors: the input table of %s, the teacher's base model", teacher.base_model)
    return dataclasses.replace(model_args, model_name_or_path=teacher.base_model, tokenizer_name=None)


def check_student_data(data_args) -> None:
    """What this student cannot learn from yet: text pairs (`predict`, which scores for the teacher, reads single
    texts)."""
    if data_args.text_pair_column:
        raise UserError("distill reads single texts; drop --text_pair_column, or train a recipe on the pairs")


def check_teacher(teacher: Teacher, task: Task) -> None:
    """The teacher predicts what the data labels: the same problem type and the same label names."""
    if teacher.problem_type != task.problem_type:
        raise UserError(
            f"--teacher {teacher.path} is a {teacher.problem_type} model and the data is {task.problem_type}; "
            "distil a teacher trained on this task"
        )
    if task.problem_type != REGRESSION and set(teacher.label_names) != set(task.label_names):
        missing = sorted(set(task.label_names) ^ set(teacher.label_names))
        raise UserError(
            f"--teacher {teacher.path} predicts {listing(teacher.label_names)} and the data labels "
            f"{listing(task.label_names)} (differing: {listing(missing)}); distil a teacher trained on these labels"
        )


def check_no_leakage(teacher: Teacher, data: ClassificationData, text_column: str, seed: int) -> None:
    """The student is scored on validation and test by their labels; a teacher that trained on those texts
    would have learnt them, and the student's scores there would say more than held-out ones. Where the teacher's
    run says what it trained on (its data flags, its seed's validation split reproduced), such a teacher is
    refused (a text the student's own train split holds too is the data's overlap, warned about when it loads);
    where that cannot be read back (a moved file, a Hub data set offline), one warning says so."""
    if not teacher.data:
        logger.warning("--teacher %s keeps no recipe_config.yaml: cannot check that it did not train on the "
                       "validation or test texts", teacher.path)  # fmt: skip
        return
    saved_seed = teacher.data.get("seed", seed)
    try:
        raw, _ = raw_splits(DataArguments(**teacher.data), saved_seed)
    except (UserError, OSError, ValueError) as error:
        logger.warning("Cannot read back what --teacher %s trained on (%s): not checked that it did not train on "
                       "the validation or test texts", teacher.path, str(error).splitlines()[0])  # fmt: skip
        return
    # A text the student's own train split also holds is the data's overlap, which loading already warns about:
    # the teacher adds nothing to it.
    trained = set(raw["train"][teacher.data.get("text_column") or "text"]) - set(data.raw["train"][text_column])
    for split in ("validation", "test"):
        if split not in data.raw:
            continue
        seen = [t for t in data.raw[split][text_column] if t in trained]
        if seen:
            raise UserError(
                f"--teacher {teacher.path} trained on {len(seen)} of the {split} texts (e.g. {seen[0][:40]!r}), "
                f"so the student's {split} scores would leak; pass the teacher's own held-out splits (the same "
                "--validation_file and --test_file, or its --seed for a held-out validation) or another teacher"
            )


def teacher_scores(teacher: Teacher, texts: list[str], label_names: list[str], cache_dir: str, batch_size: int):
    """The teacher's logits on `texts` (one row each, columns in `label_names`' order), each text scored once:
    they are kept per text under `cache_dir`, keyed by the teacher's files, so another student (another seed,
    another vector file) never runs the teacher again. Regression: values in the target's units."""
    cache = Path(cache_dir) / f"teacher-{fingerprint(teacher.path)}.npz"
    keys = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
    known: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache) as stored:
            known = dict(zip(stored["keys"].tolist(), stored["scores"], strict=True))
    missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in known))
    if missing:
        logger.info("The teacher scores %d texts (%d cached)", len(missing), len(texts) - len(missing))
        with torch.random.fork_rng(devices=[]):  # loading draws random init values: the student's seed must not see it
            logits, _, _ = trained_logits(teacher.path, missing, batch_size)
        for text, row in zip(missing, logits, strict=True):
            known[hashlib.sha256(text.encode()).hexdigest()[:32]] = row.astype(np.float32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache, per_process=True) as tmp, tmp.open("wb") as file:  # np.savez would add ".npz"
            np.savez(file, keys=np.array(list(known)), scores=np.stack(list(known.values())))
    scores = np.stack([known[k] for k in keys])
    if teacher.problem_type == REGRESSION:
        return scores[:, :1]
    order = [teacher.label_names.index(n) for n in label_names]  # the teacher's columns in the data's label order
    return scores[:, order]


def fingerprint(path: Path) -> str:
    """The teacher's files (names, sizes, modification times): a retrained teacher gets new scores."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def unlabeled_texts(path: str | None, text_column: str) -> list[str]:
    """--unlabeled_file's texts (none when not given)."""
    return read_texts_file(path, text_column, "--unlabeled_file") if path else []


def with_teacher(data: ClassificationData, tokenizer, extra: list[str], scores: np.ndarray, args) -> ClassificationData:
    """`data` whose train split carries each text's teacher scores (`teacher`, standardised for regression as the
    labels are; a long document's windows each its document's) and whether it has a label (`labeled`), followed
    by the unlabelled `extra` texts, tokenized as the data is. `scores` holds the train texts' rows, then
    `extra`'s."""
    task, train, documents = data.task, data.train, len(data.raw["train"])
    if task.problem_type == REGRESSION:
        scores = (scores - task.target_mean) / task.target_std
    windows = "document" in train.column_names
    rows = np.asarray(train["document"]) if windows else np.arange(len(train))
    labelled = train.add_column("teacher", scores[rows].tolist()).add_column("labeled", [1] * len(train))
    if not extra:
        return dataclasses.replace(data, train=labelled)
    texts = DatasetDict({"unlabeled": Dataset.from_dict({args.text_column: extra})})
    encoded = tokenize(texts, tokenizer, args)["unlabeled"]
    source = np.asarray(encoded["document"]) if windows else np.arange(len(extra))
    blank = {SINGLE: 0, MULTI: [0.0] * task.num_labels, REGRESSION: 0.0}[task.problem_type]
    unlabelled = encoded.add_column("labels", [blank] * len(source))
    unlabelled = unlabelled.add_column("teacher", scores[documents + source].tolist())
    unlabelled = unlabelled.add_column("labeled", [0] * len(source))
    if windows:  # numbered after the train split's documents
        unlabelled = unlabelled.map(lambda d: {"document": d + documents}, input_columns="document")
    unlabelled = unlabelled.select_columns(labelled.column_names).cast(labelled.features)
    return dataclasses.replace(data, train=concatenate_datasets([labelled, unlabelled]))


def distillation_loss(logits, labels, teacher, labeled, task: Task, temperature: float, alpha: float) -> torch.Tensor:
    """Per text, a · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − a) · CE(label, student) for a
    labelled one and the first term alone for an unlabelled one; averaged over the batch. Multi-label: BCE per
    label to the teacher's probabilities; regression: squared error to the teacher's outputs (both standardised).
    The label term is the task's own loss (class weights included)."""
    logits, teacher, labeled = logits.float(), teacher.float(), labeled.float()
    if task.problem_type == SINGLE:
        student_t, teacher_t = F.log_softmax(logits / temperature, -1), F.log_softmax(teacher / temperature, -1)
        soft = F.kl_div(student_t, teacher_t, log_target=True, reduction="none").sum(-1) * temperature**2
    elif task.problem_type == MULTI:
        soft = F.binary_cross_entropy_with_logits(logits, teacher.sigmoid(), reduction="none").mean(-1)
    else:
        soft = (logits.squeeze(-1) - teacher.squeeze(-1)) ** 2
    hard = torch.zeros_like(soft)
    if labeled.any():
        rows = labeled.bool()
        hard[rows] = task.loss(logits[rows], labels[rows], reduction="none").reshape(rows.sum(), -1).mean(-1)
    return (alpha * soft + (1 - alpha) * hard * labeled).mean()


def distilled_from(teacher: Teacher, unlabeled: list[str], args, task: Task, calibration, test_teacher) -> dict:
    """results.json's `distillation`: the teacher and its validation score, how many unlabelled texts, the mix,
    and the student's agreement with the teacher on test (when the test split has labels)."""
    out = {"teacher": str(teacher.path), "unlabeled_texts": len(unlabeled), "alpha": args.distill_alpha,
           "temperature": args.distill_temperature}  # fmt: skip
    if teacher.score:
        out["teacher_metric"], out["teacher_eval_score"] = teacher.score
    test = calibration.scored.get("test")
    if test is not None:
        teacher_view = test_teacher[:, 0] if task.problem_type == REGRESSION else task.scores(test_teacher)
        out["test_agreement"] = agreement(task, test.scores, teacher_view)
    return out


def agreement(task: Task, student: np.ndarray, teacher: np.ndarray) -> float:
    """How often the student says what the teacher says on the same texts: the same top label (single-label), the
    same yes/no per label at 0.5 (multi-label), or the correlation of their values (regression)."""
    if task.problem_type == SINGLE:
        return float((student.argmax(-1) == teacher.argmax(-1)).mean())
    if task.problem_type == MULTI:
        return float(((student >= 0.5) == (teacher >= 0.5)).mean())
    return float(np.corrcoef(student.ravel(), teacher.ravel())[0, 1])
