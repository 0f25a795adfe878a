"""The dataset formats a spec's ``datasets`` entries may name, behind one interface and a
registry (as timm registers models): what an entry accepts, how its folder must look, how its
splits are read, which split retrains a winner, and the dataset's key and VTAB group. The spec,
the pipeline and the CLI ask the registry; none of them branches on a format's name.

A new format: subclass ``DatasetFormat``, set ``name`` (and what differs from the defaults),
and ``register_format(MyFormat())``; README "Extending" shows one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from nas.core.jsonio import read_json
from nas.core.registry import Registry
from nas.core.validate import Reader
from nas.data.catalog import MINI_VTAB_TASKS, TASK_TARGETS, WITHOUT_DEVTEST, vtab_group
from nas.data.lists import (
    DEVTEST_FILE,
    VTAB_SPLITS,
    Split,
    few_shot_files,
    read_few_shot,
    read_image_folder,
    read_vtab,
)

#: A dataset's variants: (shots, split seed) pairs; (None, None) for a format without them.
Variants = list[tuple[int | None, int | None]]


class DatasetFormat:
    """One dataset format. The defaults describe a folder of split lists read as VTAB-1k's."""

    name: ClassVar[str] = ""
    #: The spec keys an entry of this format may hold beyond name, format, root, duplicates.
    keys: ClassVar[tuple[str, ...]] = ()
    #: False: the data ships with the package and a run prepares it (``root`` optional).
    needs_root: ClassVar[bool] = True
    #: The split a winner (and every baseline) is retrained on before its one test.
    retrain_split: ClassVar[str] = "trainval"
    #: The class folders' names are the class names (no classnames.txt needed for CLIP).
    class_names_from_folders: ClassVar[bool] = False

    def variants(self, r: Reader, entry: dict[str, Any], key: str) -> Variants:
        """The datasets one spec entry stands for (a few-shot entry: every shots x seed)."""
        return [(None, None)]

    def key(self, name: str, shots: int | None, split_seed: int | None) -> str:
        """A name unique within a spec."""
        return name

    def check_name(self, r: Reader, key: str, name: str) -> None:
        """Refuse a name the format cannot hold (a packaged format: one it does not ship)."""

    def check_target(self, r: Reader, key: str, name: str, target: str) -> None:
        """Refuse a target named without a list that the dataset cannot have (a packaged
        format: one its task does not ship); a folder's ``targets/`` is checked on disk."""

    def missing(self, folder: Path, variants: Variants) -> list[str]:
        """The files or folders of the layout that ``folder`` lacks."""
        return [n for n in VTAB_SPLITS.values() if not (folder / n).is_file()]

    def check_test_split(self, r: Reader, key: str, name: str, folder: Path | None) -> None:
        """Refuse ``test_split: devtest`` where the dataset has no development test split
        (``folder``: the dataset's folder, to look in, when the spec's data is checked)."""
        r.fail(key, f"format {self.name} has no development test split (devtest)")

    def read_splits(
        self,
        folder: Path,
        *,
        shots: int | None = None,
        split_seed: int | None = None,
        duplicates: str = "error",
    ) -> dict[str, Split]:
        """The dataset's splits as lists of (image, label) entries, nothing decoded."""
        return read_vtab(folder, duplicates=duplicates)

    def default_root(self, output: Path) -> Path | None:
        """Where a run keeps the dataset when the spec gives no root (packaged formats)."""
        return None

    def splits_to_check(
        self, folder: Path, *, shots: int, split_seed: int, duplicates: str
    ) -> dict[str, Split]:
        """What ``nas data check FOLDER --format NAME`` reads (and then decodes)."""
        return self.read_splits(folder, shots=shots, split_seed=split_seed, duplicates=duplicates)

    def group(self, root: Path, name: str) -> str | None:
        """The VTAB group (natural / specialized / structured), when known."""

        return vtab_group(name)


class VtabFormat(DatasetFormat):
    """VTAB-1k: train800, val200, train800val200 and test lists (VPT's and NOAH's), and an
    optional development test list (devtest.txt)."""

    name = "vtab"

    def check_test_split(self, r: Reader, key: str, name: str, folder: Path | None) -> None:
        if folder is not None and not (folder / DEVTEST_FILE).is_file():
            r.fail(key, f"{folder / DEVTEST_FILE} not found (the development test list)")


