"""The flags of the recipes that take more than the shared three of config.py: the feature cache of the
frozen recipes and the word-vector source of the static one. Light, like config: the tools parse them without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import NEEDED, ON_RESUME, RANGE
from .errors import UserError


def _default_cache_dir() -> str:
    import datasets  # read when the flag is parsed, not when a tool that never caches imports this module

    return str(Path(datasets.config.HF_DATASETS_CACHE) / "finetune_recipes" / "features")


@dataclass
class CacheArguments:
    """The flag of the recipes that compute something once from frozen weights and keep it between runs."""

    feature_cache_dir: str = field(
        default_factory=_default_cache_dir,
        metadata={
            ON_RESUME: True,
            "help": "Where encoded features (and reduced word-vector tables) are kept between runs.",
        },
    )


@dataclass
class EncodeArguments(CacheArguments):
    """The flags of the recipes that encode every split once with a frozen encoder."""

    encode_batch_size: int = field(default=64, metadata={RANGE: (1, 2**16), ON_RESUME: True})


ENCODERS = ("bag", "lstm")
SOURCES = ("table", "distill")


@dataclass
class StaticArguments(CacheArguments):  # + --feature_cache_dir: the reduced vectors table is cached there
    embeddings: str = field(
        default="table",
        metadata={
            "help": "table: the input embedding table of --model_name_or_path with its tokenizer (no transformer "
            "layer runs); distill: model2vec's static vectors distilled from that encoder (needs model2vec). "
            "--embeddings_file replaces both."
        },
    )
    embeddings_file: str | None = field(
        default=None,
        metadata={"help": "GloVe .txt or word2vec/fastText .vec text vectors, read with a word-level tokenizer."},
    )
    lowercase: bool = field(default=True, metadata={"help": "--embeddings_file: lowercase words before lookup."})
    min_coverage: float = field(
        default=0.5,
        metadata={
            RANGE: (0, 1),
            "help": "--embeddings_file: refuse when the file has fewer than this share of training tokens.",
        },
    )
    freeze_embeddings: bool = field(default=True, metadata={"help": "Keep the vectors fixed; train the rest."})
    encoder: str = field(default="bag", metadata={"help": "bag (mean of vectors) or lstm (a bidirectional LSTM)."})
    lstm_hidden_size: int = field(default=128, metadata={RANGE: (1, 2**16)})
    head_hidden_size: int = field(
        default=256, metadata={RANGE: (0, 2**16), "help": "0: a linear head; else an MLP of this width."}
    )
    dropout: float = field(default=0.1, metadata={RANGE: (0, 0.99)})

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise UserError(f"encoder '{self.encoder}' is not one of {', '.join(ENCODERS)}")
        if self.embeddings not in SOURCES:
            raise UserError(f"embeddings '{self.embeddings}' is not one of {', '.join(SOURCES)}")
        if self.embeddings_file is not None and not Path(self.embeddings_file).is_file():
            raise UserError(f"embeddings_file {self.embeddings_file} does not exist; pass a GloVe or .vec file")


STUDENTS = ("static",)


@dataclass
class DistillArguments:
    """The distill recipe's flags: the teacher, the unlabelled texts, and how the two losses mix."""

    teacher: str | None = field(
        default=None,
        metadata={
            NEEDED: True,  # compare and tune leave the recipe out unless it is given
            "help": "Required: a trained output (any recipe's output_dir that `finetune-recipes predict` loads), whose "
            "scores the student learns from. Its labels and problem type must be the data's.",
        },
    )
    student: str = field(
        default="static",
        metadata={"help": "static: the static-vector model of static_embeddings, with that recipe's flags."},
    )
    unlabeled_file: str | None = field(
        default=None,
        metadata={
            "help": "Texts without labels (CSV/JSON/JSON Lines/Parquet, the --text_column), scored by the teacher "
            "and learnt from its scores alone; default: none, the training texts only.",
        },
    )
    distill_temperature: float = field(
        default=2.0,
        metadata={
            RANGE: (0, 100, "above"),
            "help": "T: teacher and student softmaxes at T in the distillation term (Hinton et al.), scaled by T².",
        },
    )
    distill_alpha: float = field(
        default=0.5,
        metadata={
            RANGE: (0, 1),
            "help": "a: a labelled text's loss is a · T² · KL(teacher_T ‖ student_T) + (1 − a) · CE(label, student); "
            "an unlabelled text's the first term alone.",
        },
    )

    def __post_init__(self) -> None:
        if self.student not in STUDENTS:
            raise UserError(f"student '{self.student}' is not one of {', '.join(STUDENTS)}")
        if self.unlabeled_file is not None and not Path(self.unlabeled_file).is_file():
            raise UserError(f"unlabeled_file {self.unlabeled_file} does not exist; pass a CSV/JSON/Parquet file")
