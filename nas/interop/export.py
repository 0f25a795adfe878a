"""Taking a trained subnet into other tools: a PEFT adapter, or a plain timm checkpoint.

``nas export MODEL_DIR --format peft --out DIR`` writes what ``peft.PeftModel.from_pretrained``
reads onto the timm model the subnet was trained on: ``adapter_config.json`` and
``adapter_model.safetensors``, the fields and tensors of the one PEFT method the subnet uses
(a kind with a ``peft_type`` writes its own: LoRA its per-layer ranks as ``rank_pattern``, with
``lora_alpha`` equal to the rank so that PEFT's ``alpha / r`` scaling is 1, as this project's
LoRA has none), the classification head as a module to save. ``--format timm`` folds the
mergeable kinds into the frozen weights and writes timm's own ``config.json`` +
``model.safetensors`` (``timm.models.save_for_hf``), which
``timm.create_model("local-dir:DIR", pretrained=True)`` loads, as does ``create_model(NAME,
checkpoint_path=DIR/model.safetensors, num_classes=..., **overrides)``.

Only what a format can express is exported: PEFT's and timm's ViTs have no prompt tokens or
adapters, so a subnet with VPT, Adapter, PGN or UPT layers gets one error naming them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nas.core.errors import NasError
from nas.families import load
from nas.families.vit.model import PromptedViT

FORMATS = ("peft", "timm")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The key prefix of a base model's weights inside a PEFT adapter file.
PEFT_PREFIX = "base_model.model."


def load_vit(model_dir: str | Path) -> PromptedViT:
    """A saved subnet folder that holds a timm ViT classifier; one NasError otherwise."""
    model = load(model_dir)
    if not isinstance(model, PromptedViT):
        raise NasError(
            f"{model_dir}: a {type(model).__name__} (a CLIP classifies through its text tower); "
            "`nas export` writes timm ViT classifiers"
        )
    if model.full_finetune:
        raise NasError(
            f"{model_dir}: a fully fine-tuned model; every weight trained, so there is no "
            "adapter to export (its weights.safetensors is already the whole model)"
        )
    return model


def _active(model: PromptedViT) -> dict[str, Any]:
    """The modules the active subnet uses, by kind."""
    return {k: m for k, m in model.prompt_modules.items() if model.subnet.get(k)}


def _listed(model: PromptedViT, kinds: list[str]) -> str:
    modules = model.prompt_modules
    return ", ".join(f"{k} ({type(modules[k]).choice_str(model.subnet[k])})" for k in kinds)


def check_expressible(model: PromptedViT, fmt: str, where: str) -> None:
    """One NasError naming every module of the subnet that ``fmt`` cannot express: timm's
    checkpoint holds the kinds that merge into the frozen weights (``mergeable``), a PEFT
    adapter one kind that PEFT has (``peft_type``)."""
    active = _active(model)
    if fmt == "timm":
        can = sorted(k for k, m in model.prompt_modules.items() if m.mergeable)
        cannot = [k for k, m in active.items() if not m.mergeable]
        what = f"the modules that merge into the frozen weights ({', '.join(can) or 'none'})"
    else:
        can = sorted(k for k, m in model.prompt_modules.items() if m.peft_type)
        cannot = [k for k, m in active.items() if not m.peft_type]
        what = f"one PEFT method ({', '.join(can) or 'none of these modules'})"
    if cannot:
        raise NasError(
            f"{where}: subnet {model.subnet} uses {_listed(model, cannot)}; --format {fmt} "
            f"expresses {what} and the head only (export a subnet of those, or load this one "
            "with nas.families.load)"
        )
    if fmt == "peft" and not active:
        raise NasError(
            f"{where}: subnet {model.subnet} has no module that PEFT expresses, so there is no "
            "PEFT adapter to write; --format timm writes its head into a timm checkpoint"
        )
    methods = {m.peft_type for m in active.values()}
    if fmt == "peft" and len(methods) > 1:
        raise NasError(
            f"{where}: subnet {model.subnet} uses {_listed(model, sorted(active))}; a PEFT "
            f"adapter holds one method ({', '.join(sorted(methods))}): export a subnet with one"
        )


def _names(model: PromptedViT) -> dict[int, str]:
    """Module id -> its qualified name in the timm model."""
    return {id(m): name for name, m in model.backbone.named_modules()}


def head_names(model: PromptedViT) -> list[str]:
    names = _names(model)
    return [names[id(h)] for h in model.tower.head_modules()]


def peft_adapter(
    model: PromptedViT, where: str = ""
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the adapter's tensors: the active kinds' own
    (``PromptModule.peft_adapter``, one PEFT method, combined by its ``peft_combine``), the
    head saved whole."""
    modules = list(_active(model).values())
    names = _names(model)

    def name_of(layer: int, op: str) -> str:
        return names[id(model.tower.operation(layer, op))]

    try:
        fields, tensors = type(modules[0]).peft_combine([m.peft_adapter(name_of) for m in modules])
    except ValueError as exc:
        raise NasError(f"{where}: {exc}") from None
    spec = model.backbone_spec
    config = {
        "task_type": None,
        "base_model_name_or_path": spec.model if spec else None,
        **fields,
        "modules_to_save": head_names(model),
        "inference_mode": True,
    }
    out = {f"{PEFT_PREFIX}{k}": v.detach().contiguous().clone() for k, v in tensors.items()}
    for head in head_names(model):
        for key, tensor in model.backbone.get_submodule(head).state_dict().items():
            out[f"{PEFT_PREFIX}{head}.{key}"] = tensor.detach().contiguous().clone()
    return config, out


