"""Output folders: never overwrite a user's results unless told to.

The trade-off: a command refuses a folder that already holds its results (or a file) before
doing any work, which costs the user a flag (``--overwrite``) when replacing a run is what
they want, and saves them from losing a finished run to a typo. Without ``--out`` a fresh
folder is picked (``runs/NAME``, ``runs/NAME-2``, ...), so the default command can be run
again and again.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .errors import CliError, summarise


def choose_out(
    out: Path | None,
    default: Path,
    produces: Sequence[str],
    *,
    overwrite: bool,
    hint: str = "",
) -> Path:
    """The folder to write to, created and checked writable; refused if it holds results.

    ``produces`` names the files the command writes (a trailing ``/`` marks a folder);
    ``hint`` is appended to the refusal (``--resume`` for training runs).
    """
    if out is None:
        out = default
        n = 1
        while _held(out, produces):
            n += 1
            out = default.with_name(f"{default.name}-{n}")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; name a folder (it is created if missing)")
    held = _held(out, produces)
    if held and not overwrite:
        raise CliError(
            f"--out {out} already holds results ({summarise(held)}); choose another --out, "
            f"or pass --overwrite to replace them{hint}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in held:
            _remove(out / name)
    except OSError as error:
        raise CliError(
            f"--out {out}: cannot write there ({error.strerror}); choose another --out"
        ) from None
    if not os.access(out, os.W_OK):
        raise CliError(f"--out {out}: not writable; choose another --out")
    return out


def _held(folder: Path, produces: Sequence[str]) -> list[str]:
    if not folder.is_dir():
        return []
    return [name for name in produces if (folder / name.rstrip("/")).exists()]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def discard(out: Path, produces: Sequence[str]) -> bool:
    """Remove what a command wrote to ``out`` before it produced anything to keep (the
    entries of ``produces``), and ``out`` itself if that leaves it empty; whether it did."""
    for name in _held(out, produces):
        _remove(out / name)
    try:
        out.rmdir()  # only an empty folder: a user's other files stay
    except OSError:
        return False
    return True
