"""Reading the dataset layouts users have: VTAB-1k lists, few-shot annotation lists, and plain
ImageFolder trees. Every problem is one ``DataError`` naming the file and line.

VTAB-1k (VPT/NOAH layout)::

    <root>/<dataset>/train800.txt  val200.txt  train800val200.txt  test.txt
    <root>/<dataset>/images/...    # each list line: "relative/image/path label"

Paths are relative to the dataset folder (also accepted: relative to <root>, or absolute).
Lines are split at the last space, so image paths may contain spaces.

Few-shot (NOAH layout)::

    <root>/<dataset>/annotations/train_meta.list.num_shot_{K}.seed_{S}
    <root>/<dataset>/annotations/val_meta.list  test_meta.list
    <root>/<dataset>/images/...    # paths relative to images/ (or to the dataset folder)

ImageFolder: ``<folder>/<class name>/<image>``, classes in sorted order.

A dataset folder may hold ``classnames.txt`` (one class name per line, in label order); it fixes
the number of classes, so that out-of-range labels are caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nas.core.errors import NasError
from nas.data.catalog import NUM_CLASSES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
VTAB_SPLITS = {
    "train": "train800.txt",
    "val": "val200.txt",
    "trainval": "train800val200.txt",
    "test": "test.txt",
}
CLASSNAMES_FILE = "classnames.txt"
#: An optional fifth list of a VTAB-layout folder: the development test split (mini-VTAB's,
#: for design decisions; ``datasets[].test_split: devtest`` tests on it instead of test).
DEVTEST_FILE = "devtest.txt"


class DataError(NasError):
    """Bad dataset input: a missing or malformed list file, a missing or corrupt image."""


@dataclass(frozen=True)
class Entry:
    path: Path
    label: int
    source: str  # "file:line", for error messages


@dataclass
class Split:
    """The images and labels of one split, with where they were listed."""

    name: str
    entries: list[Entry]
    source: str
    num_classes: int
    class_names: list[str] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.entries]


def read_class_names(folder: Path) -> list[str] | None:
    path = folder / CLASSNAMES_FILE
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    if not names or any(not n for n in names):
        raise DataError(f"{path}: expected one non-empty class name per line")
    return names


def parse_list_file(
    path: Path, bases: Sequence[Path], *, duplicates: str = "error"
) -> list[tuple[Path, int, str]]:
    """(image path, label, "file:line") for each line of a list file.

    Image paths are resolved against ``bases`` in order; the first base under which the first
    entry exists is used for the whole file (so one missing image is reported, not guessed)."""
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read list file ({exc})") from None
    rows: list[tuple[str, int, int]] = []
    seen: dict[str, tuple[int, int]] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)  # image paths may contain spaces, labels do not
        if len(parts) != 2:
            raise DataError(f"{path}:{number}: expected 'image/path label', got {line!r}")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{path}:{number}: label {label_text!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{path}:{number}: label {label} is negative")
        if rel in seen:
            first_line, first_label = seen[rel]
            if first_label != label:
                raise DataError(
                    f"{path}:{number}: {rel} is listed again with label {label} "
                    f"(line {first_line} gives {first_label})"
                )
            if duplicates == "error":
                raise DataError(
                    f"{path}:{number}: duplicate entry {rel} (also on line {first_line}); "
                    "NOAH's released few-shot lists repeat every entry: set 'duplicates: drop' "
                    "in the dataset spec to read such files"
                )
            continue
        seen[rel] = (number, label)
        rows.append((rel, label, number))
    if not rows:
        raise DataError(f"{path}: the split is empty (no 'image label' lines)")

    first = rows[0][0]
    base = next((b for b in bases if (b / first).is_file()), None)
    if base is None:
        tried = ", ".join(str(b / first) for b in bases)
        raise DataError(f"{path}:{rows[0][2]}: image not found (tried {tried})")
    out = []
    for rel, label, number in rows:
        image = base / rel
        if not image.is_file():
            raise DataError(f"{path}:{number}: image not found: {image}")
        out.append((image, label, f"{path}:{number}"))
    return out


def _make_split(
    name: str,
    rows: list[tuple[Path, int, str]],
    source: str,
    num_classes: int | None,
    class_names: list[str] | None,
) -> Split:
    entries = [Entry(p, label, src) for p, label, src in rows]
    if num_classes is not None:
        for e in entries:
            if e.label >= num_classes:
                raise DataError(
                    f"{e.source}: label {e.label} is out of range for {num_classes} classes"
                )
    return Split(name, entries, source, num_classes or 0, class_names)


def read_target(
    path: str | Path,
    root: str | Path,
    name: str,
    num_classes: int,
    class_names: list[str] | None = None,
    *,
    duplicates: str = "error",
) -> Split:
    """A domain-generalisation target: a list file of "path label" lines (images under
    ``root``, or its parent folder) whose labels are the source dataset's (``num_classes``);
    the split is named ``target/<name>``."""
    path, root = Path(path), Path(root)
    rows = parse_list_file(path, [root, root.parent], duplicates=duplicates)
    for _, label, src in rows:
        if label >= num_classes:
            raise DataError(
                f"{src}: label {label} is out of range for the source dataset's {num_classes} "
                "classes (a target's labels must be the source's: the same class, the same "
                "number)"
            )
    return Split(f"target/{name}", [Entry(*row) for row in rows], str(path), num_classes,
                 class_names)  # fmt: skip


def _num_classes(folder: Path, class_names: list[str] | None) -> int | None:
    if class_names is not None:
        return len(class_names)
    return NUM_CLASSES.get(folder.name)


def _spans(labels: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    out: list[str] = []
    for label in sorted(labels):
        if out and out[-1].split("-")[-1] == str(label - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{label}"
        else:
            out.append(str(label))
    return ", ".join(out[:8]) + (", ..." if len(out) > 8 else "")


def _finish(splits: dict[str, Split], folder: Path) -> dict[str, Split]:
    """Without a known class count, it is one more than the largest label anywhere; then the
    labels must be 0..count-1 with none unused, and every test label must be one that the
    training lists use: a mistyped label would otherwise add classes without a word. (With a
    known class count, a test class no training list holds is the dataset's own: VTAB-1k's
    1,000 training images miss some of SUN397's 397 classes.)"""
    if any(s.num_classes == 0 for s in splits.values()):
        entries = [e for s in splits.values() for e in s.entries]
        count = 1 + max(e.label for e in entries)
        used = {e.label for e in entries}
        if len(used) < count:
            top = max(entries, key=lambda e: e.label)
            # listed only where that is a short list (a label of 10**12 leaves 10**12 gaps)
            unused = (
                _spans(sorted(set(range(count)) - used))
                if count - len(used) <= 100_000
                else f"{count - len(used):,} of 0..{count - 1}"
            )
            raise DataError(
                f"{folder}: labels {unused} are never used, yet labels go up to "
                f"{count - 1} ({top.source}): a mistyped label? If the dataset has {count} "
                f"classes, say so with {CLASSNAMES_FILE} (one name per line)"
            )
        for s in splits.values():
            s.num_classes = count
        if "test" not in splits:
            return splits
        seen = {e.label for name, s in splits.items() if name != "test" for e in s.entries}
        for e in splits["test"].entries:
            if e.label not in seen:
                raise DataError(
                    f"{e.source}: label {e.label} appears in no training or validation "
                    f"list: a mistyped label? (the class count is taken from the labels; "
                    f"{CLASSNAMES_FILE} would fix it)"
                )
    return splits


def read_vtab(folder: str | Path, *, duplicates: str = "error") -> dict[str, Split]:
    """The four VTAB-1k splits of one dataset folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: VTAB-1k dataset folder not found")
    class_names = read_class_names(folder)
    num_classes = _num_classes(folder, class_names)
    bases = [folder, folder.parent]
    splits = {}
    for split, filename in VTAB_SPLITS.items():
        path = folder / filename
        rows = parse_list_file(path, bases, duplicates=duplicates)
        splits[split] = _make_split(split, rows, str(path), num_classes, class_names)
    if (folder / DEVTEST_FILE).is_file():
        path = folder / DEVTEST_FILE
        rows = parse_list_file(path, bases, duplicates=duplicates)
        splits["devtest"] = _make_split("devtest", rows, str(path), num_classes, class_names)
    _check_union(splits, folder)
    return _finish(splits, folder)


def _check_union(splits: dict[str, Split], folder: Path) -> None:
    """VTAB-1k's train800val200.txt is train800.txt and val200.txt together: the retraining
    trains on it, so anything else would retrain on other images than were searched on."""
    union = {(e.path, e.label) for name in ("train", "val") for e in splits[name].entries}
    both = {(e.path, e.label) for e in splits["trainval"].entries}
    if union != both:
        extra = next(
            (e for e in splits["trainval"].entries if (e.path, e.label) not in union), None
        )
        missing = len(union - both)
        where = f"first extra line: {extra.source}; " if extra else ""
        raise DataError(
            f"{folder / VTAB_SPLITS['trainval']}: is not {VTAB_SPLITS['train']} and "
            f"{VTAB_SPLITS['val']} together ({where}{len(both - union)} lines not in them, "
            f"{missing} of theirs missing); write it as their concatenation"
        )


def few_shot_files(folder: Path, shots: int, seed: int) -> dict[str, Path]:
    ann = folder / "annotations"
    return {
        "train": ann / f"train_meta.list.num_shot_{shots}.seed_{seed}",
        "val": ann / "val_meta.list",
        "test": ann / "test_meta.list",
    }


def read_few_shot(
    folder: str | Path, shots: int, seed: int, *, duplicates: str = "error"
) -> dict[str, Split]:
    """The train (K shots, seed S), val and test splits of a few-shot dataset folder.
    ``trainval`` is train plus val, as in VTAB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: few-shot dataset folder not found")
    class_names = read_class_names(folder)
    num_classes = _num_classes(folder, class_names)
    bases = [folder / "images", folder, folder / "train"]
    splits = {}
    for split, path in few_shot_files(folder, shots, seed).items():
        if split == "train" and not path.is_file():
            present = sorted(p.name for p in (folder / "annotations").glob("train_meta.list.*"))
            hint = f"; present: {', '.join(present)}" if present else ""
            raise DataError(f"{path}: list file not found (shots={shots}, seed={seed}){hint}")
        rows = parse_list_file(path, bases, duplicates=duplicates)
        splits[split] = _make_split(split, rows, str(path), num_classes, class_names)
    splits["trainval"] = Split(
        "trainval",
        splits["train"].entries + splits["val"].entries,
        f"{splits['train'].source} + {splits['val'].source}",
        splits["train"].num_classes,
        class_names,
    )
    return _finish(splits, folder)


def read_image_folder(folder: str | Path, class_names: list[str] | None = None) -> Split:
    """Every image below ``folder/<class>/``; labels follow ``class_names`` (default: the
    sorted class folder names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    names = class_names or classes
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise DataError(f"{folder}: class folders not among the class names: {unknown}")
    entries = []
    for label, name in enumerate(names):
        sub = folder / name
        if not sub.is_dir():
            continue
        for image in sorted(sub.rglob("*")):
            if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                entries.append(Entry(image, label, str(image)))
    if not entries:
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise DataError(f"{folder}: the split is empty (no images with {kinds})")
    return Split(folder.name, entries, str(folder), len(names), list(names))