def base_model_code(model: PromptedViT) -> str:
    """The Python that builds the timm model an export goes onto: the backbone's architecture
    with the task's class count, and its pretrained weights without their head (the trained
    head is in the export)."""
    spec = model.backbone_spec
    if spec is None:
        return "base = ...  # the timm model it was trained on, with its pretrained weights"
    args = [repr(spec.model), f"num_classes={int(model.backbone.num_classes)}"]
    args += [f"{k}={v!r}" for k, v in spec.overrides.items()]
    if spec.weights in (None, "hub"):
        if spec.weights == "hub":
            args.insert(1, "pretrained=True")  # timm refits the head to num_classes
        return f"base = timm.create_model({', '.join(args)})"
    path = Path(spec.weights).resolve()
    lines = [f"base = timm.create_model({', '.join(args)})", f"weights = {str(path)!r}"]
    if path.suffix == ".npz":  # a JAX checkpoint: timm's own loader
        return "\n".join([*lines, "base.load_pretrained(weights)"])
    if path.suffix == ".safetensors":
        lines.insert(0, "from safetensors.torch import load_file")
        lines.append("state = load_file(weights)")
    else:
        lines.append("state = torch.load(weights, map_location='cpu', weights_only=True)")
    lines.insert(0, "from timm.models.vision_transformer import checkpoint_filter_fn")
    heads = tuple(f"{h}." for h in head_names(model))
    lines += [
        "state = checkpoint_filter_fn(state, base)  # timm's layout and position grid",
        f"state = {{k: v for k, v in state.items() if not k.startswith({heads!r})}}",
        "missing = base.load_state_dict(state, strict=False).missing_keys",
        f"assert all(k.startswith({heads!r}) for k in missing), missing  # only the head",
    ]
    return "\n".join(lines)


def write_peft(
    model: PromptedViT,
    out: Path,
    adapter: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
) -> list[Path]:
    config, tensors = adapter or peft_adapter(model, str(out))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    mean, std = model.backbone_spec.normalisation() if model.backbone_spec else (None, None)
    targets = ", ".join(config["target_modules"])
    readme = f"""# {config["peft_type"]} adapter exported by `nas export`

Subnet {model.subnet}: {config["peft_type"]} on {targets}; the head
({", ".join(config["modules_to_save"])}) saved whole. Inputs normalised with mean {mean}
and std {std}. Run from the folder that holds `{out.name}/`:

```python
import timm
import torch
from peft import PeftModel

{base_model_code(model)}
model = PeftModel.from_pretrained(base, {out.name!r}).eval()
```
"""
    (out / "README.md").write_text(readme)
    return [out / ADAPTER_CONFIG, out / ADAPTER_WEIGHTS, out / "README.md"]


