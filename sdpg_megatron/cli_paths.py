"""Checks of the paths a command line is given, made before any work starts.

A missing or unreadable input, or an output that cannot be written, is an error naming the
option, the path and what to pass instead, rather than whatever the first library to touch
the path says (transformers, given a directory that does not exist, answers about Hub
repository ids). The errors are OSError subclasses (FileNotFoundError, NotADirectoryError,
IsADirectoryError, PermissionError); each command line turns them into its error exit.
"""

from __future__ import annotations

import os
from pathlib import Path

HF_MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def input_dir(path: str | os.PathLike, option: str, *, holds: tuple[str, ...] = (), what: str = "a directory") -> Path:
    """`path` as an existing, readable directory holding one of `holds` (if given)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such directory; pass {what}")
    if not path.is_dir():
        raise NotADirectoryError(f"{option} {path}: not a directory; pass {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: not readable by this user; fix its permissions or pass {what}")
    if holds and not any((path / name).is_file() for name in holds):
        raise FileNotFoundError(f"{option} {path}: has no {' or '.join(holds)}; pass {what}")
    return path


def input_file(path: str | os.PathLike, option: str, *, what: str = "a file") -> Path:
    """`path` as an existing, readable file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file; pass {what}")
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path}: is a directory; pass {what}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{option} {path}: not readable by this user; fix its permissions or pass {what}")
    return path


def output_file(path: str | os.PathLike, option: str) -> Path:
    """`path` as a file that can be written: not a directory, and its nearest existing
    ancestor a writable directory (missing parents are created when it is written)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path}: is a directory; pass the output file's name")
    _check_writable_ancestor(path, option)
    return path


def output_dir(path: str | os.PathLike, option: str) -> Path:
    """`path` as a directory that can be written: not a file, and itself (if it exists) or
    its nearest existing ancestor a writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path}: is a file; pass a directory to write into")
    _check_writable_ancestor(path, option)
    return path


def _check_writable_ancestor(path: Path, option: str) -> None:
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{option} {path}: {ancestor} is a file, so nothing can be written under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: {ancestor} is not writable by this user; pass another path")
