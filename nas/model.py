"""A frozen timm ViT carrying prompt modules: the supernet and the standalone subnet model.

``PromptedViT`` is one class for both. As a supernet it holds every module at the search
space's maxima and ``set_subnet`` switches the active slices (bookkeeping only: nothing is
allocated or copied). ``export`` gives the standalone model of one subnet: a copy of the
backbone and modules allocated at exactly that subnet's sizes, with the same logits.

Saving writes, like PEFT's ``save_pretrained``, only what was trained: ``weights.safetensors``
(module and head weights) beside ``subnet.yaml`` (the subnet, module options, backbone
architecture, class count and a hash of the frozen backbone it was trained on).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nas.backbone import BackboneSpec, TowerGeometry, geometry_of
from nas.cost import added_flops, head_params, subnet_params
from nas.errors import NasError
from nas.modules import LoRA, PromptModule, module_class
from nas.space import SearchSpace
from nas.subnet import Subnet
from nas.towers import TokenLayout, tower_for
from nas.validate import Reader
from nas.yamlio import load_yaml, to_plain

SUBNET_FILE = "subnet.yaml"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "nas-prompt-subnet/1"


def backbone_hash(model: nn.Module) -> str:
    """SHA-256 over the frozen backbone weights (head excluded), for provenance checks."""
    digest = hashlib.sha256()
    heads = {"head.", "head_dist."}
    for name, tensor in sorted(model.state_dict().items()):
        if any(name.startswith(h) for h in heads):
            continue
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def _recorded_backbone(reader: Reader, value: Any) -> BackboneSpec:
    """The backbone a saved subnet records (``backbone`` in subnet.yaml), each field checked."""
    bb = reader.mapping(
        value,
        "backbone",
        required=["model"],
        optional=["overrides", "weights", "mean", "std", "name"],
    )
    for key in ("mean", "std"):
        v = bb.get(key)
        if v is not None and not (
            isinstance(v, list)
            and v
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        ):
            reader.fail(f"backbone.{key}", f"expected a list of numbers, got {v!r}")
    overrides = reader.mapping(bb.get("overrides") or {}, "backbone.overrides", open_keys=True)
    return BackboneSpec(
        reader.string(bb["model"], "backbone.model"),
        dict(overrides),
        weights=_recorded_weights(bb.get("weights"), bb.get("name")),
        mean=tuple(bb["mean"]) if bb.get("mean") else None,
        std=tuple(bb["std"]) if bb.get("std") else None,
        name=bb.get("name"),
    )


def _build_recorded(meta_path: Path, spec: BackboneSpec | None, num_classes: int) -> nn.Module:
    """The recorded backbone, built with its weights; one NasError naming subnet.yaml if not."""
    if spec is None:
        raise NasError(f"{meta_path}: no backbone recorded; pass the backbone to load onto")
    if spec.weights not in (None, "hub") and not Path(spec.weights).is_file():
        raise NasError(
            f"{meta_path}: the backbone weights it records ({spec.weights}) are not "
            "here; pass the pretrained backbone to load onto: "
            "PromptedViT.load(folder, backbone)"
        )
    try:
        return spec.create(num_classes)
    except NasError:
        raise
    except Exception as exc:  # an edited architecture timm cannot build
        raise NasError(
            f"{meta_path}: its backbone ({spec.model}, overrides {spec.overrides}) "
            f"cannot be built: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def _recorded_weights(weights: str | None, name: str | None) -> str | None:
    """The weights file a saved model records. One of the project's shipped backbones is
    found where this checkout keeps it, wherever the checkout that saved it was (the sha256
    check still proves they are the same weights)."""
    from nas.backbone import BACKBONES_DIR

    if not isinstance(weights, str) or not isinstance(name, str):
        return weights
    if not weights or weights == "hub" or Path(weights).is_file() or not name:
        return weights
    shipped = BACKBONES_DIR / name / Path(weights).name
    return str(shipped) if shipped.is_file() else weights


class PromptedViT(nn.Module):
    """A frozen timm VisionTransformer plus prompt modules, switchable between subnets.

    Args:
        backbone: a timm VisionTransformer with its classification head already sized
            (``BackboneSpec.create(num_classes)``). It is owned from now on: its weights are
            frozen (the head stays trainable) and forward hooks are attached to its blocks.
        modules: prompt modules by kind, each built for this backbone's geometry.
        backbone_spec: the architecture it was built from, recorded when saving.
    """

    def __init__(
        self,
        backbone: nn.Module,
        modules: Mapping[str, PromptModule],
        backbone_spec: BackboneSpec | None = None,
        full_finetune: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_spec = backbone_spec
        self.full_finetune = full_finetune
        self.prompt_modules = nn.ModuleDict(dict(modules))
        # Modules live where the backbone does (a backbone already moved to a GPU, say).
        reference = next(backbone.parameters())
        self.prompt_modules.to(device=reference.device, dtype=reference.dtype)
        self.tower = tower_for(backbone, injector=self)
        self.geometry: TowerGeometry = geometry_of(backbone)
        self.backbone.requires_grad_(full_finetune)
        for head in self.tower.head_modules():
            head.requires_grad_(True)
        self._by_site = {
            site: [m for m in self.prompt_modules.values() if site in m.sites]
            for site in ("tokens", "qkv", "mlp")
        }
        self.subnet = Subnet()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def supernet(cls, space: SearchSpace, num_classes: int, backbone: nn.Module | None = None):
        """The weight-entangled supernet of ``space`` (random backbone unless one is given)."""
        backbone = backbone if backbone is not None else space.backbone.create(num_classes)
        g = geometry_of(backbone)
        if g != space.geometry:
            raise NasError(
                f"the backbone's geometry {g} does not match the one search space "
                f"{space.name!r} assumes ({space.geometry})"
            )
        modules = {
            kind: module_class(kind)(g, s.capacity(), s.options)
            for kind, s in space.modules.items()
        }
        model = cls(backbone, modules, space.backbone)
        model.set_subnet(space.largest())
        return model

    @classmethod
    def for_subnet(
        cls,
        backbone: nn.Module,
        subnet: Subnet,
        options: Mapping[str, Mapping[str, float]] | None = None,
        backbone_spec: BackboneSpec | None = None,
        *,
        full_finetune: bool = False,
    ) -> PromptedViT:
        """A standalone model with modules allocated at exactly ``subnet``'s sizes; with
        ``full_finetune`` every backbone weight trains too (the full fine-tuning baseline)."""
        g = geometry_of(backbone)
        options = options or {}
        modules = {
            kind: module_class(kind)(g, choice, options.get(kind, {}))
            for kind, choice in subnet.items()
        }
        model = cls(backbone, modules, backbone_spec, full_finetune)
        model.set_subnet(subnet)
        return model

    # -- switching ---------------------------------------------------------------------------
    def set_subnet(self, subnet: Subnet) -> None:
        """Activate ``subnet``: per module, which leading slices are used. Allocates nothing."""
        unknown = [kind for kind in subnet if kind not in self.prompt_modules]
        if unknown:
            raise NasError(f"subnet {subnet} uses {unknown}, which this model does not hold")
        for kind, module in self.prompt_modules.items():
            module.activate(subnet[kind])
        self.subnet = subnet

    # -- injection (called by the tower adapter) ---------------------------------------------
    def tokens(self, layer: int, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        for module in self._by_site["tokens"]:
            x = module.tokens(layer, x, layout)
        return x

    def qkv_delta(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        total = None
        for module in self._by_site["qkv"]:
            delta = module.qkv_delta(layer, x)
            if delta is not None:
                total = delta if total is None else total + delta
        return total

    def mlp_out(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        for module in self._by_site["mlp"]:
            h = module.mlp_out(layer, h)
        return h

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower.forward(images)

    # -- what trains -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Module and head weights (everything that trains), by their names in this model, and
        the prompt modules' buffers (a PGN generator's batch-norm statistics)."""
        names = {id(p) for p in self.trainable_parameters()}
        out = {n: p.detach() for n, p in self.named_parameters() if id(p) in names}
        out.update(
            (f"prompt_modules.{n}", b.detach()) for n, b in self.prompt_modules.named_buffers()
        )
        return out

    def load_trainable(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (named as ``trainable_state_dict`` names them) into this model."""
        targets = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        with torch.no_grad():
            for name, tensor in tensors.items():
                targets[name].copy_(tensor)

    def num_params(self, num_classes: int | None = None) -> dict[str, int]:
        """Trainable parameters of the active subnet: modules (with full fine-tuning, every
        backbone weight but the head), head, and their total."""
        modules = subnet_params(self.subnet, self.geometry)
        head = sum(p.numel() for h in self.tower.head_modules() for p in h.parameters())
        if self.full_finetune:
            modules += sum(p.numel() for p in self.backbone.parameters()) - head
        if num_classes is not None:
            head = head_params(self.geometry, num_classes)
        return {"modules": modules, "head": head, "total": modules + head}

    def added_flops(self, merge_lora: bool = False) -> int:
        return added_flops(self.subnet, self.geometry, merge_lora=merge_lora)

    # -- standalone export -------------------------------------------------------------------
    def export(self, subnet: Subnet | None = None, *, merge_lora: bool = False) -> PromptedViT:
        """The standalone model of ``subnet`` (default: the active one): a copy of the backbone
        and modules holding only that subnet's slices. With ``merge_lora``, LoRA's ``B A`` is
        added into the copied qkv weights and no LoRA module remains."""
        subnet = self.subnet if subnet is None else subnet
        self.tower.detach()  # the copy must not carry this model's hooks
        try:
            frozen = copy.deepcopy(self._frozen())
        finally:
            self.tower.attach()
        modules = {
            kind: self.prompt_modules[kind].export(choice) for kind, choice in subnet.items()
        }
        model = self._rebuild(frozen, modules)
        model.set_subnet(subnet)
        model.train(self.training)
        if merge_lora:
            model.merge_lora()
        return model

    def _frozen(self) -> nn.Module:
        """The pretrained model that an export copies (here the backbone with its head)."""
        return self.backbone

    def _rebuild(self, frozen: nn.Module, modules: dict[str, PromptModule]) -> PromptedViT:
        """A model of this class on a copy of ``_frozen()`` with exported modules."""
        return PromptedViT(frozen, modules, self.backbone_spec, self.full_finetune)

    def merge_lora(self) -> None:
        """Fold the active LoRA updates into this model's own qkv weights and drop LoRA."""
        if "lora" not in self.prompt_modules:
            return
        lora = self.prompt_modules["lora"]
        assert isinstance(lora, LoRA)
        with torch.no_grad():
            for layer in range(self.geometry.depth):
                delta = lora.merged_weight(layer)
                if delta is not None:
                    self.tower.qkv_linear(layer).weight.add_(delta)
        del self.prompt_modules["lora"]
        self._by_site["qkv"] = [m for m in self._by_site["qkv"] if m is not lora]
        self.subnet = Subnet({k: v for k, v in self.subnet.items() if k != "lora"})

    # -- save / load -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``subnet.yaml`` and ``weights.safetensors`` (trainable weights only) of the
        standalone model of the active subnet."""
        model = self if self._is_standalone() else self.export()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "subnet": model.subnet.to_data(),
            "options": {k: dict(m.config) for k, m in model.prompt_modules.items()},
            "num_classes": int(model.backbone.num_classes),
            "backbone": model.backbone_spec.to_dict() if model.backbone_spec else None,
            # Fully fine-tuned weights are all saved: no pretrained backbone to check against.
            "backbone_sha256": None if model.full_finetune else backbone_hash(model.backbone),
            "full_finetune": model.full_finetune,
            "trainable_params": model.num_params(),
            "added_flops": model.added_flops(),
        }
        tensors = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        (directory / SUBNET_FILE).write_text(yaml.safe_dump(to_plain(meta), sort_keys=False))
        return directory

    def _is_standalone(self) -> bool:
        return all(m.holds_exactly(self.subnet[k]) for k, m in self.prompt_modules.items()) and all(
            k in self.prompt_modules for k in self.subnet
        )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backbone: nn.Module | None = None,
        *,
        merge_lora: bool = False,
        check_backbone: bool = True,
    ) -> PromptedViT:
        """Load a saved subnet onto ``backbone`` (built from the recorded architecture when not
        given; pass the pretrained backbone it was trained on). A backbone whose weights differ
        from the recorded hash is refused unless ``check_backbone`` is False."""
        directory = Path(directory)
        meta_path, weights_path = directory / SUBNET_FILE, directory / WEIGHTS_FILE
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise NasError(
                    f"{path}: missing; a saved subnet folder holds {SUBNET_FILE} and {WEIGHTS_FILE}"
                )
        doc = load_yaml(meta_path)
        reader = Reader(doc)
        meta = reader.mapping(
            doc.data, "", required=["format", "subnet", "num_classes"], open_keys=True
        )
        if meta["format"] != FORMAT:
            reader.fail("format", f"{meta['format']!r} is not {FORMAT!r}")
        subnet = Subnet.from_data(meta["subnet"], doc, "subnet")
        num_classes = reader.integer(meta["num_classes"], "num_classes", minimum=1)
        spec = _recorded_backbone(reader, meta["backbone"]) if meta.get("backbone") else None
        if backbone is None:
            backbone = _build_recorded(meta_path, spec, num_classes)
        if int(getattr(backbone, "num_classes", num_classes)) != num_classes:
            raise NasError(
                f"{meta_path}: saved for {num_classes} classes, the backbone's head has "
                f"{backbone.num_classes}"
            )
        recorded = meta.get("backbone_sha256")
        if check_backbone and recorded and backbone_hash(backbone) != recorded:
            raise NasError(
                f"{meta_path}: the backbone's frozen weights differ from the ones these prompt "
                "weights were trained on (sha256 mismatch); load onto the same pretrained backbone"
            )
        options = reader.mapping(meta.get("options") or {}, "options", open_keys=True)
        try:
            model = cls.for_subnet(
                backbone,
                subnet,
                options,
                spec,
                full_finetune=bool(meta.get("full_finetune", False)),
            )
        except NasError:
            raise
        except Exception as exc:  # a subnet or options edited beyond what the backbone takes
            raise NasError(
                f"{meta_path}: subnet {subnet} cannot be built on this backbone: "
                f"{type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise NasError(f"{weights_path}: not a readable safetensors file ({exc})") from None
        broken = next(
            (k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()),
            None,
        )
        if broken is not None:
            raise NasError(f"{weights_path}: {broken} holds NaN or infinite values")
        expected = model.trainable_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise NasError(
                f"{weights_path}: does not match subnet {subnet} "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
            )
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise NasError(
                    f"{weights_path}: {name} has shape {tuple(tensor.shape)}, subnet {subnet} "
                    f"needs {tuple(expected[name].shape)}"
                )
        model.load_trainable(tensors)
        if merge_lora:
            model.merge_lora()
        return model
