"""A spec's ``datasets``: each dataset's format, root, splits (the retraining split, the tested
one, few-shot settings) and its domain-generalisation targets."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nas.core.validate import Reader
from nas.data.formats import FORMATS, dataset_format

#: A target's name: a results key, an MLflow metric suffix (test_acc/<name>) and a column.
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TargetSpec:
    """A domain-generalisation target: a test set in the source dataset's label space, on
    which a retrained model is tested once, unchanged. ``list`` is a file of "path label"
    lines with images under ``root``; without ``list`` it is the dataset folder's own
    ``targets/<name>.txt`` (images relative to the dataset folder; a packaged task ships its
    targets so)."""

    name: str
    list: str | None = None
    root: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str
    root: str | None = None  # the folder holding <name>/ (mini-vtab: default under output)
    shots: int | None = None  # few-shot only
    split_seed: int | None = None  # few-shot only: which seed's split
    duplicates: str = "error"
    #: domain-generalisation targets, each tested once after retraining (never chosen on)
    targets: tuple[TargetSpec, ...] = ()
    #: the split the retrained models are tested on: "test", or "devtest" (a VTAB-layout
    #: folder's development test split: design decisions are made there, not on test)
    test_split: str = "test"

    @property
    def key(self) -> str:
        """A name unique within a spec (few-shot datasets carry their shots and split)."""
        return dataset_format(self.format).key(self.name, self.shots, self.split_seed)

    @property
    def retrain_split(self) -> str:
        """The split a winner (and every baseline) is retrained on before its one test.

        VTAB-1k retrains on train800val200, as VPT and NOAH do; a few-shot protocol (NOAH,
        CoOp) retrains on the K shots alone, its val list serving the search only; an
        ImageFolder retrains on train and val, as VTAB does."""
        return dataset_format(self.format).retrain_split

    def to_data(self) -> dict[str, Any]:
        data = asdict(self)
        if self.retrain_split != "trainval":  # kept out otherwise: earlier hashes stay valid
            data["retrain_split"] = self.retrain_split
        if not self.targets:  # kept out otherwise: earlier hashes stay valid
            del data["targets"]
        if self.test_split == "test":  # likewise
            del data["test_split"]
        return data


def parse_datasets(r: Reader, value: Any, base: Path, check_data: bool) -> list[DatasetSpec]:
    """``datasets``: each entry's format, name and folder (checked on disk with
    ``check_data``); a few-shot entry with several shots or split seeds is one dataset each."""
    if not isinstance(value, list) or not value:
        r.fail("datasets", "expected a non-empty list of datasets")
    datasets = []
    for i, item in enumerate(value):
        k = f"datasets[{i}]"
        keys = sorted({key for f in FORMATS.values() for key in f.keys})
        d = r.mapping(
            item,
            k,
            required=["name", "format"],
            optional=["root", *keys, "duplicates", "targets", "test_split"],
        )
        fmt = r.string(d["format"], f"{k}.format", choices=list(FORMATS))
        form = dataset_format(fmt)
        ds_name = r.string(d["name"], f"{k}.name")
        root = None
        if "root" in d:
            root_path = Path(r.string(d["root"], f"{k}.root")).expanduser()
            root = str(root_path if root_path.is_absolute() else (base / root_path).resolve())
        elif form.needs_root:
            r.fail(k, f"missing required key 'root' (the folder holding the {fmt} dataset)")
        duplicates = r.string(
            d.get("duplicates", "error"), f"{k}.duplicates", choices=["error", "drop"]
        )
        test_split = _test_split(r, d.get("test_split", "test"), k, fmt, ds_name, root, check_data)
        # A few-shot entry may list several shots and split seeds: one dataset per pair.
        variants = form.variants(r, d, k)
        form.check_name(r, f"{k}.name", ds_name)
        targets = _parse_targets(r, d.get("targets"), f"{k}.targets", base)
        for i_t, t in enumerate(targets):
            if t.list is None:
                form.check_target(r, f"{k}.targets[{i_t}]", ds_name, t.name)
        if form.needs_root and check_data:
            folder = Path(root) / ds_name
            if not folder.is_dir():
                r.fail(f"{k}.root", f"dataset folder not found: {folder}")
            missing = form.missing(folder, variants)
            if missing:  # the files it reads (their contents are checked before a trial)
                r.fail(f"{k}.root", f"{folder} lacks {', '.join(missing)} (the {fmt} layout)")
            for i_t, t in enumerate(targets):
                listed = folder / "targets" / f"{t.name}.txt"
                if t.list is None and not listed.is_file():
                    r.fail(f"{k}.targets[{i_t}]", f"target list not found: {listed}")
        for i_t, t in enumerate(targets if check_data else ()):
            if t.list is not None and not Path(t.list).is_file():
                r.fail(f"{k}.targets[{i_t}].list", f"target list not found: {t.list}")
            if t.root is not None and not Path(t.root).is_dir():
                r.fail(f"{k}.targets[{i_t}].root", f"image folder not found: {t.root}")
        for shots_k, split_seed in variants:
            ds = DatasetSpec(
                name=ds_name,
                format=fmt,
                root=root,
                shots=shots_k,
                split_seed=split_seed,
                duplicates=duplicates,
                targets=targets,
                test_split=test_split,
            )
            if any(o.key == ds.key for o in datasets):
                r.fail(f"{k}.name", f"dataset {ds.key!r} is listed twice")
            datasets.append(ds)

    return datasets


def _test_split(
    r: Reader, value: Any, k: str, fmt: str, name: str, root: str | None, check_data: bool
) -> str:
    """``test_split``: ``test`` (the default), or ``devtest``: a development test split
    (design decisions are made on it; the reported test is touched once per table), which a
    VTAB-layout folder may hold and a mini-VTAB task has where its source allows."""
    split = r.string(value, f"{k}.test_split", choices=["test", "devtest"])
    if split != "test":
        folder = Path(root) / name if root and check_data else None
        dataset_format(fmt).check_test_split(r, f"{k}.test_split", name, folder)
    return split


def _parse_targets(r: Reader, value: Any, key: str, base: Path) -> tuple[TargetSpec, ...]:
    """``targets``: each a name (the dataset folder's ``targets/<name>.txt``, or a target a
    packaged task ships) or ``{name, list, root}`` (a list file of "path label" lines in the
    source's label space; images under ``root``, by default the list's folder)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        r.fail(key, "expected a non-empty list of targets (names or {name, list, root})")
    out: list[TargetSpec] = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if isinstance(item, str):
            name, listed, root = item, None, None
        else:
            t = r.mapping(item, k, required=["name", "list"], optional=["root"])
            name = r.string(t["name"], f"{k}.name")
            listed = str(_spec_path(r.string(t["list"], f"{k}.list"), base))
            root = str(_spec_path(r.string(t["root"], f"{k}.root"), base)) if "root" in t else None
            root = root or str(Path(listed).parent)
        if not TARGET_NAME.fullmatch(name) or len(name) > 100:
            r.fail(
                k,
                f"target name {name!r}: expected up to 100 letters, digits, '_', '.', '-' (it "
                "names a results column and the MLflow metric test_acc/<name>)",
            )
        if any(o.name == name for o in out):
            r.fail(k, f"target {name!r} is listed twice")
        out.append(TargetSpec(name, listed, root))
    return tuple(out)


def _spec_path(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path).resolve()
