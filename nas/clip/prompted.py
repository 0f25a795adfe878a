"""A frozen CLIP carrying prompt modules: the supernet and the standalone subnet model.

``PromptedCLIP`` is ``PromptedViT`` on CLIP's image trunk (VPT, LoRA, Adapter, PGN and UPT's
visual prompts act through the same per-block injection interface, so the modules are the ViT
ones, not copies) plus the text side: class names through the prompt template, or through
learned context (``upt``, text or unified mode), then the text tower. Logits are CLIP's scaled
cosine similarities between the image and the class embeddings; no classification head.

Order inside one forward: the text side first (in unified mode it computes the visual prompts
with the text context, in one pass of UPT's encoder layer), then the image tower.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nas.clip.model import ClipSpec, encode_tokens, load_clip
from nas.cost import subnet_params
from nas.errors import NasError
from nas.model import SUBNET_FILE, WEIGHTS_FILE, PromptedViT
from nas.modules import PromptModule, module_class
from nas.modules.upt import RANDOM_INIT
from nas.space import SearchSpace
from nas.subnet import Subnet

FORMAT = "nas-prompt-clip-subnet/1"
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


class PromptedCLIP(PromptedViT):
    """A frozen ``open_clip.CLIP`` (a timm image trunk or open_clip's own), plus prompt modules.

    Args:
        clip: the model (``ClipSpec.create()``); owned from now on (frozen, hooks attached).
        spec: what it was built from (tokenizer, template, geometry).
        class_names: the classes, in label order.
        modules: prompt modules by kind, built for ``spec.geometry()``.
    """

    def __init__(
        self,
        clip: nn.Module,
        spec: ClipSpec,
        class_names: Sequence[str],
        modules: Mapping[str, PromptModule],
    ) -> None:
        super().__init__(image_trunk(clip), modules, backbone_spec=None)
        self.clip = clip.requires_grad_(False)
        # The trunk is already a submodule of ``clip``: keep it as a plain attribute so that
        # its weights appear once in ``state_dict()`` (under ``clip.visual.``), not twice.
        object.__setattr__(self, "backbone", self._modules.pop("backbone"))
        self.clip_spec = spec
        self.geometry = spec.geometry()
        self.class_names = list(class_names)
        self.prompts = ClassPrompts(
            spec.tokenizer(), self.class_names, spec.template, self.geometry.text_context
        )
        self._template: torch.Tensor | None = None

    # -- construction ------------------------------------------------------------------------
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
    def for_clip_subnet(
        cls,
        spec: ClipSpec,
        class_names: Sequence[str],
        subnet: Subnet,
        options: Mapping[str, Mapping[str, Any]] | None = None,
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
        upt = self._upt()
        phrase = upt.config.get("init") if upt is not None else None
        if not phrase or phrase == RANDOM_INIT:
            return
        ids = self.prompts.tokenizer([str(phrase)])[0]
        words = ids[1 : int((ids != 0).sum()) - 1]  # without the start and end tokens
        with torch.no_grad():
            upt.init_context(self.clip.token_embedding(words.to(self._device())))

    def _upt(self) -> PromptModule | None:
        return self.prompt_modules["upt"] if "upt" in self.prompt_modules else None  # noqa: SIM401 (a ModuleDict has no get)

    def _device(self) -> torch.device:
        return next(self.clip.parameters()).device

    # -- forward -----------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """(classes, embed) unit vectors of the class prompts under the active subnet."""
        upt = self._upt()
        ctx = upt.text_context() if upt is not None else None
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

    # -- standalone export (PromptedViT.export, on a copy of the whole CLIP) -----------------
    def _frozen(self) -> nn.Module:
        return self.clip

    def _rebuild(self, frozen: nn.Module, modules: dict[str, PromptModule]) -> PromptedCLIP:
        return PromptedCLIP(frozen, self.clip_spec, self.class_names, modules)

    # -- save / load -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """``subnet.yaml`` (subnet, options, the CLIP it runs on, class names) and
        ``weights.safetensors`` (the prompt modules' weights only)."""
        model = self if self._is_standalone() else self.export()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "subnet": model.subnet.to_data(),
            "options": {k: dict(m.config) for k, m in model.prompt_modules.items()},
            "clip": self.clip_spec.to_dict()["clip"],
            "class_names": self.class_names,
            "clip_sha256": clip_hash(model.clip),
            "trainable_params": model.num_params(),
            "added_flops": model.added_flops(),
        }
        tensors = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        (directory / SUBNET_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
        return directory

    @classmethod
    def load_clip_subnet(cls, directory: str | Path, *, check_clip: bool = True) -> PromptedCLIP:
        """Load a saved CLIP subnet onto the CLIP it names (refused if that CLIP's weights
        differ from the ones it was trained on, unless ``check_clip`` is False)."""
        from nas.subnet import Subnet
        from nas.validate import Reader
        from nas.yamlio import load_yaml

        directory = Path(directory)
        meta_path, weights_path = directory / SUBNET_FILE, directory / WEIGHTS_FILE
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise NasError(f"{path}: missing; a saved subnet folder holds both files")
        doc = load_yaml(meta_path)
        r = Reader(doc)
        meta = r.mapping(
            doc.data, "", required=["format", "subnet", "clip", "class_names"], open_keys=True
        )
        if meta["format"] != FORMAT:
            r.fail("format", f"{meta['format']!r} is not {FORMAT!r}")
        spec = load_clip(r.string(meta["clip"], "clip"))
        clip = spec.create()
        if check_clip and meta.get("clip_sha256") and clip_hash(clip) != meta["clip_sha256"]:
            raise NasError(
                f"{meta_path}: the CLIP's frozen weights differ from the ones these prompt "
                "weights were trained on (sha256 mismatch)"
            )
        subnet = Subnet.from_data(meta["subnet"], doc, "subnet")
        model = cls.for_clip_subnet(
            spec, list(meta["class_names"]), subnet, meta.get("options") or {}, clip
        )
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise NasError(f"{weights_path}: not a readable safetensors file ({exc})") from None
        expected = model.trainable_state_dict()
        if set(tensors) != set(expected) or any(
            tensors[k].shape != expected[k].shape for k in tensors
        ):
            raise NasError(f"{weights_path}: does not match subnet {subnet}")
        model.load_trainable(tensors)
        return model


def image_trunk(clip: nn.Module) -> nn.Module:
    """The transformer the image-side modules act on: a timm tower's trunk, or open_clip's own
    VisionTransformer."""
    return clip.visual.trunk if hasattr(clip.visual, "trunk") else clip.visual


def clip_hash(clip: nn.Module) -> str:
    """SHA-256 over a CLIP's frozen weights (both towers), for provenance checks."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
