"""Atomic training checkpoints: `checkpoint-<step>/` exists only once every file of it is written.

Layout of one checkpoint (all ranks take part; rank 0 writes the shared parts):
  <role>.trainable.safetensors  trainable tensors only (LoRA + full-trained extras), fp32
  <role>.optimizer.pt / <role>.scheduler.pt   torch state dicts (loaded with weights_only=True)
  rng-rank<r>.pt                torch CPU / device / generator RNG states, python `random` state
  data-rank<r>.json             data-loader position of every worker of rank r
  trainer_state.json            step, counters, stage state
  COMPLETE                      written last ({"step", "files": {relative path: bytes}, "xxh3_64": {relative
                                path: hex digest}}); a directory without it is never resumed from

Writes go to `.tmp-checkpoint-<step>/` and are renamed at the end, so a kill at any moment leaves
either the previous complete checkpoint or the new one, never a half one; stale temp dirs are
removed at start-up. Every file and the directory are fsync'ed before the marker is written, so a
power loss cannot leave a marked checkpoint with data still in the page cache. `verify` checks a
marked checkpoint against its marker (every file present with its size and content hash, safetensors
headers readable): `resume=auto` skips one that fails, naming the file, and takes the previous one. The
hash is xxHash's XXH3-64 (not cryptographic: it detects corruption, not tampering; the files load with
weights_only anyway), computed by parallel threads; `bench/checkpoint_hash.py` measures what it adds to a
save. Loading also refuses a non-finite trainable weight or optimizer tensor, naming it (`check_finite`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helios_train.runtime.atomic_file import write_text_atomically

MARKER = "COMPLETE"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    out = []
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            m = _CKPT.match(child.name)
            if m and (child / MARKER).is_file():
                out.append((int(m.group(1)), child))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


HASH_CHUNK = 16 << 20


def file_hash(path: Path) -> str:
    """XXH3-64 of a file's bytes, read in 16 MiB pieces (xxhash releases the GIL: threads hash in parallel)."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while piece := fh.read(HASH_CHUNK):
            h.update(piece)
    return h.hexdigest()


def hash_files(root: Path, rels: list[str], threads: int = 8) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rels)))) as pool:
        return dict(zip(rels, pool.map(lambda rel: file_hash(root / rel), rels)))


def verify(path: Path) -> Optional[str]:
    """What is wrong with the complete-marked checkpoint `path` (None: nothing found). Checks the files its
    marker lists, by size and then by content hash (checkpoints written before the marker held hashes get the
    size check only, before it held a file list the header check only)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    files = marker.get("files", {}) if isinstance(marker, dict) else {}
    for rel, size in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != size:
            return f"{f}: {f.stat().st_size} bytes, {size} were written (truncated or overwritten)"
    hashes = marker.get("xxh3_64", {}) if isinstance(marker, dict) else {}
    for rel, digest in sorted(hash_files(path, sorted(hashes)).items()):
        if digest != hashes[rel]:
            return f"{path / rel}: content differs from what was written (hash {digest}, written {hashes[rel]})"
    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exn:  # safetensors raises its own error types for a bad header
            return f"{f}: unreadable safetensors ({exn})"
    return None


def latest_valid_checkpoint(run_dir: Path, report=print) -> Optional[Path]:
    """The newest complete checkpoint that passes `verify`; each one skipped on the way is reported."""
    for _, path in reversed(checkpoint_dirs(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        report(f"[helios-train] WARNING: skipping {path.name}: {problem}; trying the previous checkpoint")
    return None


def remove_incomplete(run_dir: Path) -> list[Path]:
    """Delete temp dirs and marker-less checkpoint dirs left by an interrupted write."""
    removed = []
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            half = child.name.startswith((".tmp-checkpoint-", ".old-checkpoint-")) or (
                _CKPT.match(child.name) and not (child / MARKER).is_file()
            )
            if half and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def prune(run_dir: Path, keep: Optional[int]) -> None:
    if keep is None or keep <= 0:
        return
    for _, path in checkpoint_dirs(run_dir)[:-keep]:
        # The marker goes first: a prune interrupted half-way leaves a directory that no resume or export
        # will take for a checkpoint (and remove_incomplete clears it at the next start).
        (path / MARKER).unlink(missing_ok=True)
        _fsync(path)
        shutil.rmtree(path, ignore_errors=True)


def tmp_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".tmp-checkpoint-{step}"


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save_trainables(module: torch.nn.Module, path: Path) -> None:
    save_file(trainable_state(module), str(path))


def check_finite(state, source: Path, prefix: str = "") -> None:
    """Raise naming the first non-finite floating-point tensor in a (nested) state dict read from `source`."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not torch.isfinite(state).all():
            bad = int((~torch.isfinite(state)).sum())
            raise ValueError(f"{source}: tensor {prefix or '<root>'} has {bad} non-finite value(s) of "
                             f"{state.numel()}; this checkpoint holds a diverged state — resume from an earlier "
                             "one (resume=<run>/checkpoint-N)")
    elif isinstance(state, dict):
        for k, v in state.items():
            check_finite(v, source, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            check_finite(v, source, f"{prefix}[{i}]")


def load_trainables(module: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    check_finite(state, path)
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
        raise ValueError(
            f"{path}: trainable tensors do not match this model (missing {missing}, unexpected {extra}); "
            "was the LoRA rank or the trainables policy changed?"
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{path}: {name} has shape {list(value.shape)}, model has {list(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))


def save_torch(obj, path: Path) -> None:
    torch.save(obj, str(path))


def load_torch(path: Path):
    # weights_only: a checkpoint file can never execute code when loaded (see tests/test_security.py).
    return torch.load(str(path), map_location="cpu", weights_only=True)


def write_json(obj, path: Path) -> None:
    write_text_atomically(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: Path):
    return json.loads(path.read_text())


def _fsync(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(run_dir: Path, step: int, keep: Optional[int]) -> Path:
    """Mark the temp dir complete and move it into place (rank 0 only, after every rank wrote)."""
    src, dst = tmp_dir(run_dir, step), run_dir / f"checkpoint-{step}"
    files = {str(f.relative_to(src)): f.stat().st_size for f in sorted(src.rglob("*")) if f.is_file()}
    for rel in files:  # data on disk before the marker says it is
        _fsync(src / rel)
    for d in sorted({(src / rel).parent for rel in files} | {src}):
        _fsync(d)
    hashes = hash_files(src, sorted(files))
    (src / MARKER).write_text(json.dumps({"step": step, "files": files, "xxh3_64": hashes}, indent=1,
                                         sort_keys=True))
    _fsync(src / MARKER)
    _fsync(src)
    if dst.exists():
        # Re-saving a step (final == periodic): the old one is renamed aside first, so at every instant
        # either the old or the new checkpoint-<step> is in place, whole (a kill here leaves the aside
        # copy, which remove_incomplete deletes at the next start).
        aside = run_dir / f".old-checkpoint-{step}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        _fsync(run_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)
        _fsync(run_dir)
    prune(run_dir, keep)
    return dst
