"""Checkpoints of a training run: the whole training state (`accelerator.save_state`) saved atomically every N steps,
the newest kept, resumed by path or as `latest`; and the final model saved atomically."""

from __future__ import annotations

import ctypes
import fnmatch
import os
import shutil

__all__ = ["list_checkpoints", "checkpoint_step", "resolve_resume_checkpoint", "save_checkpoint", "save_final_model",
           "swap_in_folder"]

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


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); `False` where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def swap_in_folder(source: str, target: str):
    """Make the complete folder `source` the folder `target` in one rename, removing the old `target`.

    Without a `target` this is `os.rename`; with one, both are exchanged in one atomic step where the system can
    (Linux), so that a reader (or a kill at any moment) sees the old folder or the new one, never a mix; elsewhere the
    old folder is renamed aside first (a kill between the two renames leaves `source` complete, and no `target`)."""
    if not os.path.exists(target):
        os.rename(source, target)
        return
    if _exchange(source, target):
        shutil.rmtree(source, ignore_errors=True)  # now the old folder
        return
    aside = f"{target}.old"
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(target, aside)
    os.rename(source, target)
    shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """`accelerator.save_state` into a temporary folder, swapped in as `checkpoint-{step}` with one rename
    ([`swap_in_folder`]); with `total_limit`, older checkpoints beyond the newest `total_limit` are removed. Call it
    on every process."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temporary = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_in_folder(temporary, final)
        if total_limit is not None:
            existing = list_checkpoints(output_dir)
            for old in existing[: max(0, len(existing) - total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


#: What `save_pretrained` of a model and an image processor writes at the top of a folder (an earlier model's files
#: are not carried over to the new folder).
_MODEL_FILES = ("config.json", "preprocessor_config.json", "README.md", "model.safetensors", "model-*.safetensors",
                "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _link_tree(source: str, target: str, skip_top: tuple[str, ...]):
    """Recreate `source`'s folders under `target` with hard links to its files (copies where links fail), leaving out
    top-level files matching `skip_top`. `source` is left untouched."""
    for folder, subfolders, files in os.walk(source):
        relative = os.path.relpath(folder, source)
        os.makedirs(os.path.join(target, relative), exist_ok=True)
        for name in files:
            if relative == "." and any(fnmatch.fnmatch(name, pattern) for pattern in skip_top):
                continue
            source_file, target_file = os.path.join(folder, name), os.path.join(target, relative, name)
            try:
                os.link(source_file, target_file)
            except OSError:
                shutil.copy2(source_file, target_file)


def save_final_model(model, processor, output_dir: str, model_card=True):
    """`save_pretrained` of model and processor into `output_dir`, atomically: a new folder is built beside it (the
    other contents of `output_dir`, checkpoints and logs, hard-linked; then the model and processor written), and
    swapped in with one rename ([`swap_in_folder`]). A kill at any moment leaves `output_dir` with the old model or
    the new one, each complete, never new weights beside an old config. Main process only."""
    output_dir = os.path.abspath(output_dir)
    staging = f"{output_dir}.tmp-final-model"
    shutil.rmtree(staging, ignore_errors=True)
    if os.path.isdir(output_dir):
        _link_tree(output_dir, staging, _MODEL_FILES)
    model.save_pretrained(staging, model_card=model_card)
    processor.save_pretrained(staging)
    swap_in_folder(staging, output_dir)