class MiniVtabFormat(DatasetFormat):
    """The offline mini-VTAB tasks shipped with the package, prepared by the run under
    ``<output>/data/mini-vtab`` (or read from a ``root`` that ``nas data prepare`` wrote)."""

    name = "mini-vtab"
    needs_root = False

    def check_name(self, r: Reader, key: str, name: str) -> None:

        if name not in MINI_VTAB_TASKS:
            r.fail(key, f"{name!r} is not a mini-VTAB task; known: {', '.join(MINI_VTAB_TASKS)}")

    def check_target(self, r: Reader, key: str, name: str, target: str) -> None:

        shipped = TASK_TARGETS.get(name, ())
        if target not in shipped:
            known = f"it ships {', '.join(shipped)}" if shipped else "it ships none"
            r.fail(
                key,
                f"mini-VTAB task {name!r} ships no target {target!r} ({known}); name your own "
                "as {name: ..., list: FILE, root: FOLDER}",
            )

    def check_test_split(self, r: Reader, key: str, name: str, folder: Path | None) -> None:

        if name in WITHOUT_DEVTEST:
            r.fail(
                key,
                f"mini-VTAB task {name} has no development test split (its source is used up "
                f"by train, val and test); tasks without one: {', '.join(sorted(WITHOUT_DEVTEST))}",
            )

    def default_root(self, output: Path) -> Path:
        return output / "data" / "mini-vtab"

    def group(self, root: Path, name: str) -> str | None:
        entry = manifest_entry(root, name)
        return entry.get("group") if entry else None


class FewShotFormat(DatasetFormat):
    """NOAH's and CoOp's few-shot lists: K shots per class for a split seed, val and test."""

    name = "few-shot"
    keys = ("shots", "split_seed")
    retrain_split = "train"  # the K shots alone; val serves the search only

    def variants(self, r: Reader, entry: dict[str, Any], key: str) -> Variants:
        shots = r.int_choices(entry.get("shots", 16), f"{key}.shots", minimum=1)
        seeds = r.int_choices(entry.get("split_seed", 0), f"{key}.split_seed", minimum=0)
        return [(n, s) for n in shots for s in seeds]

    def key(self, name: str, shots: int | None, split_seed: int | None) -> str:
        return f"{name}-{shots}shot-s{split_seed}"

    def missing(self, folder: Path, variants: Variants) -> list[str]:
        return sorted(
            {
                str(p.relative_to(folder))
                for shots, seed in variants
                for p in few_shot_files(folder, shots or 0, seed or 0).values()
                if not p.is_file()
            }
        )

    def read_splits(
        self,
        folder: Path,
        *,
        shots: int | None = None,
        split_seed: int | None = None,
        duplicates: str = "error",
    ) -> dict[str, Split]:
        if shots is None or split_seed is None:
            raise ValueError("a few-shot dataset needs its shots and split seed")
        return read_few_shot(folder, shots, split_seed, duplicates=duplicates)


class ImageFolderFormat(DatasetFormat):
    """train/, val/ and test/ folders of class folders; val and test take train's classes."""

    name = "imagefolder"
    class_names_from_folders = True

    def splits_to_check(
        self, folder: Path, *, shots: int, split_seed: int, duplicates: str
    ) -> dict[str, Split]:
        """Any folder of class folders, read as one tree (``all``)."""
        return {"all": read_image_folder(folder)}

    def missing(self, folder: Path, variants: Variants) -> list[str]:
        return [f"{n}/" for n in ("train", "val", "test") if not (folder / n).is_dir()]

    def read_splits(
        self,
        folder: Path,
        *,
        shots: int | None = None,
        split_seed: int | None = None,
        duplicates: str = "error",
    ) -> dict[str, Split]:
        """train, val, test and trainval."""
        # val and test take train's classes: a split missing a class keeps every label
        train = read_image_folder(folder / "train")
        splits = {"train": train}
        for name in ("val", "test"):
            splits[name] = read_image_folder(folder / name, train.class_names)
        splits["trainval"] = Split(
            "trainval",
            train.entries + splits["val"].entries,
            train.source,
            train.num_classes,
            train.class_names,
        )
        return splits


FORMATS: Registry[DatasetFormat] = Registry("dataset format")


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    """Add ``fmt`` to the registry under ``fmt.name`` (a name may be registered once)."""
    if not fmt.name or fmt.name in FORMATS:
        raise ValueError(f"dataset format {fmt.name!r}: empty or already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def dataset_format(name: str) -> DatasetFormat:
    return FORMATS[name]


def manifest_entry(root: Path, task: str) -> dict[str, Any] | None:
    """A prepared mini-VTAB task's manifest entry: ``<root>/<task>/manifest.json`` (prepared by
    the pipeline) or the task's part of ``<root>/manifest.json`` (``nas data prepare``)."""
    own, shared = root / task / "manifest.json", root / "manifest.json"
    if own.is_file():
        return read_json(own)
    if shared.is_file():
        return read_json(shared).get("tasks", {}).get(task)
    return None


for _fmt in (MiniVtabFormat(), VtabFormat(), FewShotFormat(), ImageFolderFormat()):
    register_format(_fmt)
