"""Checksum manifests for checkpoint steps: catch bit flips and truncated files before restoring them.

Each committed step directory gets `manifest.sha256.json`: the size and SHA-256 of every regular file in it.
Orbax's own commit is an atomic rename, so a missing manifest only means the process stopped between the
commit and the manifest write; `verify_step` accepts that unless asked to be strict.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from crosswrite_jax.errors import UserError

MANIFEST = "manifest.sha256.json"
FORMAT = 1
_TEMP_PREFIX = f".{MANIFEST}."  # `.manifest.sha256.json.<pid>.tmp` while one is being written
# Orbax 0.12.8 writes a step to `<step>.orbax-checkpoint-tmp` and renames it on commit (older versions
# appended `-<timestamp>`).
TMP_STEP_DIR = re.compile(r"^\d+\.orbax-checkpoint-tmp(-\d+)?$")
# A step that failed verification when training resumed is renamed `<step>.corrupt-<unix time>`.
SET_ASIDE_DIR = re.compile(r"^\d+\.corrupt-\d+$")
_CHUNK = 1 << 20


def set_aside_name(step: int, stamp: int) -> str:
    return f"{step}.corrupt-{stamp}"


def _is_own_file(name: str) -> bool:
    return name == MANIFEST or name.startswith(_TEMP_PREFIX)


def _files(step_dir: Path) -> list[str]:
    """Relative posix paths of the regular files under `step_dir`, sorted, without manifests."""
    found = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            rel = path.relative_to(step_dir).as_posix()
            if not _is_own_file(rel):
                found.append(rel)
    return sorted(found)


def _digest(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and byte count of a file."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _digests(paths: list[Path]) -> list[tuple[str, int] | OSError]:
    """_digest of each path, several files at a time (hashlib releases the GIL); an OSError in place of a
    file that could not be read."""
    def one(path):
        try:
            return _digest(path)
        except OSError as error:
            return error

    if len(paths) < 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(one, paths))


def write_manifest(step_dir: str | Path) -> Path:
    """Hashes every file of a step and writes the manifest atomically (temp file, fsync, os.replace)."""
    step_dir = Path(step_dir)
    for stale in step_dir.glob(f"{_TEMP_PREFIX}*"):  # left by a process that died mid-write
        stale.unlink(missing_ok=True)
    files = _files(step_dir)
    entries = {}
    for rel, digest in zip(files, _digests([step_dir / rel for rel in files])):
        if isinstance(digest, OSError):
            raise digest
        entries[rel] = {"sha256": digest[0], "size": digest[1]}
    document = {"format": FORMAT, "algorithm": "sha256", "files": entries}
    target = step_dir / MANIFEST
    temp = step_dir / f"{_TEMP_PREFIX}{os.getpid()}.tmp"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, target)
    _fsync_directory(step_dir)
    return target


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def has_manifest(step_dir: str | Path) -> bool:
    return (Path(step_dir) / MANIFEST).is_file()


def verify_step(step_dir: str | Path, *, strict: bool = False) -> list[str]:
    """Problems found in a step directory, each naming its file; [] when it is intact.

    Files missing, shorter ("truncated"), longer or different from the manifest are problems; files the
    manifest does not list are not. A step without a manifest is a problem ("no manifest") only if `strict`.
    """
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir}: not a directory"]
    path = step_dir / MANIFEST
    if not path.exists():
        return ["no manifest"] if strict else []
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        entries = {rel: (int(entry["size"]), str(entry["sha256"])) for rel, entry in document["files"].items()}
        if document.get("algorithm", "sha256") != "sha256":
            raise ValueError(f"unknown algorithm {document['algorithm']!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return [f"{MANIFEST}: unreadable ({error})"]
    problems: dict[str, str] = {}
    to_hash = []
    for rel in sorted(entries):
        expected_size = entries[rel][0]
        file = step_dir / rel
        if not file.is_file():
            problems[rel] = "missing"
            continue
        size = file.stat().st_size
        if size < expected_size:
            problems[rel] = f"truncated ({size} of {expected_size} bytes)"
        elif size > expected_size:
            problems[rel] = f"size mismatch ({size} bytes, manifest says {expected_size})"
        else:
            to_hash.append(rel)
    for rel, digest in zip(to_hash, _digests([step_dir / rel for rel in to_hash])):
        if isinstance(digest, OSError):
            problems[rel] = f"unreadable ({digest.strerror or digest})"
        elif digest[0] != entries[rel][1]:
            problems[rel] = "checksum mismatch"
    return [f"{rel}: {problems[rel]}" for rel in sorted(problems)]


def step_dirs(checkpoint_dir: str | Path) -> dict[int, Path]:
    """Committed step directories (all-digit names) of a checkpoint directory, by step."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return {}
    found = {int(p.name): p for p in checkpoint_dir.iterdir() if p.name.isdigit() and p.is_dir()}
    return dict(sorted(found.items()))


def leftover_tmp_dirs(checkpoint_dir: str | Path) -> list[Path]:
    """Orbax temporary step directories: saves that never committed."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if TMP_STEP_DIR.match(p.name))


def verify_directory(checkpoint_dir: str | Path, *, strict: bool = False) -> dict[int, list[str]]:
    """verify_step for every step directory of a checkpoint directory, by step (ascending)."""
    return {step: verify_step(path, strict=strict) for step, path in step_dirs(checkpoint_dir).items()}


def _resolve(path: Path) -> tuple[Path | None, dict[int, Path]]:
    """(checkpoint directory or None for a single step, steps to check) for a run workdir, a
    checkpoints dir or one step dir."""
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = step_dirs(path)
    if not steps and path.name.isdigit():
        return None, {int(path.name): path}
    return path, steps


def verify_report(path: str | Path, *, strict: bool = False) -> tuple[bool, str]:
    """(all ok, report) for a run workdir, its checkpoints/ directory, or a single step directory.

    The report has one line per step: "step 500: ok" or "step 500: CORRUPT: <file>: <problem>[; ...]";
    steps saved without a manifest read "step 500: ok (no manifest: not checked)" unless `strict`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist; pass a run directory, its checkpoints/ or one step directory")
    if not path.is_dir():
        raise UserError(f"'{path}' is a file; pass a run directory, its checkpoints/ or one step directory")
    directory, steps = _resolve(path)
    if not steps:
        raise UserError(f"no checkpoints in '{path}' (no step directories); pass a run directory, its "
                        f"checkpoints/ or one step directory")
    all_ok, lines = True, []
    for step, step_dir in steps.items():
        problems = verify_step(step_dir, strict=strict)
        if problems:
            all_ok = False
            lines.append(f"step {step}: CORRUPT: {'; '.join(problems)}")
        elif not has_manifest(step_dir):
            lines.append(f"step {step}: ok (no manifest: not checked)")
        else:
            lines.append(f"step {step}: ok")
    if directory is not None:
        for tmp in leftover_tmp_dirs(directory):
            lines.append(f"{tmp.name}: unfinished save (not a checkpoint; removed when training resumes)")
        for aside in sorted(p.name for p in directory.iterdir() if SET_ASIDE_DIR.match(p.name)):
            lines.append(f"{aside}: set aside as corrupt when training resumed (not a checkpoint)")
    return all_ok, "\n".join(lines)
