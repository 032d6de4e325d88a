"""Atomic checkpoints: a file is either absent or complete, never half written."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL = "final_model.zip"
_STEP_RE = re.compile(r"step_(\d+)\.zip$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_model(model: Any, path: Path) -> Path:
    """Save an SB3 model (policy, optimizer, step counter) atomically, plus ``VecNormalize``
    statistics beside it (``<name>.vecnormalize.pkl``) when the env has them."""
    buffer = io.BytesIO()
    model.save(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is not None:
        import pickle

        atomic_write_bytes(path.with_suffix(".vecnormalize.pkl"), pickle.dumps(vec_normalize))
    return path


def checkpoint_path(run_dir: Path, num_timesteps: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{num_timesteps:012d}.zip"


def checkpoint_step(path: Path) -> int:
    """The step counter saved in a checkpoint, read as plain JSON (nothing unpickled); -1 if unreadable."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            steps = json.loads(archive.read("data")).get("num_timesteps")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return -1
    return int(steps) if isinstance(steps, int) else -1


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the most steps in ``run_dir/checkpoints``, or None."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.search(p.name))]
    return max(found)[1] if found else None
