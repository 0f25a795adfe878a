"""Writing few-shot splits (NOAH's annotation layout) for any labelled ImageFolder.

Per class, one fixed permutation (from ``base_seed``) sets aside a test share and
``val_per_class`` validation images; the rest is the pool. For seed S, the pool is permuted
with S and the first K images are the K-shot training set, so the shots of one seed are nested
(the 1-shot image is among the 2-shot ones). val and test are the same for every shot and seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nas.data.lists import CLASSNAMES_FILE, DataError, few_shot_files, read_image_folder


def write_few_shot_splits(
    images: str | Path,
    out: str | Path | None = None,
    *,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (0, 1, 2),
    val_per_class: int = 4,
    test_fraction: float = 0.2,
    base_seed: int = 0,
) -> dict[str, int]:
    """Write ``<out>/annotations/...`` and ``<out>/classnames.txt`` for the ImageFolder at
    ``images`` (default ``out``: the dataset folder holding ``images/``). Paths are written
    relative to ``<out>/images`` when the images live there, else absolute."""
    images = Path(images)
    out = Path(out) if out is not None else images.parent
    split = read_image_folder(images)
    by_class: dict[int, list[Path]] = {}
    for e in split.entries:
        by_class.setdefault(e.label, []).append(e.path)
    if len(by_class) < 2:
        only = split.class_names[next(iter(by_class))] if by_class else "none"
        raise DataError(
            f"{images}: one class folder ({only!r}); few-shot splits are for a classifier of "
            f"at least 2 classes (expected {images}/<class>/<image> for each class)"
        )
    need = max(shots) + val_per_class + 1
    short = {split.class_names[c]: len(v) for c, v in by_class.items() if len(v) < need}
    if short:
        raise DataError(
            f"{images}: classes with fewer than {need} images ({max(shots)} shots + "
            f"{val_per_class} val + at least 1 test): {short}"
        )
    base = out / "images"

    def rel(p: Path) -> str:
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            return str(p.resolve())

    rng = np.random.default_rng(base_seed)
    val, test, pools = [], [], {}
    for label in sorted(by_class):
        paths = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        n_test = max(1, round(test_fraction * len(paths)))
        test += [(p, label) for p in paths[:n_test]]
        val += [(p, label) for p in paths[n_test : n_test + val_per_class]]
        pools[label] = paths[n_test + val_per_class :]
    files = {}
    for seed in seeds:
        order = {
            c: np.random.default_rng([base_seed, seed]).permutation(len(pool))
            for c, pool in pools.items()
        }
        for k in shots:
            if any(len(pool) < k for pool in pools.values()):
                raise DataError(f"{images}: not enough images for {k} shots")
            train = [(pools[c][i], c) for c in sorted(pools) for i in order[c][:k]]
            files[few_shot_files(out, k, seed)["train"]] = train
    files[few_shot_files(out, 1, 0)["val"]] = val
    files[few_shot_files(out, 1, 0)["test"]] = test
    texts = {
        path: "".join(f"{rel(p)} {label}\n" for p, label in rows) for path, rows in files.items()
    }
    for path, text in texts.items():
        if path.is_file() and path.read_text(encoding="utf-8", errors="replace") != text:
            raise DataError(
                f"{path}: already written with other contents (other images, shots or "
                "settings); rewriting it would move images between the splits of the lists "
                "already there. Write into another --out, or remove annotations/ first"
            )
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    (out / CLASSNAMES_FILE).write_text("\n".join(split.class_names or []) + "\n")
    return {"classes": len(by_class), "val": len(val), "test": len(test), "files": len(files)}
