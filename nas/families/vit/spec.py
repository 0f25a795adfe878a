"""Backbones: which timm Vision Transformer to build, its geometry, and creating it.

A ``BackboneSpec`` names a timm model and optional architecture overrides (``img_size``,
``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``in_chans``, ``reg_tokens``,
``class_token``, ``global_pool``, ...). Its geometry (width, depth, tokens) is read off the
model built on the ``meta`` device, which allocates no memory and downloads nothing, or off
the backbone file's ``geometry`` where it records one (checked when the model is built): then
describing a space on it (``nas space show``) loads neither timm nor torch. timm, torch and
safetensors are imported by the functions that build or load a model, not by this module.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nas.core.errors import ConfigError, NasError
from nas.core.paths import BACKBONES_DIR
from nas.core.validate import Reader
from nas.core.yamlio import join_key, load_yaml
from nas.towers.geometry import TowerGeometry

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The fields of a backbone file's ``geometry`` (``nas.towers.geometry.TowerGeometry``'s).
GEOMETRY_FIELDS = (
    "width", "depth", "num_heads", "mlp_hidden", "num_prefix_tokens", "num_patches",
    "patch_size", "in_chans",
)  # fmt: skip


@dataclass(frozen=True)
class BackboneSpec:
    """A timm model name, architecture overrides, and where its weights come from.

    Args:
        model: a timm model name, e.g. ``vit_base_patch16_224.augreg_in21k``.
        overrides: ``timm.create_model`` arguments (img_size, patch_size, depth, ...).
        weights: None for random initialisation; ``"hub"`` for timm's pretrained weights
            (downloaded from the Hugging Face hub); or a local checkpoint file
            (``.safetensors``, a torch ``.pth``/``.bin``/``.pt``, or a JAX ``.npz``).
        mean, std: input normalisation in [0, 1] units (default: the model's timm config).
        name: a display name (the shipped backbones have one).
    """

    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    name: str | None = None
    #: the geometry the backbone file records (None: read off the model built on ``meta``);
    #: not part of the spec's identity, and checked against the model when it is built
    recorded: TowerGeometry | None = field(default=None, compare=False, repr=False)
    #: the file it was read from, for messages
    source: str | None = field(default=None, compare=False, repr=False)

    def key(self) -> str:
        """Identifies the architecture (not the weights): what the geometry depends on."""
        return json.dumps({"model": self.model, "overrides": self.overrides}, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.overrides:
            out["overrides"] = dict(self.overrides)
        for name in ("weights", "name"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                out[name] = list(getattr(self, name))
        return out

    def geometry(self) -> TowerGeometry:
        return self.recorded if self.recorded is not None else _geometry(self.key())

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) for the model's inputs."""
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        import timm.data  # heavy (torch): only a backbone without its own statistics needs it

        cfg = timm.get_pretrained_cfg(self.model) if "." in self.model else None
        if cfg is None:
            try:
                cfg = timm.get_pretrained_cfg(self.model, allow_unregistered=True)
            except Exception:
                cfg = None
        mean = getattr(cfg, "mean", None) or timm.data.IMAGENET_DEFAULT_MEAN
        std = getattr(cfg, "std", None) or timm.data.IMAGENET_DEFAULT_STD
        channels = self.geometry().in_chans
        if len(mean) != channels:  # e.g. a single-channel model: average the RGB statistics
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
        return tuple(mean), tuple(std)

    # -- the backbone family's protocol (nas.families.Backbone) ------------------------------
    family: ClassVar[str] = "vit"
    #: A CLIP classifies by class names through its text tower; a ViT by a trained head (so
    #: linear probing and full fine-tuning are baselines of this family only).
    classifies_by_name: ClassVar[bool] = False

    def head_params(self, num_classes: int) -> int:
        """Parameters of the classification head that trains with every method."""
        return self.geometry().width * num_classes + num_classes

    def weight_files(self) -> dict[str, str | None]:
        """The local weight files the backbone loads, by role, for provenance (None: none)."""
        local = self.weights if self.weights and Path(self.weights).is_file() else None
        return {"backbone": local}

    def check_weights(self) -> None:
        """Load the weights once (a clear error if they are missing, damaged or do not fit),
        before any trial starts; random and hub weights need no check."""
        if self.weights not in (None, "hub"):
            self.create(2)  # checks the recorded geometry too
        else:
            self.check_geometry()

    def create(self, num_classes: int, **kwargs: Any) -> nn.Module:
        """Build the model with a fresh ``num_classes`` head and load its weights (if any)."""
        model = self._create(num_classes, **kwargs)
        if self.recorded is not None:
            from nas.towers.adapters import geometry_of  # torch: see the module's docstring

            self.check_geometry(geometry_of(model))
        return model

    def check_geometry(self, built: TowerGeometry | None = None) -> None:
        """ConfigError naming the file where the recorded geometry is not the model's (``built``,
        or the model built on ``meta``)."""
        if self.recorded is None:
            return
        if built is None:
            try:
                built = _geometry(self.key())
            except ConfigError as exc:  # an unknown model or overrides: say which file
                raise ConfigError(exc.message, file=exc.file or self.source, key=exc.key) from None
        wrong = [
            f"{f} {getattr(self.recorded, f)} (the model has {getattr(built, f)})"
            for f in GEOMETRY_FIELDS
            if getattr(built, f) != getattr(self.recorded, f)
        ]
        if wrong:
            raise ConfigError(
                f"backbone geometry does not match the model: {', '.join(wrong)}; correct it "
                "or leave geometry out",
                file=self.source,
            )

    def _create(self, num_classes: int, **kwargs: Any) -> nn.Module:
        import timm  # heavy: see the module's docstring

        args = {**self.overrides, **kwargs}
        if self.weights == "hub":
            try:
                return timm.create_model(
                    self.model, pretrained=True, num_classes=num_classes, **args
                )
            except (OSError, RuntimeError, ValueError) as exc:
                raise NasError(
                    f"could not get the pretrained weights of {self.model!r} from the hub "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Without network "
                    "access, download the checkpoint elsewhere and set the backbone's weights to "
                    "its local path (weights: /path/to/model.safetensors; .pth, .bin and JAX "
                    ".npz files work too)"
                ) from None
        model = timm.create_model(self.model, pretrained=False, num_classes=num_classes, **args)
        if self.weights is not None:
            load_weights(model, self.weights)
        return model


HEAD_PREFIXES = ("head.", "head_dist.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch  # heavy: see the module's docstring
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise NasError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NasError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from None
    for key in ("state_dict", "model", "module", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NasError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model``'s backbone (its head is left as built).

    The same path serves a user's checkpoint and the project's shipped backbone. timm's ViT
    checkpoint filter adapts other layouts (JAX/big_vision names, another grid's position
    embedding). Anything that does not fit is one NasError naming the file and the keys."""
    import torch  # heavy: see the module's docstring

    path = Path(path)
    if not path.is_file():
        raise NasError(f"{path}: weights file not found")
    if path.suffix == ".npz":
        try:
            model.load_pretrained(str(path))  # timm's loader for JAX ViT checkpoints
        except Exception as exc:
            raise NasError(f"{path}: cannot load this JAX checkpoint ({exc})") from None
        return
    state = _read_state_dict(path)
    try:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):
            state = checkpoint_filter_fn(state, model)
    except Exception as exc:
        raise NasError(f"{path}: checkpoint does not fit {type(model).__name__} ({exc})") from None
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    broken = next(
        (k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()),
        None,
    )
    if broken is not None:
        raise NasError(f"{path}: tensor {broken!r} holds NaN or infinite values")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            detail.append(
                f"{len(wrong)} of another shape (e.g. {k}: file {tuple(state[k].shape)}, "
                f"model {tuple(own[k].shape)})"
            )
        raise NasError(f"{path}: checkpoint does not fit the backbone: {'; '.join(detail)}")
    model.load_state_dict(state, strict=False)


def portable(value: Any) -> Any:
    """Plain data with every path into the shipped backbones folder written relative to it
    (``<backbones>/vit_fmnist/model.safetensors``): what a spec hashes, so that a run has the
    same identity wherever the project is checked out (``ray job submit`` runs each job from a
    new copy of the working directory)."""
    root = f"{BACKBONES_DIR}/"
    if isinstance(value, str) and value.startswith(root):
        return "<backbones>/" + value[len(root) :]
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    return value


def load_backbone(name_or_path: str | Path) -> BackboneSpec:
    """A shipped backbone by name (``vit_fmnist``) or a ``backbone.yaml`` file: the model,
    overrides, weights file (relative to the YAML's folder) and normalisation."""
    path = Path(name_or_path)
    if not path.suffix:
        shipped = BACKBONES_DIR / str(name_or_path) / "backbone.yaml"
        if shipped.is_file():
            path = shipped
        elif path.is_dir():
            path = path / "backbone.yaml"
        else:
            known = ", ".join(
                sorted(
                    {
                        p.parent.name
                        for pattern in ("*/backbone.yaml", "*/clip.yaml")
                        for p in BACKBONES_DIR.glob(pattern)
                    }
                )
            )
            raise ConfigError(
                f"no shipped backbone of that name and no such folder (shipped: {known}); "
                "or give a backbone.yaml path or a mapping with 'model'",
                file=path,
            )
    doc = load_yaml(path)
    r = Reader(doc)
    data = r.mapping(
        doc.data,
        "",
        required=["model"],
        optional=["name", "overrides", "weights", "mean", "std", "geometry"],
    )
    return parse_backbone_mapping(data, r, "", path.parent)


def _recorded_geometry(value: Any, r: Any, key: str) -> TowerGeometry:
    """A backbone's ``geometry`` mapping (every field of ``GEOMETRY_FIELDS``)."""
    value = r.mapping(value, key, required=list(GEOMETRY_FIELDS))
    return TowerGeometry(
        **{
            f: r.integer(value[f], join_key(key, f), minimum=0 if f == "num_prefix_tokens" else 1)
            for f in GEOMETRY_FIELDS
        }
    )


def parse_backbone_mapping(data: dict, r: Any, key: str, base: Path) -> BackboneSpec:
    """A validated BackboneSpec from a mapping read with a ``Reader`` (see ``BackboneSpec``)."""
    overrides = r.mapping(data.get("overrides") or {}, join_key(key, "overrides"), open_keys=True)
    weights = data.get("weights")
    if weights is not None:
        weights = r.string(weights, join_key(key, "weights"))
        if weights != "hub":
            full = Path(weights).expanduser()
            full = full if full.is_absolute() else (base / full)
            if not full.is_file():
                r.fail(join_key(key, "weights"), f"file not found: {full}")
            weights = str(full.resolve())
    stats = {}
    for name in ("mean", "std"):
        if data.get(name) is not None:
            values = data[name] if isinstance(data[name], list) else [data[name]]
            stats[name] = tuple(
                r.number(v, join_key(key, f"{name}[{i}]"), minimum=0) for i, v in enumerate(values)
            )
    return BackboneSpec(
        model=r.string(data["model"], join_key(key, "model")),
        overrides=dict(overrides),
        weights=weights,
        mean=stats.get("mean"),
        std=stats.get("std"),
        name=data.get("name"),
        recorded=(
            _recorded_geometry(data["geometry"], r, join_key(key, "geometry"))
            if data.get("geometry") is not None
            else None
        ),
        source=str(r.doc.file) if getattr(r, "doc", None) and r.doc.file else None,
    )


@functools.lru_cache(maxsize=64)
def _geometry(spec_key: str) -> TowerGeometry:
    import timm  # heavy: see the module's docstring
    import torch

    from nas.towers.adapters import geometry_of

    spec = json.loads(spec_key)
    name, overrides = spec["model"], spec.get("overrides", {})
    arch = name.split(".")[0]  # "vit_base_patch16_224.augreg_in21k": architecture.tag
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.8)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown timm model {name!r}{hint}", key="backbone.model")
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **overrides)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(
            f"timm cannot build {name!r} with these overrides: {exc}", key="backbone.overrides"
        ) from None
    try:
        return geometry_of(model)
    except ConfigError as exc:
        raise ConfigError(exc.message, key="backbone.model") from None
