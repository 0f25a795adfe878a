"""A spec's retraining baselines (``stages.retrain.baselines``): named subnets, written inline,
as subnet files, or as NOAH configs; their names confined to one folder name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nas.core.errors import ConfigError
from nas.core.validate import Reader
from nas.core.yamlio import Document
from nas.interop.noah_import import load_subnet_file
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet, too_deep

#: The two baselines every ViT spec may name without a subnet.
LINEAR_PROBE, FULL_FINETUNE = "linear-probe", "full-finetune"
#: A baseline's name: it names folders (retrain/<ds>-seed<k>/baseline-NAME), MLflow runs and
#: a column of `nas report --by-method`.
BASELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _check_baseline_name(r: Reader, name: Any) -> None:
    key = f"stages.retrain.baselines.{name}"
    if not isinstance(name, str) or not BASELINE_NAME.match(name):
        r.fail(
            key,
            f"{name!r} cannot name a baseline: it names folders and runs, so use letters, "
            "digits and _ . + - (up to 64, starting with a letter or digit)",
        )
    if name == "searched":
        r.fail(key, "'searched' names the search's own column in the reports: choose another")


def parse_baselines(
    r: Reader, raw: Any, space: SearchSpace, doc: Document
) -> tuple[dict[str, Subnet], list[str]]:
    """``stages.retrain.baselines``: name -> a subnet of the space, ``linear-probe`` or
    ``full-finetune`` (the names of the latter are returned apart)."""
    baselines, full = {}, []
    for bname, value in (r.mapping(raw or {}, "stages.retrain.baselines", open_keys=True)).items():
        _check_baseline_name(r, bname)
        if isinstance(value, str) and value.lower().endswith((".yaml", ".yml")):
            subnet = _baseline_file(r, doc, value, f"stages.retrain.baselines.{bname}")
        elif isinstance(value, str):
            if value not in (LINEAR_PROBE, FULL_FINETUNE):
                r.fail(
                    f"stages.retrain.baselines.{bname}",
                    f"{value!r} is not a subnet; expected a subnet mapping, a subnet YAML "
                    f"file (this platform's or one of NOAH's configs), {LINEAR_PROBE!r} or "
                    f"{FULL_FINETUNE!r}",
                )
            if space.backbone.classifies_by_name:
                r.fail(
                    f"stages.retrain.baselines.{bname}",
                    f"{value!r} is for classifier backbones; on a CLIP, an empty subnet ({{}}) "
                    "is zero-shot classification, and full fine-tuning is not offered",
                )
            baselines[bname] = Subnet()
            if value == FULL_FINETUNE:
                full.append(bname)
            continue
        else:
            subnet = Subnet.from_data(value, doc, f"stages.retrain.baselines.{bname}")
        if len(subnet) == 0 and not space.backbone.classifies_by_name:
            r.fail(
                f"stages.retrain.baselines.{bname}",
                f"{value!r} is an empty subnet (every module off), which trains the head alone: "
                f"write {LINEAR_PROBE!r} if that is meant",
            )
        unknown = [kind for kind in subnet if kind not in space.modules]
        if unknown:
            r.fail(
                f"stages.retrain.baselines.{bname}",
                f"uses {unknown}, which the space does not hold",
            )
        deep = too_deep(subnet, space.geometry.depth)
        if deep:
            r.fail(f"stages.retrain.baselines.{bname}", deep)
        limit = 4 * space.geometry.width  # the spaces' own rule: wider is not efficient
        widths = {
            k: max(map(space.modules[k].module.width_of, c))
            for k, c in subnet.items()
            if hasattr(space.modules[k].module, "width_of") and c
        }
        wide = {k: w for k, w in widths.items() if w > limit}
        if wide:
            kind, dim = next(iter(wide.items()))
            r.fail(
                f"stages.retrain.baselines.{bname}",
                f"{kind} dim {dim:,} is above 4 x the backbone's width ({space.geometry.width}): "
                f"expected at most {limit:,} (a module that wide is not parameter-efficient, "
                "and may not fit in memory)",
            )
        baselines[bname] = subnet
    return baselines, full


def _baseline_file(r: Reader, doc: Document, value: str, key: str) -> Subnet:
    """A baseline named by file: a subnet YAML or one of NOAH's subnet configs, relative to
    the spec's folder (its contents, not its path, enter the spec's hash)."""

    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path(doc.file).parent if doc.file else Path.cwd()) / path
    if not path.is_file():
        r.fail(key, f"subnet file not found: {path}")
    try:
        return load_subnet_file(path)
    except ConfigError as exc:
        r.fail(key, f"{value}: {exc}")
    raise AssertionError  # r.fail raises
