"""What every frozen model carrying prompt modules shares, whichever backbone family it is on
(a timm ViT classifier: ``nas.families.vit.model.PromptedViT``; a CLIP:
``nas.families.clip.model.PromptedCLIP``):
switching subnets, the per-block injection the towers call, what trains, the standalone export,
and saving / loading a subnet folder (``subnet.yaml`` + ``weights.safetensors``).

A family subclasses ``PromptedModel`` with its own construction (``supernet``, ``for_subnet``),
forward, parameter count, what ``subnet.yaml`` records about its frozen model (``_record``) and
``load``; it registers the folder format it writes, so that ``load(directory)`` finds the family
of any saved subnet.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nas.core.errors import NasError
from nas.core.paths import SUBNET_FILE, WEIGHTS_FILE
from nas.core.validate import Reader
from nas.core.yamlio import load_yaml, to_plain
from nas.modules.base import PromptModule
from nas.space.cost import added_flops
from nas.space.subnet import Subnet
from nas.towers.adapters import tower_for
from nas.towers.geometry import SITES, TokenLayout, TowerGeometry, input_site


def weights_hash(model: nn.Module, skip: Iterable[str] = ()) -> str:
    """SHA-256 over a model's weights (parameters whose names start with ``skip`` left out),
    for the check that prompt weights are loaded onto the frozen model they were trained on."""
    skip = tuple(skip)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if skip and name.startswith(skip):
            continue
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


class PromptedModel(nn.Module):
    """A frozen transformer (``trunk``: the one the modules act on) plus prompt modules.

    Args:
        trunk: the transformer whose blocks the modules inject into; forward hooks are attached.
        modules: prompt modules by kind, each built for ``geometry``.
        geometry: the sizes the modules were built for.
        own_trunk: whether the trunk is this model's submodule (a ViT), or already one of a
            submodule's (CLIP's image tower: its weights appear once in ``state_dict()``).
    """

    FORMAT: ClassVar[str]  # subnet.yaml's ``format``

    def __init__(
        self,
        trunk: nn.Module,
        modules: Mapping[str, PromptModule],
        geometry: TowerGeometry,
        *,
        own_trunk: bool = True,
    ) -> None:
        super().__init__()
        if own_trunk:
            self.backbone = trunk
        else:
            object.__setattr__(self, "backbone", trunk)
        self.prompt_modules = nn.ModuleDict(dict(modules))
        # Modules live where the trunk does (a trunk already moved to a GPU, say).
        reference = next(trunk.parameters())
        self.prompt_modules.to(device=reference.device, dtype=reference.dtype)
        self._index_sites()
        self.tower = tower_for(trunk, injector=self)
        self.geometry = geometry
        self.subnet = Subnet()
        self.merged = False  # whether merge() folded kinds into the frozen weights

    def _index_sites(self) -> None:
        """Which modules act at each site (in the kinds' order), from their ``sites``."""
        self._by_site = {
            site: [m for m in self.prompt_modules.values() if site in m.sites] for site in SITES
        }

    @classmethod
    def build(
        cls,
        backbone: Any,
        space: Any,
        split: Any,
        *,
        subnet: Subnet | None = None,
        full_finetune: bool = False,
        dataset: str = "",
    ) -> PromptedModel:
        """The family's construction, as ``nas.families.build_prompted`` asks for it: the
        supernet of ``space`` (``subnet`` None) or the standalone model of ``subnet``, for the
        classes of ``split``, on ``backbone`` (the family's spec)."""
        raise NotImplementedError

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

    def used_sites(self) -> frozenset[str]:
        return frozenset(site for site, modules in self._by_site.items() if modules)

    def site_in(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        for module in self._by_site[input_site(op)]:
            x = module.site_in(layer, op, x)
        return x

    def site_out(self, layer: int, op: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for module in self._by_site[op]:
            out = module.site_out(layer, op, x, out)
        return out

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
        """Trainable parameters of the active subnet: ``modules``, ``head`` and ``total``."""
        raise NotImplementedError

    def added_flops(self, merged: bool = False) -> int:
        return added_flops(self.subnet, self.geometry, merged=merged)

    # -- standalone export -------------------------------------------------------------------
    def export(self, subnet: Subnet | None = None, *, merge: bool = False) -> Any:
        """The standalone model of ``subnet`` (default: the active one): a copy of the frozen
        model and modules holding only that subnet's slices. With ``merge``, every kind that
        can (``mergeable``: LoRA's ``B A``, say) is folded into the copied frozen weights and
        no module of it remains."""
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
        if merge:
            model.merge()
        return model

    def _frozen(self) -> nn.Module:
        """The pretrained model that an export copies."""
        raise NotImplementedError

    def _rebuild(self, frozen: nn.Module, modules: dict[str, PromptModule]) -> PromptedModel:
        """A model of this class on a copy of ``_frozen()`` with exported modules."""
        raise NotImplementedError

    def merge(self) -> None:
        """Fold every mergeable kind's active choice into this model's own frozen weights
        (``PromptModule.merge_into``) and drop those kinds."""
        merged = [k for k, m in self.prompt_modules.items() if m.mergeable]
        if not merged:
            return
        with torch.no_grad():
            # outputs first, in the order the kinds act; then inputs, the last to act first
            # (W M2 M1 x): see PromptModule.merge_into
            for kind in merged:
                self.prompt_modules[kind].merge_into(self.tower.operation, inputs=False)
            for kind in reversed(merged):
                self.prompt_modules[kind].merge_into(self.tower.operation, inputs=True)
        self.tower.detach()
        for kind in merged:
            del self.prompt_modules[kind]
        self._index_sites()
        self.tower.attach()
        self.subnet = Subnet({k: v for k, v in self.subnet.items() if k not in merged})
        self.merged = True

    def _is_standalone(self) -> bool:
        return all(m.holds_exactly(self.subnet[k]) for k, m in self.prompt_modules.items()) and all(
            k in self.prompt_modules for k in self.subnet
        )

    # -- save / load -------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        """What ``subnet.yaml`` records about the frozen model (and its classes)."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write ``subnet.yaml`` (subnet, module options, the frozen model it runs on) and
        ``weights.safetensors`` (trainable weights only) of the standalone model of the
        active subnet."""
        if self.merged:
            raise NasError(
                "this model's frozen weights hold merged modules, which a saved folder (prompt "
                "weights on the pretrained model) cannot describe: save before merging, or "
                "write a timm checkpoint (nas export --format timm)"
            )
        model = self if self._is_standalone() else self.export()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "format": self.FORMAT,
            "subnet": model.subnet.to_data(),
            "options": {k: m.options.to_data() for k, m in model.prompt_modules.items()},
            **model._record(),
            "trainable_params": model.num_params(),
            "added_flops": model.added_flops(),
        }
        tensors = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": self.FORMAT})
        (directory / SUBNET_FILE).write_text(yaml.safe_dump(to_plain(meta), sort_keys=False))
        return directory

    @classmethod
    def _open_saved(
        cls, directory: str | Path, required: list[str]
    ) -> tuple[Reader, dict[str, Any], Subnet]:
        """A saved folder's ``subnet.yaml``: checked to be this family's, with the keys it
        needs; one NasError naming the file otherwise."""
        directory = Path(directory)
        for path in (directory / SUBNET_FILE, directory / WEIGHTS_FILE):
            if not path.is_file():
                raise NasError(
                    f"{path}: missing; a saved subnet folder holds {SUBNET_FILE} and {WEIGHTS_FILE}"
                )
        doc = load_yaml(directory / SUBNET_FILE)
        reader = Reader(doc)
        meta = reader.mapping(doc.data, "", required=["format"], open_keys=True)
        if meta["format"] != cls.FORMAT:  # another family's folder: said before its keys
            reader.fail("format", f"{meta['format']!r} is not {cls.FORMAT!r}")
        reader.mapping(meta, "", required=["format", "subnet", *required], open_keys=True)
        return reader, meta, Subnet.from_data(meta["subnet"], doc, "subnet")

    def _load_weights(self, weights_path: Path) -> None:
        """The saved trainable weights into this model: every tensor it trains, of its shape,
        finite; one NasError naming the file and the tensor otherwise."""
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
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise NasError(
                f"{weights_path}: does not match subnet {self.subnet} "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
            )
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise NasError(
                    f"{weights_path}: {name} has shape {tuple(tensor.shape)}, subnet "
                    f"{self.subnet} needs {tuple(expected[name].shape)}"
                )
        self.load_trainable(tensors)
