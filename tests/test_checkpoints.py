"""Atomic checkpoints: a failed save leaves the earlier checkpoints intact, rotation keeps the last
good one, and a damaged checkpoint gives a clear error naming the file, never a traceback."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align import api, checkpoints, cli
from align.checkpoints import MANIFEST, CheckpointError

FILES = ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
         "trainer_state.json"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path):  # same size, one byte changed: only the checksum can tell
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _empty(path):
    path.write_bytes(b"")


def _delete(path):
    path.unlink()


DAMAGE = {"truncated": _truncate, "flipped-byte": _flip_byte, "empty": _empty, "deleted": _delete}
MANIFEST_DAMAGE = {
    "manifest-deleted": (lambda d: (d / MANIFEST).unlink(), "no align_checkpoint.json"),
    "manifest-garbage": (lambda d: (d / MANIFEST).write_bytes(b"\x00\xff{"), "unreadable"),
    "manifest-no-files": (lambda d: (d / MANIFEST).write_text('{"state": {}}'), "unreadable"),
    "manifest-not-a-dict": (lambda d: (d / MANIFEST).write_text("[1, 2]"), "unreadable"),
    "checkpoint-deleted": (lambda d: shutil.rmtree(d), "does not exist"),
}


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the session's trained run, as if stopped after its last checkpoint (no summary.json,
    which marks a finished run): (config, output dir)."""
    config, out = trained_run
    shutil.copytree(out, tmp_path / "out")
    (tmp_path / "out" / "summary.json").unlink()
    return config, tmp_path / "out"


def _argv(config, out, *extra) -> list[str]:
    return ["train", "--config", str(config), "--output_dir", str(out), *extra]


def test_a_checkpoint_is_complete_and_verified(run):
    _, out = run
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    assert not list(out.glob(checkpoints.TMP_PREFIX + "*"))
    for path in checkpoints.list_checkpoints(out):
        manifest = json.loads((path / MANIFEST).read_text())
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
        assert set(manifest["files"]) == on_disk and set(FILES) <= on_disk
        state = checkpoints.verify(path)
        assert state["seed"] == 0 and state["nonfinite_steps"] == 0 and len(state["train_data"]) == 64


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", FILES)
def test_damaged_file_is_named(run, name, damage, record_property):
    _, out = run
    checkpoint = out / "checkpoint-8"
    DAMAGE[damage](checkpoint / name)
    with pytest.raises(CheckpointError, match=rf"{name} (is missing|does not match).*resume from another checkpoint"):
        checkpoints.verify(checkpoint)
    assert checkpoints.newest_good_checkpoint(out) == out / "checkpoint-4"  # the previous one is intact
    record_property("data_lost", 0)


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest_is_named(run, case, record_property):
    _, out = run
    damage, message = MANIFEST_DAMAGE[case]
    damage(out / "checkpoint-8")
    with pytest.raises(CheckpointError, match=message):
        checkpoints.verify(out / "checkpoint-8")
    assert checkpoints.newest_good_checkpoint(out) == out / "checkpoint-4"
    record_property("data_lost", 0)


def test_resume_from_a_damaged_checkpoint_is_a_clear_error(run, capsys, snapshot, record_property):
    config, out = run
    _truncate(out / "checkpoint-8" / "optimizer.pt")
    before = snapshot(out)
    assert cli.main(_argv(config, out, "--resume", str(out / "checkpoint-8"))) == 2
    err = capsys.readouterr().err
    assert "align: error:" in err and "checkpoint-8/optimizer.pt does not match" in err and "Traceback" not in err
    assert snapshot(out) == before  # nothing written
    record_property("data_lost", int(snapshot(out) != before))


