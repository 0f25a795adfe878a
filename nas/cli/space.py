"""`nas space show|validate` and `nas subnet show`: what a search space holds, its budget and
its subnets, as a terminal prints them."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from nas.core.paths import DEFAULT_SPACE

if TYPE_CHECKING:
    from nas.space.search_space import SearchSpace

# The commands below import nas.space (and through the kinds' classes, torch) when they run,
# not when the parser is built: `nas --help` loads neither.


def _fmt_flops(flops: int) -> str:
    for unit, scale in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit}"
    return f"{flops} FLOPs"


def _fmt_share(part: int, whole: int) -> str:
    """A share that never rounds a strict part to 0% or 100%."""
    if part == whole:
        return "all of the space"
    if part == 0:
        return "none of the space"
    share = part / whole
    if share >= 0.999:
        return f"all but {whole - part:,} subnets of the space"
    return f"{share * 100:.3g}% of the space"


def space_summary(space: SearchSpace) -> dict:
    """Everything ``nas space show`` reports, as plain data."""
    from nas.space.cost import added_flops, subnet_params

    g = space.geometry
    smallest, largest = space.smallest(), space.largest()
    summary = {
        "name": space.name,
        "file": space.path,
        "backbone": {
            **space.backbone.to_dict(),
            "width": g.width,
            "depth": g.depth,
            "heads": g.num_heads,
            "tokens": g.seq_len,
        },
        "modules": {k: s.to_data() for k, s in space.modules.items()},
        "subnets": space.count(),
        "params_min": subnet_params(smallest, g),
        "params_max": subnet_params(largest, g),
        "smallest": {
            "subnet": str(smallest),
            "params": subnet_params(smallest, g),
            "added_flops": added_flops(smallest, g),
        },
        "largest": {
            "subnet": str(largest),
            "params": subnet_params(largest, g),
            "added_flops": added_flops(largest, g),
        },
        "supernet_params": sum(s.module.params(s.capacity(), g) for s in space.modules.values()),
        "head_params_per_class": space.backbone.head_params(1),
    }
    if space.budget.is_set:
        fit = space.count_in_budget()
        summary["budget"] = {**space.budget.to_data(), "fitting": fit.fitting, "exact": fit.exact}
    return summary


def head_note(per_class: int) -> str:
    if per_class == 0:
        return "no head (a CLIP classifies through its text tower)"
    return f"the head adds {per_class:,} per class"


def print_space(space: SearchSpace) -> None:
    s = space_summary(space)
    b = s["backbone"]
    print(f"search space  {s['name']}" + (f"  ({s['file']})" if s["file"] else ""))
    if space.description:
        print(f"              {space.description}")
    model = b.get("model") or f"CLIP {b.get('clip')}"
    label = f"{b['name']} ({model})" if b.get("name") else model
    if not b.get("name") and b.get("overrides"):
        label += f" {b['overrides']}"
    print(
        f"backbone      {label}: width {b['width']}, {b['depth']} blocks, "
        f"{b['heads']} heads, {b['tokens']} tokens"
    )
    print("modules")
    for kind, module_space in space.modules.items():
        print(f"  {kind:<9} {module_space.summary()}")
    print(f"subnets       {s['subnets']:,}")
    print(
        f"trainable     {s['params_min']:,} to {s['params_max']:,} parameters in the modules; "
        + head_note(s["head_params_per_class"])
    )
    for which in ("smallest", "largest"):
        w = s[which]
        print(
            f"{which:<13} {w['subnet']}  ({w['params']:,} params, +{_fmt_flops(w['added_flops'])})"
        )
    print(f"supernet      allocates {s['supernet_params']:,} module parameters")
    if "budget" in s:
        bud = s["budget"]
        bounds = "; ".join(
            f"{k} {space.budget.params if k == 'params' else space.budget.flops}"
            for k in ("params", "flops")
            if k in bud
        )
        share = _fmt_share(bud["fitting"], s["subnets"])
        how = "" if bud["exact"] else " (estimated from a uniform sample)"
        print(f"budget        {bounds}: {bud['fitting']:,} subnets fit, {share}{how}")
    else:
        print("budget        none")


def cmd_space_show(args: argparse.Namespace) -> int:
    from nas.space.search_space import load_space

    space = load_space(args.space)
    if args.json:
        print(json.dumps(space_summary(space), indent=2))
    else:
        print_space(space)
    return 0


def cmd_space_validate(args: argparse.Namespace) -> int:
    from nas.space.search_space import load_space

    for path in args.files:
        space = load_space(path)
        # A recorded geometry spares describing a space the model; validating checks it (and
        # with it the model's name and overrides) against the model built on ``meta``.
        check = getattr(space.backbone, "check_geometry", None)
        if check is not None:
            check()
        print(f"{path}: ok ({space.name}: {space.count():,} subnets)")
    return 0


def subnet_info(subnet, space: SearchSpace) -> dict:
    """What ``nas subnet show`` (and ``import-noah``) reports about ``subnet`` in ``space``."""
    from nas.space.cost import added_flops, subnet_params

    g = space.geometry
    return {
        "subnet": str(subnet),
        "canonical": subnet.to_data(),
        "in_space": space.contains(subnet),
        # the budget alone: whether the subnet is in the space is said beside it
        "in_budget": space.budget.admits(subnet, g) if space.budget.is_set else None,
        "params": subnet_params(subnet, g),
        "head_params_per_class": space.backbone.head_params(1),
        "added_flops": added_flops(subnet, g),
        "added_flops_merged": added_flops(subnet, g, merged=True),
    }


def print_subnet_info(info: dict, subnet, space: SearchSpace) -> None:
    unknown = [kind for kind in subnet if kind not in space.modules]
    print(f"subnet        {info['subnet']}")
    where = (
        "yes"
        if info["in_space"]
        else "no" + (f" (modules not in the space: {', '.join(unknown)})" if unknown else "")
    )
    print(f"in space      {where}  ({space.name})")
    if info["in_budget"] is not None:
        fits = "yes" if info["in_budget"] else "no"
        limits = [
            f"{name} {bounds}"
            for name, bounds in (("params", space.budget.params), ("FLOPs", space.budget.flops))
            if str(bounds) != "unbounded"
        ]
        print(f"in budget     {fits}  ({', '.join(limits)})")
    print(
        f"trainable     {info['params']:,} module parameters; "
        + head_note(info["head_params_per_class"])
    )
    print(
        f"added FLOPs   {_fmt_flops(info['added_flops'])} per image "
        f"({_fmt_flops(info['added_flops_merged'])} with the mergeable modules merged)"
    )


def cmd_subnet_show(args: argparse.Namespace) -> int:
    from nas.core.errors import NasError
    from nas.space.search_space import load_space
    from nas.space.subnet import Subnet, too_deep

    subnet = Subnet.load(args.subnet)
    space = load_space(args.space)
    deep = too_deep(subnet, space.geometry.depth)
    if deep:  # its costs would count blocks that do not exist
        raise NasError(f"{args.subnet}: not a subnet of --space {args.space}: {deep}")
    info = subnet_info(subnet, space)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_subnet_info(info, subnet, space)
    return 0


def cmd_subnet_import_noah(args: argparse.Namespace) -> int:
    """``nas subnet import-noah FILE``: one of NOAH's released subnet configs, shown as
    ``nas subnet show`` shows a subnet (``--out`` also writes it as this platform's YAML)."""
    from pathlib import Path

    from nas.core.errors import NasError
    from nas.interop.noah_import import import_noah
    from nas.space.search_space import load_space
    from nas.space.subnet import too_deep

    noah = import_noah(args.file)
    space = load_space(args.space)
    deep = too_deep(noah.subnet, space.geometry.depth)
    if deep:
        raise NasError(
            f"{args.file}: not a subnet of --space {args.space}: {deep}; NOAH's subnets are "
            "for ViT-B/16 (--space noah_vtab, the default)"
        )
    info = {**subnet_info(noah.subnet, space), "source": str(noah.source), "model": noah.model}
    if args.out:
        out = Path(args.out)
        text = (
            f"# imported from NOAH's {Path(noah.source).name} by nas subnet import-noah\n"
            + noah.subnet.to_yaml()
        )
        if out.is_dir():
            raise NasError(f"--out {out}: is a folder; expected a file path for the subnet YAML")
        changed = out.is_file() and out.read_text(encoding="utf-8", errors="replace") != text
        if changed and not args.force:
            raise NasError(
                f"--out {out}: already exists with other contents; remove it, choose "
                "another path, or pass --force to overwrite it"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        info["written"] = str(out)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source        {info['source']}" + (f"  ({noah.model})" if noah.model else ""))
    print_subnet_info(info, noah.subnet, space)
    if args.out:
        print(f"written       {info['written']}")
    return 0


def add_subnet_commands(commands) -> None:
    """`nas subnet show` and `nas subnet import-noah`."""
    subnet = commands.add_parser("subnet", help="inspect a subnet written in YAML")
    subnet_cmds = subnet.add_subparsers(dest="subnet_command", required=True, metavar="ACTION")
    sub_show = subnet_cmds.add_parser("show", help="costs of a subnet and whether a space has it")
    sub_show.add_argument("subnet", help="a subnet YAML file")
    sub_show.add_argument(
        "--space",
        default=DEFAULT_SPACE,
        help=f"the search space it belongs to (default: {DEFAULT_SPACE})",
    )
    sub_show.add_argument("--json", action="store_true", help="print as JSON")
    sub_show.set_defaults(func=cmd_subnet_show)
    noah = subnet_cmds.add_parser(
        "import-noah",
        help="read one of NOAH's released subnet configs (its RETRAIN section)",
        description="Read a NOAH subnet config (experiments/NOAH/subnet/*/*.yaml in NOAH's "
        "code) and show it as 'nas subnet show' does; --out writes it as a subnet YAML that "
        "specs (stages.retrain.baselines) and 'nas subnet show' read.",
    )
    noah.add_argument("file", help="a NOAH subnet config (YAML with a RETRAIN section)")
    noah.add_argument("--out", help="also write the subnet here as this platform's YAML")
    noah.add_argument("--force", action="store_true", help="overwrite --out if it differs")
    noah.add_argument(
        "--space", default="noah_vtab", help="the space to check it against (default: noah_vtab)"
    )
    noah.add_argument("--json", action="store_true", help="print as JSON")
    noah.set_defaults(func=cmd_subnet_import_noah)


def add_space_commands(commands) -> None:
    """`nas space show` and `nas space validate`."""
    space = commands.add_parser("space", help="inspect and validate search spaces")
    space_cmds = space.add_subparsers(dest="space_command", required=True, metavar="ACTION")
    show = space_cmds.add_parser("show", help="summarise a search space")
    show.add_argument(
        "space",
        nargs="?",
        default=DEFAULT_SPACE,
        help=f"a YAML file or a shipped space name (default: {DEFAULT_SPACE})",
    )
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=cmd_space_show)
    validate = space_cmds.add_parser("validate", help="check search space files")
    validate.add_argument("files", nargs="+", help="YAML files or shipped space names")
    validate.set_defaults(func=cmd_space_validate)
