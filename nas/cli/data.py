"""`nas data prepare | few-shot | check`: writing the offline benchmark and few-shot splits,
reading and decoding every image of a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from nas.cli.args import at_least, folder_out, fraction
from nas.core.errors import NasError
from nas.data.formats import FORMATS


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from nas.data.mini_vtab import DEFAULT_TASKS, prepare

    if args.benchmark != "mini-vtab":
        raise NasError(f"unknown benchmark {args.benchmark!r}; available: mini-vtab")
    tasks = list(args.tasks or DEFAULT_TASKS)
    if args.with_elpv and "elpv" not in tasks:
        tasks.append("elpv")
        print("note: ELPV's data licence is CC BY-NC-SA 4.0 (non-commercial use only)")
    folder_out(args.out)
    prepare(args.out, tasks, seed=args.seed, test_size=args.test_size)
    print(f"wrote {len(tasks)} tasks to {args.out} (manifest: {args.out}/manifest.json)")
    return 0


def cmd_data_few_shot(args: argparse.Namespace) -> int:
    from nas.data.fewshot import write_few_shot_splits

    if args.out is not None:
        folder_out(args.out)
    info = write_few_shot_splits(
        args.images,
        args.out,
        shots=args.shots,
        seeds=args.seeds,
        val_per_class=args.val_per_class,
        test_fraction=args.test_fraction,
    )
    print(
        f"wrote {info['files']} list files: {info['classes']} classes, "
        f"{info['val']} val and {info['test']} test images"
    )
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from nas.data.decode import decode_split
    from nas.data.formats import dataset_format

    dup = "drop" if args.drop_duplicates else "error"
    splits = dataset_format(args.format).splits_to_check(
        Path(args.folder), shots=args.shots, split_seed=args.seed, duplicates=dup
    )
    for name, split in splits.items():
        decode_split(split, 32, 3)  # every image must decode
        print(f"{name:<9} {len(split):>6} images, {split.num_classes} classes  ({split.source})")
    listed = Path(args.folder) / "targets"
    source = splits.get("test") or next(iter(splits.values()))
    if listed.is_dir():  # domain-generalisation targets (a spec's targets without a list)
        from nas.data.lists import read_target
        from nas.pipeline.preflight import check_targets

        for path in sorted(listed.glob("*.txt")):
            target = read_target(path, Path(args.folder), path.stem, source.num_classes,
                                 source.class_names, duplicates=dup)  # fmt: skip
            check_targets(Path(args.folder).name, splits, {path.stem: target})
            decode_split(target, 32, 3)
            classes = len({e.label for e in target.entries})
            print(f"target {path.stem:<12} {len(target):>6} images, {classes} of the "
                  f"{source.num_classes} classes  ({path})")  # fmt: skip
    return 0


def add_data_commands(commands) -> None:
    """`nas data prepare`, `nas data few-shot`, `nas data check`."""
    data = commands.add_parser("data", help="prepare and check datasets")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_cmds.add_parser("prepare", help="write the offline mini-VTAB benchmark")
    prep.add_argument("benchmark", help="mini-vtab")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--tasks", nargs="+", help="a subset of the tasks (default: all but elpv)")
    prep.add_argument(
        "--with-elpv",
        action="store_true",
        help="add the ELPV solar-cell task (licence CC BY-NC-SA: non-commercial)",
    )
    prep.add_argument("--seed", type=at_least(0), default=0)
    prep.add_argument(
        "--test-size", type=at_least(1), default=2000, help="largest test split per task"
    )
    prep.set_defaults(func=cmd_data_prepare)
    few = data_cmds.add_parser("few-shot", help="write few-shot splits for an ImageFolder")
    few.add_argument("images", help="an ImageFolder: IMAGES/<class>/<image>")
    few.add_argument(
        "--out",
        help="the dataset folder to write annotations/ into (default: the parent of IMAGES)",
    )
    few.add_argument("--shots", type=at_least(1), nargs="+", default=[1, 2, 4, 8, 16])
    few.add_argument("--seeds", type=at_least(0), nargs="+", default=[0, 1, 2])
    few.add_argument("--val-per-class", type=at_least(1), default=4)
    few.add_argument("--test-fraction", type=fraction, default=0.2)
    few.set_defaults(func=cmd_data_few_shot)
    check = data_cmds.add_parser("check", help="read and decode every image of a dataset")
    check.add_argument("folder")
    check.add_argument("--format", choices=sorted(FORMATS), default="vtab")
    check.add_argument("--shots", type=at_least(1), default=16)
    check.add_argument("--seed", type=at_least(0), default=0)
    check.add_argument(
        "--drop-duplicates",
        action="store_true",
        help="read lists that repeat entries (NOAH's released few-shot lists)",
    )
    check.set_defaults(func=cmd_data_check)
