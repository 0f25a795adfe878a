"""Domain generalisation (issue 23): targets in specs, the mini targets shipped with mnist5k,
the scoring over all classes and over a target's own, and a real run through Ray and MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nas.core.errors import ConfigError
from nas.data.decode import decode_split
from nas.data.hashing import image_fingerprints
from nas.data.lists import DataError, read_target, read_vtab
from nas.data.loader import TensorLoader
from nas.data.mini_dg import SKETCH_CLASSES, sketch
from nas.families import build_prompted
from nas.space.search_space import load_space
from nas.space.subnet import Subnet
from nas.spec.experiment import load_spec
from nas.training.evaluate import evaluate_target

# Its module-scoped fixtures run once: under pytest-xdist every test here goes to one worker.
pytestmark = pytest.mark.xdist_group("dg")

REPO = Path(__file__).resolve().parents[1]

TARGETS = ["uci_digits", "inverted", "noisy", "sketch"]


@pytest.fixture(scope="module")
def mnist_dg(tmp_path_factory):
    """mnist5k with its four targets, prepared once (200 test images)."""
    from nas.data.mini_vtab import prepare

    out = tmp_path_factory.mktemp("dg")
    manifest = prepare(out, ("mnist5k",), test_size=200, log=lambda *_: None)
    return out, manifest["tasks"]["mnist5k"]


def write_spec(tmp_path, datasets, name="dg") -> object:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "datasets": datasets, "space": "tiny_cpu"}))
    return path


# -- the data -------------------------------------------------------------------------------


def test_mnist5k_ships_four_targets_disjoint_from_its_splits(mnist_dg):
    root, entry = mnist_dg
    folder = root / "mnist5k"
    assert list(entry["targets"]) == TARGETS
    counts = {t: e["count"] for t, e in entry["targets"].items()}
    assert counts["uci_digits"] == 1797 and counts["inverted"] == counts["noisy"] == 500
    assert 400 <= counts["sketch"] <= 500
    assert {t: e["classes"] for t, e in entry["targets"].items()} == {
        "uci_digits": 10,
        "inverted": 10,
        "noisy": 10,
        "sketch": len(SKETCH_CLASSES),
    }
    splits = read_vtab(folder)
    seen = set()
    for split in splits.values():
        seen |= set(image_fingerprints(decode_split(split, 28, 1).images[:, 0].numpy()).tolist())
    for t in TARGETS:
        target = read_target(folder / "targets" / f"{t}.txt", folder, t, 10)
        decoded = decode_split(target, 28, 1)
        assert decoded.content_hash() == entry["targets"][t]["sha256"]
        prints = set(image_fingerprints(decoded.images[:, 0].numpy()).tolist())
        assert not prints & seen, t  # no target image is an image of the source's splits
    # the inverted target is MNIST digits the splits never held: inverting them back gives
    # images none of which is in the splits either
    inverted = decode_split(read_target(folder / "targets/inverted.txt", folder, "x", 10), 28, 1)
    back = set(image_fingerprints(255 - inverted.images[:, 0].numpy()).tolist())
    assert not back & seen


def test_sketch_is_the_outline_of_the_ink():
    digit = np.zeros((1, 7, 7), dtype=np.uint8)
    digit[0, 2:5, 2:5] = 255  # a 3x3 square of ink
    out = sketch(digit)[0]
    ring = np.zeros((7, 7), dtype=bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False  # dilation minus erosion: the ring around and on the square's border
    assert ((out == 255) == ring).all()


def test_target_labels_outside_the_source_are_refused(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("L", (28, 28)).save(tmp_path / name)
    (tmp_path / "list.txt").write_text("a.png 3\nb.png 954\n")
    with pytest.raises(DataError, match=r"list.txt:2: label 954 is out of range .* 10 classes"):
        read_target(tmp_path / "list.txt", tmp_path, "t", 10)


# -- the spec -------------------------------------------------------------------------------


def test_targets_in_a_spec(tmp_path, mnist_dg):
    root, _ = mnist_dg
    listed = tmp_path / "v2" / "list.txt"
    listed.parent.mkdir()
    listed.write_text("x.png 1\n")
    spec = load_spec(
        write_spec(
            tmp_path,
            [
                {
                    "name": "mnist5k",
                    "format": "mini-vtab",
                    "root": str(root),
                    "targets": ["sketch", {"name": "v2", "list": "v2/list.txt"}],
                }
            ],
        )
    )
    (ds,) = spec.datasets
    assert [t.name for t in ds.targets] == ["sketch", "v2"]
    assert ds.targets[0].list is None  # the dataset folder's targets/sketch.txt
    assert ds.targets[1].list == str(listed) and ds.targets[1].root == str(listed.parent)
    # a spec without targets keeps the hash it had before targets existed
    plain = load_spec(write_spec(tmp_path, [{"name": "mnist5k", "format": "mini-vtab"}], "p"))
    assert "targets" not in plain.datasets[0].to_data()
    assert "targets" in ds.to_data()


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["imagenet_r"], "datasets[0].targets[0]: mini-VTAB task 'mnist5k' ships no target"),
        (["sketch", "sketch"], "targets[1]: target 'sketch' is listed twice"),
        (["bad name"], "target name 'bad name'"),
        (["v2\n"], "target name 'v2\\n'"),
        (["x" * 101], "expected up to 100 letters"),
        ([{"name": "v2"}], "targets[0]: missing required key 'list'"),
        ([], "expected a non-empty list of targets"),
        ("sketch", "expected a non-empty list of targets"),
    ],
)
def test_bad_targets_are_one_clear_error(tmp_path, targets, message):
    path = write_spec(tmp_path, [{"name": "mnist5k", "format": "mini-vtab", "targets": targets}])
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_missing_target_list_is_found_before_anything_runs(tmp_path, mini_vtab_data):
    folder = tmp_path / "vtab"
    path = write_spec(
        tmp_path,
        [
            {
                "name": "digits",
                "format": "vtab",
                "root": str(mini_vtab_data),
                "targets": [{"name": "v2", "list": str(folder / "nowhere.txt")}],
            }
        ],
    )
    with pytest.raises(ConfigError, match="targets\\[0\\]\\.list: target list not found"):
        load_spec(path)
    result = subprocess.run(
        [sys.executable, "-m", "nas", "run", str(path), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "target list not found" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_bad_target_of_a_task_the_run_prepares_stops_before_any_trial(tmp_path):
    """mnist5k without a root is prepared by the run: its targets are read right after, in
    its label space, before the first trial."""
    from PIL import Image

    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    Image.new("L", (28, 28)).save(tmp_path / "b.png")
    (tmp_path / "bad.txt").write_text("a.png 3\nb.png 12\n")
    path = write_spec(
        tmp_path,
        [{"name": "mnist5k", "format": "mini-vtab", "targets": [{"name": "x", "list": "bad.txt"}]}],
    )
    out = tmp_path / "o"
    result = subprocess.run(
        [sys.executable, "-m", "nas", "run", str(path), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.txt:2: label 12 is out of range for the source dataset's 10 classes" in (
        result.stderr
    )
    assert (out / "data" / "mini-vtab" / "mnist5k" / "test.txt").is_file()  # prepared, then
    assert not (out / "supernet").exists() and not (out / "hparams").exists()  # nothing ran


# -- the scoring ----------------------------------------------------------------------------


def test_evaluate_target_scores_over_all_classes_and_over_its_own(mnist_dg):
    root, _ = mnist_dg
    folder = root / "mnist5k"
    space = load_space("tiny_cpu")
    target = decode_split(read_target(folder / "targets/sketch.txt", folder, "s", 10), 28, 1)
    torch.manual_seed(3)
    model = build_prompted(space.backbone, space, target, subnet=Subnet())
    for p in model.parameters():
        if p.requires_grad:  # the head: random, so that it errs often, both ways
            torch.nn.init.normal_(p, std=1.0)
    mean, std = space.backbone.normalisation()
    got = evaluate_target(model, target, mean=mean, std=std)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in TensorLoader(target, 256, mean, std)])
    y = target.labels
    own = torch.tensor(SKETCH_CLASSES)
    expected_all = (logits.argmax(1) == y).sum().item() / len(y)
    expected_own = (own[logits[:, own].argmax(1)] == y).sum().item() / len(y)
    assert got["classes"] == len(SKETCH_CLASSES)
    assert got["all"] == pytest.approx(expected_all, abs=1e-9)
    assert got["own"] == pytest.approx(expected_own, abs=1e-9)
    assert got["own"] > got["all"]  # five wrong classes fewer to pick
    full = decode_split(read_target(folder / "targets/noisy.txt", folder, "n", 10), 28, 1)
    assert evaluate_target(model, full, mean=mean, std=std)["own"] is None


def test_a_target_that_leaks_the_training_split_is_refused_and_one_class_is_said(
    tmp_path, mini_vtab_data, capsys
):
    """A target listing the training images is no held-out test: one error before anything
    runs. A target of one class is valid but said."""
    from nas.data.lists import read_target, read_vtab
    from nas.pipeline.preflight import check_targets

    folder = mini_vtab_data / "digits"
    target = {"name": "leak", "list": str(folder / "train800.txt"), "root": str(folder)}
    path = write_spec(
        tmp_path,
        [{"name": "digits", "format": "vtab", "root": str(mini_vtab_data), "targets": [target]}],
    )
    result = subprocess.run(
        [sys.executable, "-m", "nas", "run", str(path), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "train800.txt:1: target 'leak' of dataset digits lists 800 image(s) of its train" in (
        result.stderr
    )
    assert not (tmp_path / "o").exists()

    splits = read_vtab(folder)
    test_lines = (folder / "test.txt").read_text().splitlines()
    label = test_lines[0].rsplit(" ", 1)[1]
    one = tmp_path / "one.txt"
    one.write_text("\n".join(x for x in test_lines if x.rsplit(" ", 1)[1] == label) + "\n")
    single = read_target(one, folder, "one", 10, None)
    check_targets("digits", splits, {"one": single})
    assert f"target 'one' of dataset digits ({one}) holds a single class ({label})" in (
        capsys.readouterr().out
    )
