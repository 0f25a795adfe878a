"""Datasets: the mini-VTAB benchmark through the VTAB-1k reader, few-shot splits, every bad
input's error, and the decode-once loader."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas.data.decode import decode_split
from nas.data.fewshot import write_few_shot_splits
from nas.data.hashing import image_fingerprints
from nas.data.lists import (
    CLASSNAMES_FILE,
    DataError,
    read_few_shot,
    read_image_folder,
    read_vtab,
)
from nas.data.loader import TensorLoader
from nas.data.mini_vtab import DEFAULT_TASKS, PRETRAIN_FINGERPRINTS, prepare


@pytest.fixture(scope="session")
def mini_vtab(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mini_vtab")
    prepare(out, DEFAULT_TASKS, seed=0, test_size=300, log=lambda *_: None)
    return out


def test_mini_vtab_loads_through_the_vtab_reader(mini_vtab):
    manifest = json.loads((mini_vtab / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(DEFAULT_TASKS)
    assert "elpv" not in manifest["tasks"]  # non-commercial licence: only when asked for
    for task, info in manifest["tasks"].items():
        splits = read_vtab(mini_vtab / task)
        assert [len(splits[s]) for s in ("train", "val", "trainval")] == [800, 200, 1000]
        assert 0 < len(splits["test"]) <= 300
        for name, split in splits.items():
            decoded = decode_split(split, 28, 1)
            assert decoded.images.shape[1:] == (1, 28, 28)
            per_class = np.bincount(split.labels, minlength=info["num_classes"]).tolist()
            assert per_class == info["splits"][name]["per_class"]
            assert decoded.content_hash() == info["splits"][name]["sha256"]
            assert split.num_classes == info["num_classes"] == len(split.class_names)


def test_no_image_in_two_splits_or_in_pretraining(mini_vtab):
    pretrain = np.load(PRETRAIN_FINGERPRINTS)
    for task in DEFAULT_TASKS:
        splits = read_vtab(mini_vtab / task)
        prints = {
            s: set(image_fingerprints(decode_split(splits[s], 28, 1).images[:, 0].numpy()).tolist())
            for s in ("train", "val", "test")
        }
        assert not prints["train"] & prints["val"], task
        assert not prints["train"] & prints["test"], task
        assert not prints["val"] & prints["test"], task
        every = np.fromiter(set().union(*prints.values()), dtype=np.uint64)
        assert not np.isin(every, pretrain).any(), task


def test_textures_splits_come_from_disjoint_rows():
    from nas.data.mini_vtab import TEXTURE_ROWS

    bands = sorted(TEXTURE_ROWS.values())
    assert bands[0][0] == 0.0 and bands[-1][1] == 1.0
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(bands))


def test_prepare_is_deterministic(tmp_path):
    a = prepare(
        tmp_path / "a", ("digits", "clevr_count"), seed=3, test_size=50, log=lambda *_: None
    )
    b = prepare(
        tmp_path / "b", ("digits", "clevr_count"), seed=3, test_size=50, log=lambda *_: None
    )
    c = prepare(tmp_path / "c", ("clevr_count",), seed=4, test_size=50, log=lambda *_: None)
    assert a["tasks"] == b["tasks"]
    assert c["tasks"]["clevr_count"] != a["tasks"]["clevr_count"]
    # a task prepared alone (as a run prepares it) equals the same task prepared with others
    d = prepare(tmp_path / "d", ("clevr_count",), seed=3, test_size=50, log=lambda *_: None)
    assert d["tasks"]["clevr_count"] == a["tasks"]["clevr_count"]


# -- bad input -----------------------------------------------------------------------------


@pytest.fixture
def vtab_copy(mini_vtab, tmp_path) -> Path:
    folder = tmp_path / "digits"
    shutil.copytree(mini_vtab / "digits", folder)
    return folder


def _edit(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


BAD_LISTS = {
    "missing-list": (lambda f: (f / "val200.txt").unlink(), r"val200\.txt: list file not found"),
    "missing-image": (
        lambda f: (f / "images/train/00003.png").unlink(),
        r"train800\.txt:4: image not found: .*00003\.png",
    ),
    "non-integer-label": (
        lambda f: _edit(
            f / "test.txt", lambda ls: [*ls[:2], ls[2].rsplit(" ", 1)[0] + " seven", *ls[3:]]
        ),
        r"test\.txt:3: label 'seven' is not an integer",
    ),
    "negative-label": (
        lambda f: _edit(f / "val200.txt", lambda ls: [ls[0].rsplit(" ", 1)[0] + " -1", *ls[1:]]),
        r"val200\.txt:1: label -1 is negative",
    ),
    "out-of-range-label": (
        lambda f: _edit(
            f / "train800.txt", lambda ls: [*ls[:4], ls[4].rsplit(" ", 1)[0] + " 10", *ls[5:]]
        ),
        r"train800\.txt:5: label 10 is out of range for 10 classes",
    ),
    "empty-split": (lambda f: (f / "test.txt").write_text("\n"), r"test\.txt: the split is empty"),
    "duplicate": (
        lambda f: _edit(f / "train800.txt", lambda ls: [*ls, ls[0]]),
        r"train800\.txt:801: duplicate entry images/train/00000\.png \(also on line 1\)",
    ),
    "conflicting-duplicate": (
        lambda f: _edit(f / "train800.txt", lambda ls: [*ls, ls[0].rsplit(" ", 1)[0] + " 9"]),
        r"train800\.txt:801: images/train/00000\.png is listed again with label 9 \(line 1 gives \d\)",
    ),
    "huge-label": (  # 10**12 classes would be a MemoryError, not a message
        lambda f: (
            (f / CLASSNAMES_FILE).unlink(missing_ok=True),
            _edit(
                f / "test.txt",
                lambda ls: [*ls[:4], ls[4].rsplit(" ", 1)[0] + " 1000000000000", *ls[5:]],
            ),
        ),
        r"labels 999,999,999,990 of 0\.\.1000000000000 are never used, yet labels go up to "
        r"1000000000000 \(.*test\.txt:5\): a mistyped label\?",
    ),
    "malformed-line": (
        lambda f: _edit(f / "val200.txt", lambda ls: ["just-a-path.png", *ls]),
        r"val200\.txt:1: expected 'image/path label'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LISTS))
def test_bad_vtab_input_gives_one_clear_error(case, vtab_copy):
    break_it, message = BAD_LISTS[case]
    break_it(vtab_copy)
    with pytest.raises(DataError) as info:
        read_vtab(vtab_copy)
    assert re.search(message, str(info.value)), str(info.value)
    assert str(vtab_copy) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", b"not an image at all"])
def test_corrupt_image_is_an_error_not_a_blank_tensor(vtab_copy, content):
    (vtab_copy / "images/val/00007.png").write_bytes(content)
    splits = read_vtab(vtab_copy)  # listing is fine; decoding must fail loudly
    with pytest.raises(DataError, match=r"val200\.txt:8: cannot decode image .*00007\.png"):
        decode_split(splits["val"], 28, 1)


def test_a_decompression_bomb_is_refused_in_one_line(vtab_copy):
    """A PNG of a few bytes whose header claims 20,000 x 20,000 pixels (what it would take
    to decode): refused when opened, never decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 1, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    (vtab_copy / "images/val/00007.png").write_bytes(bomb)
    with pytest.raises(DataError, match=r"val200\.txt:8: refused image .*00007\.png: .*pixels"):
        decode_split(read_vtab(vtab_copy)["val"], 28, 1)


