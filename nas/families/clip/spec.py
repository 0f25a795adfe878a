"""CLIP backbones: which open_clip model to build, where its weights come from, and zero-shot
classification with it.

Two kinds of ``ClipSpec``, both built as an ``open_clip.CLIP``:

- an open_clip architecture with its pretrained tag or a local checkpoint (``open_clip_model:
  ViT-B-16, pretrained: openai``), the real models of CoOp/UPT for users with the weights;
- a timm image tower (any backbone of ``nas.families.vit.spec``, e.g. the committed ``vit_fmnist``)
  plus a small text tower and the projections from a safetensors file: open_clip builds the
  image tower through its timm adapter (``TimmModel``), so the model is a plain
  ``open_clip.CLIP`` whose ``visual.trunk`` is the timm VisionTransformer.

The project's offline CLIP (``backbones/clip_fmnist``) is of the second kind: see its model card.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from nas.core.errors import ConfigError, NasError
from nas.core.paths import BACKBONES_DIR, CLIP_FILE
from nas.core.validate import Reader
from nas.core.yamlio import join_key, load_yaml
from nas.families.vit.spec import BackboneSpec, load_backbone, load_weights
from nas.towers.adapters import geometry_of
from nas.towers.geometry import TowerGeometry

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class TextTower:
    """Shape of a text tower built by open_clip (``CLIPTextCfg``)."""

    context_length: int = 32
    width: int = 128
    heads: int = 4
    layers: int = 4
    vocab_size: int = 49408


@dataclass(frozen=True)
class ClipSpec:
    """A CLIP model: an open_clip architecture (``open_clip_model`` + ``pretrained``), or a timm
    image tower with a text tower (``image_tower`` + ``text`` + ``weights``).

    Args:
        embed_dim: the joint embedding width (the projections' output).
        weights: for a timm image tower, the safetensors file with everything but the image
            trunk (text tower, both projections, logit scale); the trunk's own weights are the
            image tower backbone's.
        template: the prompt template of zero-shot classification, ``{}`` the class name.
    """

    name: str | None = None
    open_clip_model: str | None = None
    pretrained: str | None = None
    image_tower: BackboneSpec | None = None
    text: TextTower = field(default_factory=TextTower)
    embed_dim: int = 128
    weights: str | None = None
    template: str = DEFAULT_TEMPLATE
    #: where it was loaded from (a shipped name or a clip.yaml path), as specs refer to it
    source: str | None = None

    def key(self) -> str:
        """Identifies the architecture (what the geometry depends on)."""
        if self.image_tower is None:
            return f"open_clip:{self.open_clip_model}"
        return f"clip:{self.image_tower.key()}:{self.text}:{self.embed_dim}"

    def to_dict(self) -> dict[str, Any]:
        return {"clip": self.source or self.name}

    def geometry(self) -> TowerGeometry:
        """The image tower's geometry, with the text tower's width and context length."""
        if self.image_tower is None:
            return _open_clip_geometry(self.open_clip_model)
        return replace(
            self.image_tower.geometry(),
            text_width=self.text.width,
            text_context=self.text.context_length,
        )

    def tokenizer(self) -> Any:
        """open_clip's BPE tokenizer (its vocabulary ships inside the package)."""
        from open_clip.tokenizer import SimpleTokenizer

        if self.image_tower is None:
            import open_clip

            return open_clip.get_tokenizer(self.open_clip_model)
        return SimpleTokenizer(context_length=self.text.context_length)

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.image_tower is not None:
            return self.image_tower.normalisation()
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)

    # -- the backbone family's protocol (nas.families.Backbone) ------------------------------
    family: ClassVar[str] = "clip"
    classifies_by_name: ClassVar[bool] = True

    def head_params(self, num_classes: int) -> int:
        """A CLIP has no head: the class names' text embeddings classify."""
        return 0

    def weight_files(self) -> dict[str, str | None]:
        """The image tower's local weights (a timm tower's file, or an open_clip checkpoint)
        and the text tower's, by role, for provenance."""
        image = self.image_tower.weights if self.image_tower is not None else self.pretrained
        local = image if image and Path(image).is_file() else None
        return {"backbone": local, "clip_text": self.weights}

    def check_weights(self) -> None:
        """Loaded by the first trial (open_clip reports its own errors); a timm image tower's
        recorded geometry is checked here, before any trial."""
        self.check_geometry()

    def check_geometry(self) -> None:
        """A timm image tower's recorded geometry against its model (``BackboneSpec``'s)."""
        if self.image_tower is not None:
            self.image_tower.check_geometry()

    def create(self, *, load: bool = True) -> nn.Module:
        """The ``open_clip.CLIP`` model, every weight frozen, in eval mode. With ``load`` False
        the text tower and projections keep their initialisation (for training them)."""
        if self.open_clip_model is not None:
            model = _create_open_clip(self.open_clip_model, self.pretrained)
        else:
            model = self._create_timm_clip(load)
        model.requires_grad_(False)
        return model.eval()

    def _create_timm_clip(self, load: bool) -> nn.Module:
        import open_clip
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        assert self.image_tower is not None
        self.image_tower.check_geometry()  # the tower's side below is read off its geometry
        trunk = register_timm_tower(self.image_tower)
        geometry = self.image_tower.geometry()
        side = geometry.image_size
        model = open_clip.CLIP(
            self.embed_dim,
            CLIPVisionCfg(
                image_size=side, timm_model_name=trunk, timm_pool="token", timm_proj="linear"
            ),
            CLIPTextCfg(**self.text.__dict__),
        )
        if self.image_tower.weights is not None:
            load_weights(model.visual.trunk, self.image_tower.weights)
        if load and self.weights is not None:
            load_clip_weights(model, self.weights)
        return model


