"""Output-directory ownership through the real command line: a run only ever removes what a run wrote."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_inline

from finetune_recipes import kit, ownership
from finetune_recipes.config import TrainingArguments
from finetune_recipes.ownership import LOCK, MANIFEST, write_manifest
from finetune_recipes.training import save


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under `root`, with the bytes of each file."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(recipe: str, args: list, expected: str, root: Path) -> None:
    """The run exits 2 with one line saying `expected`, and nothing under `root` changes, byte for byte."""
    before = snapshot(root)
    proc = run_inline(recipe, *args, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("error: ") and expected in last, last
    assert snapshot(root) == before


def short(args: list) -> list:
    return [*map(str, args), "--max_train_steps", "2"]


def test_overwrite_removes_what_runs_wrote_and_keeps_the_users_files(tiny_args, tmp_path):
    out = tmp_path / "out"
    run_inline("full_finetune", *short(tiny_args), "--checkpointing_steps", "1")
    assert "checkpoints" in json.loads((out / MANIFEST).read_text())["entries"]
    (out / "notes.txt").write_text("mine")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    run_inline("full_finetune", *short(tiny_args), "--overwrite_output_dir")
    assert (out / "notes.txt").read_text() == "mine" and (out / ".git" / "HEAD").exists()
    assert not (out / "checkpoints").exists()  # the first run's, removed
    entries = json.loads((out / MANIFEST).read_text())["entries"]
    assert "model.safetensors" in entries and "notes.txt" not in entries and ".git" not in entries


def test_overwrite_refuses_a_directory_no_run_wrote_and_never_removes_the_runs_data(tiny_args, tiny_data, tmp_path):
    data = tmp_path / "mydata"
    data.mkdir()
    shutil.copy(tiny_data["train"], data / "train.csv")
    args = [*short(tiny_args), "--train_file", data / "train.csv", "--output_dir", data, "--overwrite_output_dir"]
    refused("full_finetune", args, "holds 'train.csv', which no run wrote", tmp_path)


def test_overwrite_refuses_to_remove_an_input_of_the_run(tiny_args, tmp_path):
    out = tmp_path / "out"
    run_inline("full_finetune", *short(tiny_args))
    # The model trained there is this run's input: overwriting would delete it under the run.
    args = [*short(tiny_args), "--model_name_or_path", out, "--overwrite_output_dir"]
    refused("full_finetune", args, "an input of this run", tmp_path)


def test_resuming_another_runs_checkpoint_into_a_finished_run_is_refused(tiny_args, tmp_path):
    other = tmp_path / "other"
    run_inline("full_finetune", *short(tiny_args), "--output_dir", other, "--checkpointing_steps", "1")
    run_inline("full_finetune", *short(tiny_args))
    args = [*short(tiny_args), "--resume_from_checkpoint", other / "checkpoints" / "step_1"]
    refused("full_finetune", args, "holds another run's outputs, which resuming from", tmp_path)


def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_holder(tiny_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"the run of pid 4242 on somehost")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
    try:
        refused("full_finetune", short(tiny_args), "is in use by the run of pid 4242 on somehost", tmp_path)
    finally:
        os.close(fd)
    run_inline("full_finetune", *short(tiny_args))  # released with its holder: a dead run leaves no stale lock
    assert (out / "results.json").exists()


@pytest.mark.slow
def test_compare_keeps_a_users_file_in_a_recipes_directory(tiny_args, tmp_path):
    out = tmp_path / "compare"
    (out / "full_finetune").mkdir(parents=True)
    (out / "full_finetune" / "mine.txt").write_text("mine")  # in the folder of an earlier comparison's run
    write_manifest(out, ["full_finetune"], set())
    flags = [a for a in short(tiny_args)]
    flags = flags[: flags.index("--output_dir")] + flags[flags.index("--output_dir") + 2 :]
    from finetune_recipes.tools.cli import main

    argv = ["compare", "--recipes", "full_finetune", "--no_baseline", "--output_dir", str(out), *flags]
    main([*argv, "--overwrite_output_dir"])  # out holds a folder named like a recipe: an earlier comparison
    assert (out / "full_finetune" / "mine.txt").read_text() == "mine"
    assert "which no run wrote" in (out / "logs" / "full_finetune.log").read_text()


def fail_with(errno_code: int):
    def fail(*args, **kwargs):
        raise OSError(errno_code, os.strerror(errno_code))

    return fail


# Tests run as root, where chmod cannot make a directory unwritable and a full disk cannot be had: the
# faults are injected as the OSError the write would raise.
def test_a_full_disk_at_the_final_save_leaves_no_half_written_model(tiny_args, tmp_path, monkeypatch):
    out = tmp_path / "out"
    atomic_write = save.atomic_write

    def full_disk(path, content):  # at results.json, the last file of the final save
        return fail_with(errno.ENOSPC)() if path.name == "results.json" else atomic_write(path, content)

    monkeypatch.setattr(save, "atomic_write", full_disk)
    proc = run_inline("full_finetune", *short(tiny_args), check=False)
    code, err = proc.returncode, proc.stderr
    last = err.strip().splitlines()[-1]
    assert code == 2 and last == f"error: cannot save the outputs to {out} (No space left on device); none was " \
        "written: free space or fix permissions, then run again"  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MANIFEST])  # no config.json without its weights


@pytest.mark.parametrize("errno_code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_output_dir_stops_before_training(errno_code, tiny_args, tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "lock_output_dir", fail_with(errno_code))  # the run's first write
    monkeypatch.setattr(kit, "train_batches", fail_with(errno.EIO))  # training must not start
    proc = run_inline("full_finetune", *short(tiny_args), check=False)
    code, err = proc.returncode, proc.stderr
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: cannot write to output_dir {tmp_path / 'out'} ")
    assert f"({os.strerror(errno_code)}); pass a writable --output_dir" in last


def test_too_little_disk_for_the_model_stops_before_training(tiny_args, tmp_path, monkeypatch):
    monkeypatch.setattr(ownership.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    monkeypatch.setattr(kit, "train_batches", fail_with(errno.EIO))
    proc = run_inline("full_finetune", *short(tiny_args), check=False)
    code, err = proc.returncode, proc.stderr
    last = err.strip().splitlines()[-1]
    assert code == 2 and "has 0 MB free and the saved model alone needs" in last, last


def checkpointed(tiny_args: list, out: Path) -> list:
    """Four optimizer steps, a checkpoint after each of the first... every 2: step_2 and step_4."""
    args = [*map(str, tiny_args), "--max_train_steps", "4", "--checkpointing_steps", "2", "--save_total_limit", "5"]
    run_inline("full_finetune", *args)
    return args


def test_resume_passes_over_an_incomplete_checkpoint_and_refuses_one_named(tiny_args, tmp_path):
    out = tmp_path / "out"
    args = checkpointed(tiny_args, out)
    (out / "checkpoints" / "step_4" / "random_states_0.pkl").unlink()  # the RNG state is gone: it would diverge
    refused(
        "full_finetune",
        [*args, "--resume_from_checkpoint", out / "checkpoints" / "step_4"],
        "step_4 is incomplete (random_states_0.pkl is missing)",
        tmp_path,
    )
    proc = run_inline("full_finetune", *args, "--resume_from_checkpoint", "latest")
    assert "step_4 is incomplete (random_states_0.pkl is missing): passed over" in proc.stderr
    assert "Resumed at step 2" in proc.stderr


def test_a_corrupted_checkpoint_is_one_line(tiny_args, tmp_path):
    out = tmp_path / "out"
    args = checkpointed(tiny_args, out)
    optimizer = out / "checkpoints" / "step_4" / "optimizer.bin"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # the right size, garbage inside
    refused("full_finetune", [*args, "--resume_from_checkpoint", "latest"], "cannot load checkpoint", tmp_path)


def test_resume_refuses_other_settings_or_data_unless_told(tiny_args, tiny_data, tmp_path):
    out = tmp_path / "out"
    args = checkpointed(tiny_args, out)
    resume = [*args, "--resume_from_checkpoint", "latest"]
    refused("full_finetune", [*resume, "--learning_rate", "2e-3"], "learning_rate 0.001 → 0.002", tmp_path)
    other = tmp_path / "other.csv"
    other.write_text(tiny_data["train"].read_text().replace("market", "stock"))
    refused("full_finetune", [*resume, "--train_file", other], "train_data", tmp_path)
    proc = run_inline("full_finetune", *resume, "--learning_rate", "2e-3", "--allow_config_change_on_resume")
    assert "Resumed at step 4" in proc.stderr


def test_the_final_save_never_replaces_a_users_file_of_the_same_name(tiny_args, tmp_path):
    out = tmp_path / "out"
    run_inline("full_finetune", *short(tiny_args))
    (out / "param_groups.md").write_text("my notes")  # the user's, not in the manifest
    proc = run_inline("llrd", *short(tiny_args), "--overwrite_output_dir", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "param_groups.md is not a run's output" in last, last
    assert (out / "param_groups.md").read_text() == "my notes"
    assert (out / ".partial_outputs" / "model.safetensors").exists()  # the trained model is not lost


def test_a_run_checks_its_output_dir_once_and_again_only_if_it_changed(tiny_args, tmp_path, monkeypatch):
    from finetune_recipes.errors import UserError

    calls = []
    real = ownership.refuse_output_dir
    monkeypatch.setattr(ownership, "refuse_output_dir", lambda *a: calls.append(a) or real(*a))
    run_inline("full_finetune", *short(tiny_args))
    assert len(calls) == 1  # at the start; the claim before the first write found it unchanged
    fresh = TrainingArguments(output_dir=str(tmp_path / "fresh"))
    checked = ownership.check_output_dir(fresh)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "notes.txt").write_text("mine, written after the run's start")
    with pytest.raises(UserError, match="is not empty"):
        ownership.claim_output_dir(fresh, [], needed_mb=0, checked=checked)
    assert len(calls) == 3 and (tmp_path / "fresh" / "notes.txt").read_text() == "mine, written after the run's start"


def test_a_file_dropped_in_while_a_run_writes_is_never_the_runs(tmp_path):
    from finetune_recipes.ownership import claim_output_dir, entries, owned_entries

    args = TrainingArguments(output_dir=str(tmp_path))
    out = claim_output_dir(args, [], needed_mb=0, ahead=["checkpoints"])  # at the start
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "notes.txt").write_text("mine, written mid-run")
    (tmp_path / "config.json").write_text("{}")
    out.record("config.json")  # the final save
    assert json.loads((tmp_path / MANIFEST).read_text())["entries"] == sorted(["checkpoints", "config.json", MANIFEST])
    assert owned_entries(tmp_path) & entries(tmp_path) - {MANIFEST, LOCK} == {"checkpoints", "config.json"}


def test_a_tools_directory_in_use_names_the_tools_own_flag(tmp_path):
    from finetune_recipes.errors import UserError
    from finetune_recipes.ownership import claim_tool_dir

    def claim():
        return claim_tool_dir(tmp_path, "tune", ["study.db"])

    first = claim()
    try:
        with pytest.raises(UserError, match=r"^\S+ is in use by the run of pid \d+ .*pass another --output_dir$"):
            claim()
    finally:
        os.close(first)


def test_an_overwritten_comparison_drops_the_earlier_runs_it_does_not_redo(tmp_path):
    from finetune_recipes.ownership import write_manifest
    from finetune_recipes.tools.compare import drop_earlier_runs

    for name in ("llrd", "lora", "full_finetune_seed43"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        write_manifest(tmp_path / name, ["config.json"], set())
    (tmp_path / "lora" / "mine.txt").write_text("the user's")
    drop_earlier_runs(tmp_path, planned={"llrd"})
    assert (tmp_path / "llrd" / "config.json").exists()  # this comparison's own: its run replaces it
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["mine.txt"]
    assert not (tmp_path / "full_finetune_seed43").exists()


# Issue 39, item 8: a full disk met inside a library that loses the errno (tokenizers raises a plain Exception,
# safetensors a SafetensorError), at the final save and at a checkpoint.
def test_a_full_disk_in_the_tokenizer_library_leaves_no_staged_outputs(tiny_args, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def full_disk(self, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    out = tmp_path / "out"
    proc = run_inline("full_finetune", *short(tiny_args), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last == f"error: cannot save the outputs to {out} (No space left on device); " \
        "none was written: free space or fix permissions, then run again"  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MANIFEST])  # no .partial_outputs left


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_whole_one(tiny_args, tmp_path, monkeypatch):
    from accelerate import Accelerator
    from safetensors import SafetensorError

    save_state = Accelerator.save_state

    def full_at_step_4(self, output_dir=None, **kwargs):
        save_state(self, output_dir, **kwargs)  # the weights written, then the disk was full
        if "step_4" in str(output_dir):
            message = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            raise SafetensorError(f"Error while serializing: {message}")

    monkeypatch.setattr(Accelerator, "save_state", full_at_step_4)
    out = tmp_path / "out"
    args = [*map(str, tiny_args), "--max_train_steps", "4", "--checkpointing_steps", "2", "--save_total_limit", "5"]
    proc = run_inline("full_finetune", *args, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: cannot save step_4 in {out / 'checkpoints'} (No space left on device): free")
    assert "the last checkpoint is step 2" in last and "--resume_from_checkpoint latest" in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # no .partial_step_4


def test_the_space_check_counts_what_the_run_saves(tiny_args, tiny_model, tmp_path, monkeypatch):
    """A LoRA run saves its adapter (kilobytes), not the frozen model: a disk with room for the one and not the
    other refuses full fine-tuning before training and lets LoRA train."""
    model_mb = (tiny_model / "model.safetensors").stat().st_size / 2**20
    free = int(model_mb / 2 * 2**20)
    monkeypatch.setattr(ownership.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, 0, free))
    monkeypatch.setattr(kit, "train_batches", fail_with(errno.EIO))  # stops either run where training starts
    refused = run_inline("full_finetune", *short(tiny_args), check=False)
    assert "the saved model alone needs" in refused.stderr.strip().splitlines()[-1]
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):  # it got to its training
        run_inline("lora", *short(tiny_args), "--output_dir", tmp_path / "lora", check=False)


def test_a_tools_folder_from_before_its_manifest_is_adopted_once_and_only_whole(tmp_path, capsys):
    """cv, tune and compare kept no manifest before 2026-12-06: their folders are taken as theirs once, when they
    hold the signature file and nothing else than what they wrote by name then; a user's file there blocks it."""
    from finetune_recipes.errors import UserError
    from finetune_recipes.ownership import claim_tool_dir, owned_entries
    from finetune_recipes.tools.cv import claim_cv_dir

    earlier = tmp_path / "earlier"
    for name in ("fold_0", "fold_1", "logs", "folds"):
        (earlier / name).mkdir(parents=True)
    (earlier / "cv.json").write_text("{}")
    (earlier / "cv.md").write_text("| fold |")
    lock, resume = claim_cv_dir(earlier, {"folds": 2}, True, [])
    os.close(lock)
    assert "was written by an earlier cv" in capsys.readouterr().err
    assert {"fold_0", "fold_1", "logs"} <= owned_entries(earlier)  # adopted, then replaced (another plan)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "cv.json").write_text("{}")
    (mixed / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds 'cv.json', which cv did not write"):
        claim_cv_dir(mixed, {"folds": 2}, True, [])
    assert (mixed / "notes.txt").read_text() == "mine" and not (mixed / MANIFEST).exists()
    with pytest.raises(UserError, match="holds 'x', which tune did not write"):
        (tmp_path / "t" / "x").mkdir(parents=True)
        claim_tool_dir(tmp_path / "t", "tune", ["study.db"])