def test_list_files_saved_with_a_byte_order_mark_are_read(vtab_copy):
    """Editors on Windows write UTF-8 with a BOM: read as UTF-8-sig, not as a path that starts
    with an invisible character."""
    listed = vtab_copy / "val200.txt"
    plain = read_vtab(vtab_copy)["val"]
    listed.write_bytes(b"\xef\xbb\xbf" + listed.read_bytes())
    assert read_vtab(vtab_copy)["val"].entries == plain.entries


def test_truncated_image_is_an_error(vtab_copy):
    path = vtab_copy / "images/test/00000.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"test\.txt:1: cannot decode image"):
        decode_split(read_vtab(vtab_copy)["test"], 28, 1)


def test_paths_with_spaces_and_relative_to_root(vtab_copy):
    (vtab_copy / "images/train/00000.png").rename(vtab_copy / "images/train/my image.png")
    _edit(
        vtab_copy / "train800.txt",
        lambda ls: ["images/train/my image.png " + ls[0].split()[-1], *ls[1:]],
    )
    _edit(
        vtab_copy / "train800val200.txt",
        lambda ls: ["images/train/my image.png " + ls[0].split()[-1], *ls[1:]],
    )
    assert read_vtab(vtab_copy)["train"].entries[0].path.name == "my image.png"
    # Lists whose paths start with the dataset folder's name (relative to the root) work too.
    _edit(vtab_copy / "val200.txt", lambda ls: [f"{vtab_copy.name}/{line}" for line in ls])
    assert len(read_vtab(vtab_copy)["val"]) == 200


# -- few-shot and ImageFolder ----------------------------------------------------------------


@pytest.fixture
def image_folder(mini_vtab, tmp_path) -> Path:
    """An ImageFolder of 10 digit classes (30 images each) under <dataset>/images/."""
    root = tmp_path / "digits_fs" / "images"
    split = read_vtab(mini_vtab / "digits")["trainval"]
    counts: dict[int, int] = {}
    for e in split.entries:
        if counts.get(e.label, 0) >= 30:
            continue
        counts[e.label] = counts.get(e.label, 0) + 1
        (root / f"class {e.label}").mkdir(parents=True, exist_ok=True)
        shutil.copy(e.path, root / f"class {e.label}" / e.path.name)
    return root


