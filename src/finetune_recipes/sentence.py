"""A sentence encoder tuned on pairs, then a head on its embeddings (SetFit's method, Tunstall et al. 2022): the
pairs drawn from the labelled examples, the encoder's own pooling read from its sentence-transformers files, the
cosine-similarity pair loss, and the classifier the contrastive recipe saves.

Importing this module registers `SentenceClassifier` with the Auto classes, so `pipeline()` and
`AutoModelForSequenceClassification.from_pretrained` load a saved run after `import finetune_recipes.sentence`.
Written here rather than taken from `setfit`: the recipe owns its loop (Accelerate, checkpoints, 2 processes),
and the saved model is a Transformers classifier that predict, pipeline() and the ONNX export take as it is;
`benchmarks/few_shot.py` runs the `setfit` library beside it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from .config import MULTI, REGRESSION
from .errors import UserError
from .features import encode, pool
from .modeling import is_decoder, load_config, resolve_model_path

MODEL_TYPE = "finetune_recipes_sentence"
ST_POOLINGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}  # the two the recipe pools


def sentence_pooling(name_or_path: str, given: str | None) -> tuple[str, bool]:
    """(pooling, normalize) of a sentence-transformers model folder: its modules.json names a Pooling module
    (cls or mean) and maybe a Normalize one. `given` (--pooling) wins; a folder without them needs it."""
    folder = Path(resolve_model_path(name_or_path))
    has_config = not folder.is_dir() or (folder / "config.json").is_file()  # a Hub id, or a model folder
    if has_config and is_decoder(load_config(name_or_path)):
        raise UserError(
            f"{name_or_path} is a decoder, and contrastive is SetFit's method for sentence encoders; run lora or "
            "feature_extraction (it pools a decoder's last token)"
        )
    modules_file = folder / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    if given:
        return given, normalize
    for module in modules:
        config = folder / module.get("path", "") / "config.json"
        if module.get("type", "").endswith("Pooling") and config.is_file():
            modes = [mode for key, mode in ST_POOLINGS.items() if json.loads(config.read_text()).get(key)]
            if len(modes) == 1:
                return modes[0], normalize
    raise UserError(
        f"{name_or_path} names no cls or mean pooling (no sentence-transformers modules.json and 1_Pooling); "
        "pass --pooling mean or --pooling cls"
    )


MAX_PAIRS = 20_000_000  # about 2 GB of Python tuples, built before the first step


def sentence_pairs(
    labels: list, problem_type: str, num_iterations: int, seed: int, progress: bool = False
) -> list[tuple[int, int, float]]:
    """SetFit's pairs: for each of `num_iterations` rounds and each example, one partner of the same label
    (target 1) and one of another (target 0), drawn with a seeded generator; never an example with itself.
    Multi-label: a partner is alike when the two label sets share a label, unlike when they share none; an
    example without an alike (or unlike) partner gets no such pair. Returns (i, j, target) triples; `progress`
    shows a bar over the rounds."""
    if problem_type == REGRESSION:
        raise UserError("contrastive pairs need classes: a regression target has none; run full_finetune")
    if num_iterations < 1:
        raise UserError(f"--num_iterations must be at least 1, not {num_iterations}")
    if 2 * len(labels) * num_iterations > MAX_PAIRS:
        raise UserError(
            f"--num_iterations {num_iterations} on {len(labels):,} training examples makes "
            f"{2 * len(labels) * num_iterations:,} pairs, more than the {MAX_PAIRS:,} held in memory; pass at most "
            f"--num_iterations {max(1, MAX_PAIRS // (2 * len(labels)))}"
        )
    rng, pairs = random.Random(seed), []
    alike, unlike = _partners(labels, problem_type, rng)
    for _ in tqdm(range(num_iterations), desc="Building pairs", disable=not progress):
        for i in range(len(labels)):
            pairs += [(i, j, 1.0) for j in alike(i)] + [(i, j, 0.0) for j in unlike(i)]
    rng.shuffle(pairs)
    return pairs


def _partners(labels: list, problem_type: str, rng: random.Random):
    """(alike, unlike): each draws, for example i, one uniformly random partner of that kind ([] when it has
    none). Both draw by rejection (single-label within the label's members and over all examples; multi-label:
    _multi_label_partners), so a large training set costs no table of every pair."""
    n = len(labels)
    if problem_type == MULTI:
        return _multi_label_partners([frozenset(j for j, v in enumerate(y) if v > 0.5) for y in labels], rng)
    y = [int(v) for v in labels]
    members: dict[int, list[int]] = {}
    for i, label in enumerate(y):
        members.setdefault(label, []).append(i)
    lonely = [label for label, group in members.items() if len(group) < 2]
    if lonely:
        raise UserError(f"{len(lonely)} class(es) have one training example (no pair of the same label); "
                        "give every class at least 2")  # fmt: skip
    if len(members) < 2:
        raise UserError("the training data has one class: no pair of different labels; give it two or more")

    def draw(pool, keep) -> list[int]:
        while not keep(j := pool()):
            pass
        return [j]

    return (lambda i: draw(lambda: rng.choice(members[y[i]]), lambda j: j != i)), (
        lambda i: draw(lambda: rng.randrange(n), lambda j: y[j] != y[i])
    )


def _multi_label_partners(sets: list[frozenset], rng: random.Random):
    """Multi-label (alike, unlike) by rejection: alike is uniform over the examples sharing a label with i (a label
    of i drawn in proportion to its members, one of them, kept with probability 1 / the labels it shares with i);
    unlike is uniform over all examples, kept when it shares none. Whether a partner exists is counted once per
    distinct label set; a set that almost every example overlaps lists its few unlike partners instead. A table
    of every pair, as before, took n² memory: 10,000 examples, 10^8 entries."""
    n, members = len(sets), {}
    for i, labels in enumerate(sets):
        for label in labels:
            members.setdefault(label, []).append(i)
    overlapping: dict[frozenset, int] = {}  # a label set -> how many examples share a label with it (itself too)
    few_unlike: dict[frozenset, list[int]] = {}

    def overlap(labels: frozenset) -> int:
        if labels not in overlapping:
            overlapping[labels] = len(set().union(*(members[label] for label in labels)))
        return overlapping[labels]

    def alike(i: int) -> list[int]:
        labels = sets[i]
        if overlap(labels) < 2:  # no label, or labels no other example has
            return []
        order = sorted(labels)
        while True:
            label = rng.choices(order, weights=[len(members[k]) for k in order])[0]
            j = rng.choice(members[label])
            if j != i and rng.random() < 1 / len(labels & sets[j]):
                return [j]

    def unlike(i: int) -> list[int]:
        labels = sets[i]
        others = n - overlap(labels) - (0 if labels else 1)  # i overlaps itself, unless it has no label
        if others == 0:
            return []
        if 64 * others < n:  # rejection would take over 64 draws a pair: list them (per label set, not per i)
            if labels not in few_unlike:
                few_unlike[labels] = [j for j in range(n) if not labels & sets[j]]
            return [rng.choice([j for j in few_unlike[labels] if j != i])]
        while (j := rng.randrange(n)) == i or labels & sets[j]:
            pass
        return [j]

    return alike, unlike


def embed(encoder: nn.Module, batch: dict, pooling: str, normalize: bool) -> torch.Tensor:
    """A batch's sentence embeddings: the encoder's states pooled (and L2-normalised where the model says)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    vectors = pool(encoder(**inputs), batch["attention_mask"], pooling)
    return F.normalize(vectors, dim=-1) if normalize else vectors


