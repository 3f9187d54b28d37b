"""Prompt files (one prompt per line), read and checked before any model loads.

Used by inference (`--prompt-file`), text-embedding shards (`data_prep.encode_text --prompts`) and ODE
pairs (`data_prep.ode_pairs --prompts`): a missing, unreadable or prompt-less file fails in a second
with its path, instead of after minutes of model loading or as a silent run that writes nothing.
"""
from __future__ import annotations

from pathlib import Path

from helios_train.config.errors import UserError


class InputError(UserError, ValueError):
    """An input file that cannot be used; the message names the file and the option."""


def read_prompt_lines(path, option: str = "--prompts") -> list[tuple[int, str]]:
    """(line index, prompt) of every non-blank line; line indices keep keys stable when blank lines move."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exn:
        raise InputError(f"{option} {path}: cannot read it ({exn})") from None
    lines = [(i, p.strip()) for i, p in enumerate(text.splitlines()) if p.strip()]
    if not lines:
        raise InputError(f"{option} {path}: no prompt in it (empty or only blank lines)")
    return lines
