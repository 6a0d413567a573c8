"""What a run hands on: the model card, the evaluation report and pictures, predictions files, the Hub
upload (against a fake HfApi: no network), the tensorboard tracker, and `finetune-recipes report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import run_inline
from huggingface_hub import ModelCard
from test_cli import snapshot
from test_recipes import LABELS, RECIPES

from finetune_recipes.tools.cli import main as cli

PNG = b"\x89PNG\r\n\x1a\n"


def assert_card_matches_results(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    prefixes = {"validation": "eval", "test": "test"}
    assert found and all(results[f"{prefixes[split]}_{metric}"] == v for (split, metric), v in found.items())
    assert "## How to use" in card.text and str(out) in card.text


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000, path


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_writes_card_pictures_and_predictions(recipe, tiny_args, tiny_data, tmp_path):
    run_inline(recipe, *tiny_args, "--max_train_steps", "6")
    out = tmp_path / "out"
    assert_card_matches_results(out)
    for picture in ("confusion_matrix.png", "training_curves.png"):
        assert_png(out / picture)
    assert "| label | precision | recall | F1 | support |" in (out / "eval_report.md").read_text()
    for split in ("validation", "test"):
        rows = list(csv.DictReader((out / f"predictions_{split}.csv").open()))
        expected = list(csv.DictReader(tiny_data[split].open()))
        assert len(rows) == len(expected) and [r["text"] for r in rows] == [r["text"] for r in expected]
        assert {r["predicted"] for r in rows} <= LABELS and [r["label"] for r in rows] == [r["label"] for r in expected]
    manifest = json.loads((out / ".finetune_recipes.json").read_text())["entries"]
    assert {"README.md", "eval_report.md", "predictions_test.csv", "confusion_matrix.png"} <= set(manifest)


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list[tuple[str, dict]] = []

    def whoami(self, token=None):
        self.calls.append(("whoami", {"token": token}))
        return {"name": "me"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = [
            str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file()
        ]
        kept = sorted(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))
        self.calls.append(("upload_folder", {**kwargs, "files": kept}))


@pytest.fixture
def fake_hub(monkeypatch):
    import finetune_recipes.reporting.hub as hub

    FakeHub.calls = []
    monkeypatch.setattr(hub, "HfApi", FakeHub)
    monkeypatch.setattr(hub, "get_token", lambda: None)  # no cached login on the test machine
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeHub.calls


SECRET = "hf_not_a_real_token_31337"


def test_push_uploads_the_run_but_not_its_checkpoints_and_never_writes_the_token(
    tiny_args, tmp_path, monkeypatch, fake_hub
):
    flags = ["--push_to_hub", "--hub_model_id", "me/tiny", "--hub_private_repo", "--hub_token", SECRET]
    flags += ["--max_train_steps", "4", "--checkpointing_steps", "2", "--report_to", "tensorboard"]
    proc = run_inline("full_finetune", *tiny_args, *flags)
    calls = dict(fake_hub)
    assert calls["whoami"] == {"token": SECRET}
    assert calls["create_repo"]["repo_id"] == "me/tiny" and calls["create_repo"]["private"] is True
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/tiny" and upload["commit_message"].startswith("finetune-recipes full_finetune:")
    assert {"README.md", "model.safetensors", "config.json", "predictions_test.csv"} <= set(upload["files"])
    assert not [f for f in upload["files"] if f.startswith(("checkpoints/", ".finetune_recipes", "finetune_recipes/"))]
    out = tmp_path / "out"
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in proc.stderr


def test_nothing_is_pushed_when_the_run_fails(tiny_args, tmp_path, monkeypatch, fake_hub):
    import finetune_recipes.training.save as save_module
    from finetune_recipes.errors import UserError

    def disk_full(*args, **kwargs):
        raise UserError("cannot save the outputs (disk full)")

    monkeypatch.setattr(save_module, "publish", disk_full)
    flags = ["--push_to_hub", "--hub_model_id", "me/tiny", "--hub_token", SECRET, "--max_train_steps", "2"]
    proc = run_inline("full_finetune", *tiny_args, *flags, check=False)
    assert proc.returncode == 2 and [name for name, _ in fake_hub] == ["whoami"]


@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("no model id", ["--push_to_hub"], "push_to_hub needs --hub_model_id"),
        ("no credentials", ["--push_to_hub", "--hub_model_id", "me/x"], "needs Hub credentials"),
        ("offline", ["--push_to_hub", "--hub_model_id", "me/x", "--hub_token", SECRET], "HF_HUB_OFFLINE is set"),
        ("unreachable", ["--push_to_hub", "--hub_model_id", "me/x", "--hub_token", SECRET], "cannot reach the Hub"),
    ],
)
def test_push_problems_stop_before_training(case, flags, message, tiny_args, tmp_path, monkeypatch, capsys, fake_hub):
    import finetune_recipes.reporting.hub as hub

    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "unreachable":

        class Offline(FakeHub):
            def whoami(self, token=None):
                raise ConnectionError(f"Max retries exceeded (token {token})")

        monkeypatch.setattr(hub, "HfApi", Offline)
    proc = run_inline("full_finetune", *tiny_args, *flags, check=False)
    code, err = proc.returncode, proc.stderr
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and message in last and "Traceback" not in err
    assert SECRET not in err and not (tmp_path / "out").exists()


def test_tensorboard_event_files_hold_the_loss_and_eval_metric(tiny_args, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_inline("full_finetune", *tiny_args, "--report_to", "tensorboard", "--logging_steps", "2")
    logs = tmp_path / "out" / "finetune_recipes"
    (events,) = [p for p in logs.glob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/f1_macro"} <= set(tags)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [e.value for e in accumulator.Scalars("eval/accuracy")] == pytest.approx(
        [h["accuracy"] for h in results["history"]]
    )
    assert len(accumulator.Scalars("train/loss")) == len(results["loss_history"]) > 3


def test_report_redraws_a_finished_run_and_refuses_what_is_not_one(tiny_args, tmp_path, monkeypatch, capsys):
    run_inline("full_finetune", *tiny_args, "--max_train_steps", "4")
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    for name in ("README.md", "eval_report.md", "confusion_matrix.png", "training_curves.png"):
        (out / name).unlink()
    cli(["report", str(out)])
    assert (out / "README.md").read_text() == card
    assert_png(out / "confusion_matrix.png")

    assert_card_matches_results(out)
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli(["report", str(empty)])
    assert exit_info.value.code == 2 and "holds no finished run (no results.json)" in capsys.readouterr().err
    assert snapshot(tmp_path) == before

    (out / "eval_report.md").unlink()
    (out / "eval_report.md").write_text("my notes")  # now the user's (a run's manifest still lists it)
    manifest = out / ".finetune_recipes.json"
    entries = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**entries, "entries": [e for e in entries["entries"] if e != "eval_report.md"]}))
    with pytest.raises(SystemExit):
        cli(["report", str(out)])
    assert "eval_report.md is not a run's output" in capsys.readouterr().err
    assert (out / "eval_report.md").read_text() == "my notes"


@pytest.mark.parametrize("name, content", [("results.json", '{"eval_accuracy": 0.'), ("config.json", "[]")])
def test_report_on_a_damaged_saved_file_is_one_line(name, content, tiny_args, tmp_path, capsys):
    run_inline("full_finetune", *tiny_args, "--max_train_steps", "2")
    out = tmp_path / "out"
    (out / name).write_text(content)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli(["report", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and f"{out / name} is damaged" in lines[0], lines
    assert snapshot(tmp_path) == before


def test_report_keeps_a_card_the_user_edited_and_redraws_the_rest(tiny_args, tmp_path, capsys):
    run_inline("full_finetune", *tiny_args, "--max_train_steps", "2")
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    (out / "README.md").write_text(card + "\nMy notes on this model.\n")
    (out / "eval_report.md").unlink()
    cli(["report", str(out)])
    assert (out / "README.md").read_text() == card + "\nMy notes on this model.\n"  # the user's edit stays
    assert "README.md was edited since it was written: kept" in capsys.readouterr().err
    assert (out / "eval_report.md").exists()
    (out / "README.md").unlink()
    cli(["report", str(out)])
    assert (out / "README.md").read_text() == card
    cli(["report", str(out)])  # unedited since report drew it: redrawn, without a word
    assert "edited" not in capsys.readouterr().err


def test_report_on_a_full_disk_is_one_line(tiny_args, tmp_path, capsys, monkeypatch):
    """Issue 39, item 7: a traceback before; each file is written whole (atomic) or not at all."""
    import errno
    import os

    from finetune_recipes import reporting

    run_inline("full_finetune", *tiny_args, "--max_train_steps", "2")
    out = tmp_path / "out"
    (out / "README.md").unlink()

    def full_disk(path, content):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(reporting, "atomic_write", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        cli(["report", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines[-1].startswith(f"error: {out / 'README.md'}: No space left on device")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name == "README.md"]
