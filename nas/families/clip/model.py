"""A frozen CLIP carrying prompt modules: the supernet and the standalone subnet model.

``PromptedCLIP`` is, like ``PromptedViT``, a ``nas.families.prompted.PromptedModel`` on CLIP's image
trunk (VPT, LoRA, Adapter, PGN and UPT's visual prompts act through the same per-block
injection interface, so the modules are the ViT ones, not copies), plus the text side: class
names through the prompt template, or through learned context (``upt``, text or unified
mode), then the text tower. Logits are CLIP's scaled cosine similarities between the image and
the class embeddings; no classification head.

Order inside one forward: the text side first (in unified mode it computes the visual prompts
with the text context, in one pass of UPT's encoder layer), then the image tower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nas.core.errors import NasError
from nas.core.paths import SUBNET_FILE, WEIGHTS_FILE
from nas.families.clip.spec import ClipSpec, class_names, encode_tokens, load_clip
from nas.families.prompted import PromptedModel, weights_hash
from nas.modules import module_class
from nas.modules.base import PromptModule
from nas.modules.options import Options
from nas.space.cost import subnet_params
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet

PLACEHOLDER = "X"  # one token per context vector, replaced by the learned vectors (as CoOp)


class ClassPrompts:
    """Token ids of the class prompts: the template's, or ``[SOT] X..X <name>. [EOT]`` with one
    placeholder per context vector."""

    def __init__(self, tokenizer: Any, names: Sequence[str], template: str, context: int) -> None:
        self.tokenizer, self.names, self.context = tokenizer, list(names), context
        self.template_ids = self._tokenize([template.format(n) for n in self.names], template)
        self._by_n: dict[int, torch.Tensor] = {}

    def _tokenize(self, texts: list[str], what: str) -> torch.Tensor:
        ids = self.tokenizer(texts)
        lengths = (ids != 0).sum(1)
        if int(lengths.max()) >= self.context:  # the end token was cut off
            worst = self.names[int(lengths.argmax())]
            raise NasError(
                f"class name {worst!r} with {what!r} does not fit the text tower's "
                f"{self.context} tokens; shorten the class name or use fewer context vectors"
            )
        return ids

    def with_context(self, n: int) -> torch.Tensor:
        if n not in self._by_n:
            pad = " ".join([PLACEHOLDER] * n)
            self._by_n[n] = self._tokenize(
                [f"{pad} {name}." for name in self.names], f"{n} context vectors"
            )
        return self._by_n[n]


class PromptedCLIP(PromptedModel):
    """A frozen ``open_clip.CLIP`` (a timm image trunk or open_clip's own), plus prompt modules.

    Args:
        clip: the model (``ClipSpec.create()``); owned from now on (frozen, hooks attached).
        spec: what it was built from (tokenizer, template, geometry).
        class_names: the classes, in label order.
        modules: prompt modules by kind, built for ``spec.geometry()``.
    """

    FORMAT = "nas-prompt-clip-subnet/1"

    def __init__(
        self,
        clip: nn.Module,
        spec: ClipSpec,
        class_names: Sequence[str],
        modules: Mapping[str, PromptModule],
    ) -> None:
        # The trunk is already a submodule of ``clip``: not registered again, so that its
        # weights appear once in ``state_dict()`` (under ``clip.visual.``), not twice.
        super().__init__(image_trunk(clip), modules, spec.geometry(), own_trunk=False)
        self.clip = clip.requires_grad_(False)
        self.clip_spec = spec
        self.class_names = list(class_names)
        self.prompts = ClassPrompts(
            spec.tokenizer(), self.class_names, spec.template, self.geometry.text_context
        )
        self._template: torch.Tensor | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        backbone: ClipSpec,
        space: SearchSpace,
        split: Any,
        *,
        subnet: Subnet | None = None,
        full_finetune: bool = False,
        dataset: str = "",
    ) -> PromptedCLIP:
        """The supernet of ``space`` or the standalone model of ``subnet`` (an empty subnet:
        zero-shot), classifying by the split's class names."""
        names = class_names(split, dataset)
        if subnet is None:
            return cls.supernet(space, names, backbone.create())
        if full_finetune:
            raise NasError("full fine-tuning is not offered for CLIP backbones")
        return cls.for_subnet(backbone, names, subnet, space.options())

    @classmethod
    def supernet(
        cls, space: SearchSpace, class_names: Sequence[str], clip: nn.Module | None = None
    ) -> PromptedCLIP:
        """The weight-entangled supernet of ``space`` on the space's CLIP."""
        spec = space.backbone
        if not isinstance(spec, ClipSpec):
            raise NasError(f"search space {space.name!r} is not on a CLIP backbone")
        g = spec.geometry()
        modules = {
            kind: module_class(kind)(g, s.capacity(), s.options)
            for kind, s in space.modules.items()
        }
        model = cls(clip if clip is not None else spec.create(), spec, class_names, modules)
        model.init_context()
        model.set_subnet(space.largest())
        return model

    @classmethod
    def for_subnet(
        cls,
        spec: ClipSpec,
        class_names: Sequence[str],
        subnet: Subnet,
        options: Mapping[str, Options | Mapping[str, Any]] | None = None,
        clip: nn.Module | None = None,
    ) -> PromptedCLIP:
        """A standalone model with modules allocated at exactly ``subnet``'s sizes."""
        g, options = spec.geometry(), options or {}
        modules = {
            kind: module_class(kind)(g, choice, options.get(kind, {}))
            for kind, choice in subnet.items()
        }
        model = cls(clip if clip is not None else spec.create(), spec, class_names, modules)
        model.init_context()
        model.set_subnet(subnet)
        return model

    def init_context(self) -> None:
        """Start learned text context from the embedding of the module's ``init`` phrase
        (``random``: keep N(0, 0.02))."""
        text = self._text_module()
        phrase = text.text_init_phrase() if text is not None else None
        if phrase is None:
            return
        ids = self.prompts.tokenizer([phrase])[0]
        words = ids[1 : int((ids != 0).sum()) - 1]  # without the start and end tokens
        with torch.no_grad():
            text.init_context(self.clip.token_embedding(words.to(self._device())))

    def _text_module(self) -> PromptModule | None:
        """The module that prompts the text tower (a ``text_side`` kind), if any."""
        found = [m for m in self.prompt_modules.values() if m.text_side]
        if len(found) > 1:
            raise NasError(f"{[m.kind for m in found]} all prompt the text tower; one may")
        return found[0] if found else None

    def _device(self) -> torch.device:
        return next(self.clip.parameters()).device

    # -- forward -----------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """(classes, embed) unit vectors of the class prompts under the active subnet."""
        text = self._text_module()
        ctx = text.text_context() if text is not None else None
        if ctx is None:  # the template: fixed, computed once
            if self._template is None or self._template.device != self._device():
                with torch.no_grad():
                    ids = self.prompts.template_ids.to(self._device())
                    self._template = F.normalize(encode_tokens(self.clip, ids), dim=-1)
            return self._template
        ids = self.prompts.with_context(ctx.shape[0]).to(self._device())
        return F.normalize(encode_tokens(self.clip, ids, ctx), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, embed) unit vectors: the prompted trunk's pooled output, projected."""
        features = self.tower.forward(images)
        if hasattr(self.clip.visual, "trunk"):  # a timm tower: open_clip's projection after it
            features = self.clip.visual.head(features)
        return F.normalize(features, dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = self.text_features()
        image = self.image_features(images)
        return self.clip.logit_scale.exp() * image @ text.T

    def train(self, mode: bool = True) -> PromptedCLIP:
        super().train(mode)
        self.clip.eval()  # frozen towers stay in eval mode (no dropout, fixed statistics)
        return self

    # -- sizes -------------------------------------------------------------------------------
    def num_params(self, num_classes: int | None = None) -> dict[str, int]:
        """Trainable parameters: the prompt modules only (CLIP classifies without a head)."""
        modules = subnet_params(self.subnet, self.geometry)
        return {"modules": modules, "head": 0, "total": modules}

    # -- standalone export (PromptedModel.export, on a copy of the whole CLIP) --------------
    def _frozen(self) -> nn.Module:
        return self.clip

    def _rebuild(self, frozen: nn.Module, modules: dict[str, PromptModule]) -> PromptedCLIP:
        return type(self)(frozen, self.clip_spec, self.class_names, modules)

    # -- save / load -------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return {
            "clip": self.clip_spec.to_dict()["clip"],
            "class_names": self.class_names,
            "clip_sha256": clip_hash(self.clip),
        }

    @classmethod
    def load(
        cls, directory: str | Path, clip: nn.Module | None = None, *, check_backbone: bool = True
    ) -> PromptedCLIP:
        """Load a saved CLIP subnet onto ``clip`` (by default the CLIP it names, built with its
        weights); refused if that CLIP's weights differ from the ones it was trained on,
        unless ``check_backbone`` is False."""
        meta_path = Path(directory) / SUBNET_FILE
        reader, meta, subnet = cls._open_saved(directory, ["clip", "class_names"])
        spec = load_clip(reader.string(meta["clip"], "clip"))
        clip = clip if clip is not None else spec.create()
        recorded = meta.get("clip_sha256")
        if check_backbone and recorded and clip_hash(clip) != recorded:
            raise NasError(
                f"{meta_path}: the CLIP's frozen weights differ from the ones these prompt "
                "weights were trained on (sha256 mismatch)"
            )
        names = reader.mapping(meta.get("options") or {}, "options", open_keys=True)
        try:
            model = cls.for_subnet(spec, list(meta["class_names"]), subnet, names, clip)
        except ValueError as exc:  # options or a subnet edited beyond what the kinds take
            raise NasError(f"{meta_path}: subnet {subnet} cannot be built: {exc}") from None
        model._load_weights(Path(directory) / WEIGHTS_FILE)
        return model


def image_trunk(clip: nn.Module) -> nn.Module:
    """The transformer the image-side modules act on: a timm tower's trunk, or open_clip's own
    VisionTransformer."""
    return clip.visual.trunk if hasattr(clip.visual, "trunk") else clip.visual


def clip_hash(clip: nn.Module) -> str:
    """SHA-256 over a CLIP's frozen weights (both towers), for provenance checks."""
    return weights_hash(clip)