@functools.lru_cache(maxsize=16)
def _open_clip_geometry(name: str) -> TowerGeometry:
    """An open_clip architecture's geometry, read off the model built on the meta device
    (no memory, no download)."""
    import open_clip

    logging.disable(logging.WARNING)  # "no pretrained weights loaded": none were asked for
    try:
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, device="meta")
    except RuntimeError as exc:
        raise NasError(f"open_clip cannot build {name!r}: {str(exc)[:200]}") from None
    finally:
        logging.disable(logging.NOTSET)
    return replace(
        geometry_of(model.visual),
        text_width=int(model.transformer.width),
        text_context=int(model.context_length),
    )


def _create_open_clip(name: str, pretrained: str | None) -> nn.Module:
    import open_clip

    local = pretrained is not None and Path(pretrained).is_file()
    try:
        return open_clip.create_model(name, pretrained=pretrained, load_weights=True)
    except Exception as exc:  # a local file's reader (safetensors, pickle) has its own errors
        if isinstance(exc, RuntimeError) and (
            "Unknown model" in str(exc) or "Model config for" in str(exc)
        ):
            raise NasError(
                f"open_clip has no model {name!r} (e.g. ViT-B-16, ViT-B-32, ViT-L-14)"
            ) from None
        if local:
            raise NasError(
                f"{pretrained}: could not load it as open_clip {name!r} weights "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}); expected "
                "a checkpoint of that architecture (.safetensors, .pt or .bin)"
            ) from None
        if isinstance(exc, RuntimeError | OSError | ValueError):
            raise _download_error(name, pretrained, exc) from None
        raise


def _download_error(name: str, pretrained: str | None, exc: Exception) -> NasError:
    return NasError(
        f"could not get open_clip {name!r} weights {pretrained!r} "
        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Without network access, "
        "download the checkpoint elsewhere and set pretrained to its local path"
    )


def register_timm_tower(backbone: BackboneSpec) -> str:
    """Register ``backbone``'s architecture (a timm model plus overrides) under a timm model
    name, so that open_clip's ``TimmModel`` can build it; returns the name."""
    digest = hashlib.sha256(backbone.key().encode()).hexdigest()[:10]
    name = f"nas_tower_{digest}"
    if timm.is_model(name):
        return name

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return timm.create_model(
            backbone.model, pretrained=False, **{**backbone.overrides, **kwargs}
        )

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    setattr(sys.modules[__name__], name, entrypoint)
    timm.models.register_model(entrypoint)
    return name


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a timm-tower CLIP adds to its image trunk: the text tower, the projections and the
    logit scale (the trunk's weights are the image backbone's own)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.trunk.")}


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise NasError(f"{path}: not a readable safetensors file ({exc})") from None
    expected = trained_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise NasError(
            f"{path}: does not fit this CLIP's text tower and projections (missing: "
            f"{missing[:3]}, unexpected: {unexpected[:3]}, other shape: {wrong[:3]})"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor.to(expected[name].dtype))


# -- loading specs -----------------------------------------------------------------------------


