"""Which backbone values name a CLIP (torch-free: the families' registry asks it of every bare
backbone name a space gives, ``nas space show`` included)."""

from __future__ import annotations

from pathlib import Path

from nas.core.paths import BACKBONES_DIR, CLIP_FILE


def is_clip(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a shipped CLIP, a folder with a clip.yaml, or one."""
    path = Path(name_or_path)
    if path.name == CLIP_FILE:
        return True
    if not path.suffix:
        return (BACKBONES_DIR / str(name_or_path) / CLIP_FILE).is_file() or (
            path / CLIP_FILE
        ).is_file()
    return False
