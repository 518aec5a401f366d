"""Checkpoints of a training run: the whole training state (`accelerator.save_state`) saved atomically every N steps,
the newest kept, resumed by path or as `latest`; and the final model saved atomically."""

from __future__ import annotations

import os
import shutil

__all__ = ["list_checkpoints", "checkpoint_step", "resolve_resume_checkpoint", "save_checkpoint", "save_final_model"]

CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-{step}` folders of `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith(CHECKPOINT_PREFIX) and n.split("-")[-1].isdigit()]
    return [os.path.join(output_dir, n) for n in sorted(names, key=checkpoint_step)]


def checkpoint_step(path: str) -> int:
    """The optimizer step a `checkpoint-{step}` folder was saved at."""
    return int(os.path.basename(os.path.normpath(path)).split("-")[-1])


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The folder to resume from: `None`, a folder (checked), or `"latest"` (the newest checkpoint of `output_dir`,
    `None` when there is none yet, so that a restarted job starts from scratch)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        existing = list_checkpoints(output_dir)
        return existing[-1] if existing else None
    if not os.path.isdir(resume_from_checkpoint):
        raise ValueError(f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is not a folder.")
    return resume_from_checkpoint


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """`accelerator.save_state` into a temporary folder, renamed atomically to `checkpoint-{step}`; with
    `total_limit`, older checkpoints beyond the newest `total_limit` are removed. Call it on every process."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temporary = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit is not None:
            existing = list_checkpoints(output_dir)
            for old in existing[: max(0, len(existing) - total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final_model(model, processor, output_dir: str, model_card=True):
    """`save_pretrained` of model and processor into a temporary folder, then the files moved into `output_dir` (a
    crash never leaves a half-written model there). Main process only."""
    temporary = os.path.join(output_dir, ".tmp-final-model")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, model_card=model_card)
    processor.save_pretrained(temporary)
    for name in os.listdir(temporary):
        os.replace(os.path.join(temporary, name), os.path.join(output_dir, name))
    shutil.rmtree(temporary, ignore_errors=True)
