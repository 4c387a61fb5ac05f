"""``start_checkpoint_export``: the one call the hook makes. It chooses the mode, and its handle
answers what the hook asks (running, wait, result, out_dir, the training thread's part) in every
mode, so the hook never reaches into a job's task. One process, a tiny LoRA model."""
from __future__ import annotations

import threading

import pytest
from conftest import lora_qwen2

from sa2va_hooks.converters.base import resolve_converter
from sa2va_hooks.export import BadValueError, checkpoint_export_mode, export_hf, start_checkpoint_export


def _converter(model):
    return resolve_converter("auto", model)


def test_checkpoint_export_mode_auto_is_captured_for_whole_parameters_and_refuses_unknown_modes():
    pm = lora_qwen2()
    assert checkpoint_export_mode(pm) == "captured"
    assert checkpoint_export_mode(pm, "sync") == "sync"
    with pytest.raises(BadValueError, match=r"must be one of auto, sync, captured, partitioned, gathered, got 'fast'"):
        checkpoint_export_mode(pm, "fast")


def test_sync_handle_is_finished_when_returned_and_matches_export_hf(tmp_path):
    pm = lora_qwen2()
    handle = start_checkpoint_export(pm, tmp_path / "sync", converter=_converter(pm), mode="sync", dtype="bf16")
    assert not handle.background and not handle.running and handle.wait(0)
    assert handle.out_dir == tmp_path / "sync" and handle.seconds is not None and handle.error is None
    assert handle.run_front() >= 0  # nothing left for the training thread
    reference = export_hf(pm, tmp_path / "reference", dtype="bf16")
    assert handle.result().root_digest == reference.root_digest == handle.manifest.root_digest


def test_captured_handle_runs_in_the_background_and_calls_on_done_with_itself(tmp_path):
    pm = lora_qwen2()
    done, seen = threading.Event(), []

    def on_done(h):
        seen.append(h)
        done.set()

    handle = start_checkpoint_export(pm, tmp_path / "bg", converter=_converter(pm), dtype="bf16", on_done=on_done,
                                     label="preparing the export of iteration 3")
    assert handle.mode == "captured" and handle.background
    assert handle.run_front() >= 0
    manifest = handle.result()
    assert done.wait(60) and seen == [handle] and not handle.running and handle.error is None
    assert manifest.provenance["training_paused_s"] >= 0
    assert manifest.root_digest == export_hf(pm, tmp_path / "reference", dtype="bf16").root_digest


@pytest.mark.parametrize("mode", ["sync", "captured"])
def test_an_error_met_working_out_the_options_is_raised_and_nothing_starts(tmp_path, mode):
    """``failed``: in one process the agreement raises the rank's own exception; no thread starts
    and nothing is written."""
    pm = lora_qwen2()
    before = threading.active_count()
    with pytest.raises(OSError, match="config vanished"):
        start_checkpoint_export(pm, tmp_path / "x", converter=_converter(pm), mode=mode,
                                failed=OSError("config vanished"))
    assert threading.active_count() == before and not (tmp_path / "x").exists()