def cosine_pair_loss(first: torch.Tensor, second: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' CosineSimilarityLoss, SetFit's default: the squared gap between the pair's cosine
    similarity and its target (1 alike, 0 unlike)."""
    return F.mse_loss(F.cosine_similarity(first.float(), second.float()), targets.float())


def pair_dataloader(ds, pairs: list, tokenizer, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled batches of pairs: both sides' token ids padded together (one forward encodes the batch's
    2 x batch_size texts: first sides, then second sides) and the pairs' targets as "labels"."""
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in ds.column_names]
    rows = ds.select_columns(columns).to_list()
    collator = DataCollatorWithPadding(tokenizer)

    def collate(batch: list[tuple[int, int, float]]) -> dict:
        texts = collator([rows[i] for i, _, _ in batch] + [rows[j] for _, j, _ in batch])
        return {**texts, "labels": torch.tensor([t for _, _, t in batch])}

    generator = torch.Generator().manual_seed(seed)  # as data.build_dataloader: the global RNG untouched
    return torch.utils.data.DataLoader(pairs, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                       generator=generator)  # fmt: skip


def embed_splits(classifier: SentenceClassifier, splits: dict, tokenizer, accelerator, batch_size: int) -> dict:
    """Each split's sentence embeddings from the classifier's (tuned) encoder, in inference mode: each process
    embeds its share, all receive the whole (features.encode)."""
    use_bf16 = accelerator.mixed_precision == "bf16"
    collator, config = DataCollatorWithPadding(tokenizer), classifier.config
    out = {}
    for split, ds in splits.items():
        vectors = encode(classifier.encoder, ds, collator, accelerator, config.pooling, batch_size, use_bf16,
                         f"embed {split}")  # fmt: skip
        out[split] = F.normalize(vectors, dim=-1) if config.normalize else vectors
    return out