def load_clip(name_or_path: str | Path) -> ClipSpec:
    """A shipped CLIP by name (``clip_fmnist``), a folder holding ``clip.yaml``, or the file."""

    path = Path(name_or_path)
    if not path.suffix:
        shipped = BACKBONES_DIR / str(name_or_path) / CLIP_FILE
        if shipped.is_file():
            path = shipped
        elif path.is_dir():
            path = path / CLIP_FILE
        else:
            known = ", ".join(sorted(p.parent.name for p in BACKBONES_DIR.glob(f"*/{CLIP_FILE}")))
            raise ConfigError(
                f"no shipped CLIP of that name and no such folder (shipped: {known})", file=path
            )
    doc = load_yaml(path)
    r = Reader(doc)
    keys = ["name", "open_clip_model", "pretrained", "image_tower", "embed_dim", "text"]
    data = r.mapping(doc.data, "", optional=[*keys, "weights", "template"])
    template = r.string(data.get("template", DEFAULT_TEMPLATE), "template")
    if "{}" not in template:
        r.fail("template", f"{template!r} has no '{{}}' where the class name goes")
    if data.get("open_clip_model"):
        pretrained = data.get("pretrained")
        if pretrained is not None:
            pretrained = r.string(pretrained, "pretrained")
            local = (path.parent / pretrained).expanduser()
            if local.suffix and local.is_file():
                pretrained = str(local.resolve())
        return ClipSpec(
            name=data.get("name"),
            open_clip_model=r.string(data["open_clip_model"], "open_clip_model"),
            pretrained=pretrained,
            template=template,
            source=str(name_or_path),
        )
    if "image_tower" not in data:
        r.fail("", "give either open_clip_model (with pretrained) or image_tower (with text)")
    tower = r.string(data["image_tower"], "image_tower")
    local = path.parent / tower
    image_tower = load_backbone(local if local.suffix and local.is_file() else tower)
    text = r.mapping(data.get("text") or {}, "text", optional=list(TextTower.__dataclass_fields__))
    text_tower = TextTower(
        **{k: r.integer(v, join_key("text", k), minimum=1) for k, v in text.items()}
    )
    weights = None
    if data.get("weights") is not None:
        full = path.parent / r.string(data["weights"], "weights")
        if not full.is_file():
            r.fail("weights", f"file not found: {full}")
        weights = str(full.resolve())
    return ClipSpec(
        name=data.get("name"),
        image_tower=image_tower,
        text=text_tower,
        embed_dim=r.integer(data.get("embed_dim", 128), "embed_dim", minimum=1),
        weights=weights,
        template=template,
        source=str(name_or_path),
    )


# -- text encoding -----------------------------------------------------------------------------


def encode_tokens(
    model: nn.Module, ids: torch.Tensor, ctx: torch.Tensor | None = None
) -> torch.Tensor:
    """``model.encode_text(ids)`` (unnormalised), with ``ctx`` (n, width) replacing the token
    embeddings at positions 1..n (CoOp's context, after the start token), computed on the first
    L positions only, L the longest sequence in ``ids``: with the causal mask and pooling at
    the end-of-text token, later positions cannot change the result, so this is exact."""
    length = int((ids != 0).sum(1).max())
    ids = ids[:, :length]
    x = model.token_embedding(ids)
    if ctx is not None:
        n = ctx.shape[0]
        x = torch.cat((x[:, :1], ctx[None].expand(len(x), -1, -1).to(x.dtype), x[:, 1 + n :]), 1)
    x = x + model.positional_embedding[:length].to(x.dtype)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    x = x[torch.arange(len(x), device=x.device), ids.argmax(dim=-1)]
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


# -- zero-shot classification -----------------------------------------------------------------


@torch.no_grad()
def class_embeddings(
    model: nn.Module, tokenizer: Any, names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(classes, embed_dim) unit vectors: per class, the mean of its prompts' text embeddings."""
    device = next(model.parameters()).device
    out = []
    for name in names:
        ids = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(ids), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1))
    return torch.stack(out)


def class_names(split: Any, dataset: str = "") -> list[str]:
    """The split's class names; a CLIP cannot classify without them."""
    names = getattr(split, "class_names", None)
    if not names:
        where = f"dataset {dataset!r}" if dataset else "this dataset"
        raise NasError(
            f"{where} has no class names, and the CLIP backbone classifies by name: add a "
            "classnames.txt (one name per line, in label order) to the dataset folder"
        )
    if len(names) != split.num_classes:
        raise NasError(f"{dataset}: {len(names)} class names for {split.num_classes} classes")
    return list(names)