def write_timm(model: PromptedViT, out: Path) -> list[Path]:
    from timm.models import save_for_hf

    merged = model.export(merge=True)
    backbone = merged.backbone
    config: dict[str, Any] = {}
    if model.backbone_spec is not None:
        mean, std = model.backbone_spec.normalisation()
        config["pretrained_cfg"] = {"mean": list(mean), "std": list(std)}
    spec_args = dict(model.backbone_spec.overrides) if model.backbone_spec else {}
    spec_args.update(_biases_made(backbone, spec_args))
    merged.tower.detach()  # timm's save reads state_dict(); no hooks needed, none saved
    try:
        save_for_hf(
            backbone,
            str(out),
            model_config=config,
            model_args=spec_args or None,
            safe_serialization=True,
        )
    finally:
        merged.tower.attach()
    describe_weights(out / "config.json", model)
    return [out / "config.json", out / "model.safetensors"]


#: timm ViT arguments that switch biases off, and the layers of each block they cover.
BIAS_ARGS = {"qkv_bias": ("attn.qkv",), "proj_bias": ("attn.proj", "mlp.fc1", "mlp.fc2")}


def _biases_made(backbone: torch.nn.Module, args: dict[str, Any]) -> dict[str, bool]:
    """Where merging gave a layer of a model built without biases (``qkv_bias: false``) a
    bias (bias tuning, SSF), the timm arguments that rebuild it with biases, and zero biases
    on the rest of that group, so that timm's checkpoint loads strictly."""
    switched = {}
    for arg, paths in BIAS_ARGS.items():
        layers = [block.get_submodule(p) for block in backbone.blocks for p in paths]
        if args.get(arg, True) is False and any(layer.bias is not None for layer in layers):
            for layer in layers:
                if layer.bias is None:
                    weight = layer.weight
                    layer.bias = torch.nn.Parameter(
                        torch.zeros(len(weight), dtype=weight.dtype, device=weight.device),
                        requires_grad=False,
                    )
            switched[arg] = True
    return switched


#: What timm's config carries over from the architecture's stock pretrained weights (their
#: release tag, licence, papers, download source): it would describe weights these are not.
STOCK_FIELDS = ("tag", "license", "paper_ids", "paper_name", "origin_url", "notes", "url",
                "hf_hub_id", "hf_hub_filename", "description")  # fmt: skip


def describe_weights(config_path: Path, model: PromptedViT) -> None:
    """timm's ``config.json`` rewritten to describe the exported weights: the stock weights'
    tag and licence removed, the backbone's weights and the subnet named instead."""
    config = json.loads(config_path.read_text())
    cfg = config.get("pretrained_cfg", {})
    for key in STOCK_FIELDS:
        cfg.pop(key, None)
    spec = model.backbone_spec
    name = (spec.name or spec.model) if spec else "unknown"
    source = {None: "random initialisation", "hub": "timm's pretrained weights"}.get(
        spec.weights if spec else None, Path(spec.weights).name if spec and spec.weights else ""
    )
    cfg["tag"] = f"nas-{name}".replace("_", "-").lower()
    cfg["description"] = (
        f"{spec.model if spec else 'a timm ViT'} from {source} ({name}), with the prompt-module "
        f"subnet {model.subnet} trained on it and merged in, and a {config.get('num_classes')}-"
        "class head; exported by nas-prompt"
    )
    if spec is not None and spec.weights == "hub":
        cfg["notes"] = ["the backbone's licence is that of timm's pretrained weights for "
                        f"{spec.model}"]  # fmt: skip
    config["pretrained_cfg"] = cfg
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def export(model_dir: str | Path, fmt: str, out: str | Path, *, force: bool = False) -> list[Path]:
    """Export the saved subnet in ``model_dir`` as ``fmt`` into the folder ``out``; returns the
    files written. An ``out`` holding files is refused unless ``force``."""
    if fmt not in FORMATS:
        raise NasError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    model = load_vit(model_dir)
    check_expressible(model, fmt, str(model_dir))
    adapter = peft_adapter(model, str(model_dir)) if fmt == "peft" else None  # checked first
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NasError(f"--out {out}: a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NasError(f"--out {out}: the folder is not empty (--force writes into it)")
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        return write_peft(model, out, adapter) if adapter else write_timm(model, out)