def test_resume_passes_over_a_damaged_newest_checkpoint(run, trained_run, caplog, record_property):
    """``--resume``: checkpoint-8 is damaged, so training resumes from checkpoint-4 and ends exactly
    where the uninterrupted run ended; checkpoint-8 is rewritten whole."""
    config, out = run
    _flip_byte(out / "checkpoint-8" / "adapter_model.safetensors")
    assert cli.main(_argv(config, out, "--resume")) == 0
    assert "skipping checkpoint-8" in caplog.text
    checkpoints.verify(out / "checkpoint-8")
    expected, got = load_file(trained_run[1] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    record_property("data_lost", 0)


def test_resume_with_no_usable_checkpoint_is_a_clear_error(run, capsys, snapshot, record_property):
    config, out = run
    for path in checkpoints.list_checkpoints(out):
        _truncate(path / "scheduler.pt")
    before = snapshot(out)
    assert cli.main(_argv(config, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "checkpoint-4/scheduler.pt" in err and "checkpoint-8/scheduler.pt" in err
    assert "Traceback" not in err and snapshot(out) == before
    record_property("data_lost", 0)


def test_resume_without_checkpoints_starts_afresh_and_a_finished_run_is_not_trained_again(trained_run, tmp_path,
                                                                                         caplog, snapshot):
    """The same command serves the first start and every restart: ``--resume`` with no checkpoint yet trains
    from scratch (the same adapter as a run without it); on a finished run it trains nothing and exits 0."""
    config, reference = trained_run
    out = tmp_path / "new"
    caplog.set_level(logging.INFO)
    assert cli.main(_argv(config, out, "--resume")) == 0
    assert f"no checkpoint in {out} yet, starting a fresh run" in caplog.text
    expected, got = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    before = snapshot(out)
    assert cli.main(_argv(config, out, "--resume")) == 0
    assert "holds a finished run (8 steps; summary.json): not training again" in caplog.text
    assert snapshot(out) == before


@pytest.mark.parametrize("override, message", [
    (["--seed", "1"], r"another seed \(0, now 1\)"),
    (["--task_train_prompts", "24"], "another training data"),
])
def test_resume_with_other_seed_or_data_is_refused(run, override, message, capsys, snapshot, record_property):
    config, out = run
    before = snapshot(out)
    assert cli.main(_argv(config, out, "--resume", *override)) == 2
    err = capsys.readouterr().err
    assert "align: error:" in err and "checkpoint-8" in err
    assert re.search(message, err) and snapshot(out) == before
    record_property("data_lost", 0)


def test_failed_save_keeps_the_last_good_checkpoint(trained_run, tmp_path, monkeypatch, record_property):
    """A save that fails half-way (disk full while writing the optimizer state of checkpoint-8), with
    save_total_limit=1: checkpoint-4 is neither replaced nor rotated away, and resuming completes."""
    config, _ = trained_run
    out = tmp_path / "out"
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-8/optimizer.pt"):
            with open(f, "wb") as partial:
                partial.write(b"\x80\x02partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    overrides = {"output_dir": str(out), "save_total_limit": 1}
    with pytest.raises(OSError, match="No space left"):
        api.train(api.load_config(str(config), overrides))
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-4"]
    checkpoints.verify(out / "checkpoint-4")
    assert (out / ".tmp-checkpoint-8").is_dir()
    monkeypatch.setattr(torch, "save", real_save)
    api.train(api.load_config(str(config), overrides), resume_from_checkpoint=True)
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-8"]
    checkpoints.verify(out / "checkpoint-8")
    assert not list(out.glob(checkpoints.TMP_PREFIX + "*"))
    record_property("data_lost", 0)


def test_failed_final_save_keeps_the_earlier_adapter(trained_run, tmp_path, monkeypatch, record_property):
    """The final adapter is written beside the output directory and moved in file by file: a save that fails
    half-way leaves the earlier run's adapter whole; the next one replaces it and leaves nothing behind."""
    import peft.peft_model

    config, trained = trained_run
    out = tmp_path / "out"
    out.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(trained / name, out / name)
    earlier = (out / "adapter_model.safetensors").read_bytes()
    real_save = peft.peft_model.safe_save_file

    def disk_full(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as partial:
            partial.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    overrides = {"output_dir": str(out), "save_strategy": "no", "seed": 1}
    with pytest.raises(OSError, match="No space left"):
        api.train(api.load_config(str(config), overrides))
    assert (out / "adapter_model.safetensors").read_bytes() == earlier
    load_file(out / "adapter_model.safetensors")  # whole
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)
    api.train(api.load_config(str(config), overrides))
    assert (out / "adapter_model.safetensors").read_bytes() != earlier
    load_file(out / "adapter_model.safetensors")
    assert not list(out.glob(checkpoints.TMP_PREFIX + "*"))
    record_property("data_lost", 0)


def test_rotation_keeps_the_newest_and_the_protected(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "w").write_text(str(step))
    checkpoints.rotate(tmp_path, 2, protect={tmp_path / "checkpoint-8", tmp_path / "checkpoint-2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-8"]
    checkpoints.rotate(tmp_path, 1, protect={tmp_path / "checkpoint-8"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-8"]
    checkpoints.rotate(tmp_path, None, protect=set())  # no limit: nothing deleted
    assert (tmp_path / "checkpoint-8" / "w").read_text() == "8"