def fit_head(classifier: SentenceClassifier, features: torch.Tensor, labels, task, seed: int) -> None:
    """SetFit's head: scikit-learn's logistic regression on the embeddings (one per label for multi-label; the
    task's class weights as sample weights), copied into the classifier's linear layer. Deterministic (lbfgs),
    so every process fits the same."""
    from sklearn.linear_model import LogisticRegression

    x, y = features.float().numpy(), np.asarray(labels)
    weights = None if task.class_weights is None else np.asarray(task.class_weights)
    if task.problem_type != MULTI:
        y = y.astype(int)
        fitted = LogisticRegression(max_iter=1000, random_state=seed).fit(
            x, y, sample_weight=None if weights is None else weights[y]
        )
        coef, bias = fitted.coef_, fitted.intercept_
        if len(fitted.classes_) == 2:  # one score for the second class: softmax([0, s]) = sigmoid(s)
            coef, bias = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
        columns = fitted.classes_
    else:
        coef, bias, columns = np.zeros((y.shape[1], x.shape[1])), np.zeros(y.shape[1]), np.arange(y.shape[1])
        for j in range(y.shape[1]):
            yj = (y[:, j] > 0.5).astype(int)
            if yj.min() == yj.max():  # a label always (or never) given: a constant score
                bias[j] = 10.0 if yj[0] else -10.0
                continue
            sample = None if weights is None else np.where(yj == 1, weights[j], 1.0)
            fitted = LogisticRegression(max_iter=1000, random_state=seed).fit(x, yj, sample_weight=sample)
            coef[j], bias[j] = fitted.coef_[0], fitted.intercept_[0]
    weight = torch.zeros_like(classifier.classifier.weight)
    weight[torch.as_tensor(columns)] = torch.as_tensor(coef, dtype=weight.dtype)
    with torch.no_grad():
        classifier.classifier.weight.copy_(weight)
        classifier.classifier.bias.zero_()
        classifier.classifier.bias[torch.as_tensor(columns)] = torch.as_tensor(bias, dtype=weight.dtype)


class SentenceClassifierConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, encoder: dict | None = None, pooling: str = "mean", normalize: bool = False, **kwargs):
        self.encoder, self.pooling, self.normalize = encoder or {}, pooling, normalize
        super().__init__(**kwargs)


class SentenceClassifier(PreTrainedModel):
    """A sentence encoder, its pooling (and normalisation), and a linear head over the embedding: the model the
    contrastive recipe trains in stage 2 and saves, a Transformers classifier whole."""

    config_class = SentenceClassifierConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"

    def __init__(self, config: SentenceClassifierConfig, encoder: PreTrainedModel | None = None):
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(encoder_config)
        self.classifier = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation for the head; the encoder comes trained (or is loaded over)."""

    def embed(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        return embed(self.encoder, batch, self.config.pooling, self.config.normalize)

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_) -> SequenceClassifierOutput:
        inputs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return SequenceClassifierOutput(logits=self.classifier(self.embed(input_ids, attention_mask, **inputs)))


def sentence_classifier(encoder: PreTrainedModel, task, pooling: str, normalize: bool) -> SentenceClassifier:
    """The classifier around a (tuned) encoder, with the task's labels."""
    config = SentenceClassifierConfig(
        encoder=encoder.config.to_dict(), pooling=pooling, normalize=normalize, num_labels=task.num_labels,
        id2label=dict(enumerate(task.label_names)), label2id={n: i for i, n in enumerate(task.label_names)},
        problem_type=task.problem_type,
    )  # fmt: skip
    return SentenceClassifier(config, encoder)


AutoConfig.register(MODEL_TYPE, SentenceClassifierConfig)
AutoModelForSequenceClassification.register(SentenceClassifierConfig, SentenceClassifier)