def test_few_shot_splits_round_trip(image_folder):
    info = write_few_shot_splits(image_folder, shots=(1, 2, 4, 8), seeds=(0, 1, 2))
    assert info == {"classes": 10, "val": 40, "test": 60, "files": 14}
    dataset = image_folder.parent
    seen = {}
    for seed in (0, 1, 2):
        previous: set = set()
        for k in (1, 2, 4, 8):
            splits = read_few_shot(dataset, k, seed)
            train = {e.path for e in splits["train"].entries}
            assert np.bincount(splits["train"].labels).tolist() == [k] * 10
            assert previous <= train  # shots of one seed are nested
            previous = train
            held_out = {e.path for s in ("val", "test") for e in splits[s].entries}
            assert not train & held_out
            assert len(splits["trainval"]) == 10 * k + 40
        seen[seed] = previous
    assert seen[0] != seen[1]  # seeds differ
    # Deterministic: writing again gives identical files.
    before = {p.name: p.read_text() for p in (dataset / "annotations").iterdir()}
    write_few_shot_splits(image_folder, shots=(1, 2, 4, 8), seeds=(0, 1, 2))
    assert before == {p.name: p.read_text() for p in (dataset / "annotations").iterdir()}
    assert read_few_shot(dataset, 1, 0)["train"].class_names[0] == "class 0"


def test_noah_style_repeated_lists(image_folder):
    write_few_shot_splits(image_folder, shots=(1,), seeds=(0,))
    path = image_folder.parent / "annotations" / "train_meta.list.num_shot_1.seed_0"
    _edit(path, lambda ls: [line for line in ls for _ in range(2)])  # NOAH repeats every line
    with pytest.raises(DataError, match="set 'duplicates: drop'"):
        read_few_shot(image_folder.parent, 1, 0)
    assert len(read_few_shot(image_folder.parent, 1, 0, duplicates="drop")["train"]) == 10
    with pytest.raises(DataError, match=r"num_shot_16\.seed_0: list file not found .*present: "):
        read_few_shot(image_folder.parent, 16, 0)


def test_too_few_images_for_the_shots(image_folder):
    with pytest.raises(DataError, match="classes with fewer than 37 images"):
        write_few_shot_splits(image_folder, shots=(32,))


def test_few_shot_splits_of_one_class_are_refused(image_folder):
    for extra in sorted(p for p in image_folder.iterdir() if p.is_dir())[1:]:
        shutil.rmtree(extra)
    with pytest.raises(DataError, match=r"one class folder \('.*'\); few-shot splits are for"):
        write_few_shot_splits(image_folder, shots=(1,))


def test_image_folder(image_folder):
    split = read_image_folder(image_folder)
    assert len(split) == 300 and split.num_classes == 10
    assert split.class_names == [f"class {i}" for i in range(10)]
    with pytest.raises(DataError, match="no class folders"):
        read_image_folder(image_folder / "class 0")


# -- decode once, batches as tensor ops -------------------------------------------------------


def test_decode_cache_round_trip(vtab_copy, tmp_path):
    split = read_vtab(vtab_copy)["val"]
    first = decode_split(split, 28, 1, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    second = decode_split(split, 28, 1, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images)
    # Another resolution or channel count is another cache entry; RGB repeats the grey level.
    rgb = decode_split(split, 32, 3, cache_dir=tmp_path / "cache")
    assert rgb.images.shape == (200, 3, 32, 32)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 1])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    # Changing an image invalidates the entry.
    img = Image.open(split.entries[0].path)
    Image.fromarray(255 - np.asarray(img)).save(split.entries[0].path)
    third = decode_split(read_vtab(vtab_copy)["val"], 28, 1, cache_dir=tmp_path / "cache")
    assert not torch.equal(third.images[0], first.images[0])


def test_tensor_loader(vtab_copy):
    split = decode_split(read_vtab(vtab_copy)["train"], 28, 1)
    loader = TensorLoader(split, 64, [0.5], [0.25], shuffle=True, seed=1, crop_pad=2, hflip=True)
    assert len(loader) == 13
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 800
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(split.labels.tolist())
    x, _ = batches[0]
    assert x.dtype == torch.float32 and x.shape == (64, 1, 28, 28)
    plain = TensorLoader(split, 800, [0.5], [0.25])
    x, y = next(iter(plain))
    assert torch.allclose(x, (split.images.float() / 255 - 0.5) / 0.25)
    assert torch.equal(y, split.labels)
    # The order of an epoch is reproducible (for resume): set_epoch restores it.
    loader.set_epoch(5)
    a = [y for _, y in loader]
    loader.set_epoch(5)
    assert all(torch.equal(p, q) for p, q in zip(a, [y for _, y in loader], strict=True))
