"""Where the repository's shipped files are (the package runs from a checkout or an editable
install: backbones and search spaces sit beside ``nas/``)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKBONES_DIR = REPO_ROOT / "backbones"
SPACES_DIR = REPO_ROOT / "search_spaces"

#: The space a CLI command reads when none is named.
DEFAULT_SPACE = "noah_vtab"

#: A saved model folder's files: its description (``format``, subnet, backbone) and weights.
SUBNET_FILE = "subnet.yaml"
WEIGHTS_FILE = "weights.safetensors"
#: A CLIP backbone's file (``backbones/<name>/clip.yaml``, or a path to one).
CLIP_FILE = "clip.yaml"
