"""Models LM Studio downloaded: `--model lmstudio:PUBLISHER/MODEL[/FILE.gguf]`.

LM Studio keeps plain GGUF files in ~/.lmstudio/models/PUBLISHER/MODEL/ (older versions:
~/.cache/lm-studio/models), so a path to one works as well; the name is a shortcut that
picks the folder's one GGUF (vision projectors, mmproj-*.gguf, left out) or, when it holds
several quantizations, lists them to choose from.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlx_kto.errors import UserError

PREFIX = "lmstudio:"
_PART = re.compile(r"[^/\\]+")


def is_lmstudio_ref(model: str | None) -> bool:
    return bool(model) and str(model).startswith(PREFIX)


def models_dirs() -> list[Path]:
    """LM Studio's model folders, current layout first."""
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def resolve_lmstudio(ref: str) -> Path:
    """The GGUF file `lmstudio:PUBLISHER/MODEL[/FILE.gguf]` names."""
    parts = ref[len(PREFIX) :].split("/")
    if len(parts) not in (2, 3) or any(not _PART.fullmatch(p) or p in (".", "..") for p in parts):
        raise UserError(
            f"--model (model): '{ref}' is not an LM Studio model "
            "(lmstudio:PUBLISHER/MODEL or lmstudio:PUBLISHER/MODEL/FILE.gguf)"
        )
    roots = [r for r in models_dirs() if (r / parts[0] / parts[1]).is_dir()]
    if not roots:
        where = " or ".join(str(r) for r in models_dirs())
        raise UserError(f"--model (model): {ref}: no folder {parts[0]}/{parts[1]} in {where}")
    folder = roots[0] / parts[0] / parts[1]
    files = sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix.lower() == ".gguf" and p.is_file() and not p.name.lower().startswith("mmproj")
    )
    if len(parts) == 3:
        if parts[2] not in files:
            raise UserError(
                f"--model (model): {ref}: no {parts[2]} in {folder} "
                f"(GGUF files there: {', '.join(files) or 'none'})"
            )
        return folder / parts[2]
    if not files:
        raise UserError(f"--model (model): {ref}: no .gguf model file in {folder}")
    if len(files) > 1:
        choices = ", ".join(f"{PREFIX}{parts[0]}/{parts[1]}/{f}" for f in files)
        raise UserError(
            f"--model (model): {ref}: {folder} holds {len(files)} GGUF files; name one: {choices}"
        )
    return folder / files[0]
