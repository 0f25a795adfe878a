"""What is known about the standard benchmarks: class counts and VTAB groups, and the names of
the offline mini-VTAB tasks (built by ``nas.data.mini_vtab``; here as plain data, so that a
spec or a CLI argument is checked without importing what builds them).

Folder names are those of the VTAB-1k and few-shot releases used by the VPT and NOAH code."""

from __future__ import annotations

VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
                "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"),
}  # fmt: skip

NUM_CLASSES: dict[str, int] = {
    # VTAB-1k
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
    # few-shot
    "food-101": 101, "oxford-pets": 37, "stanford_cars": 196, "oxford-flowers102": 102,
    "fgvc-aircraft": 100, "imagenet": 1000,
}  # fmt: skip


def vtab_group(dataset: str) -> str | None:
    for group, names in VTAB_GROUPS.items():
        if dataset in names:
            return group
    return None


#: The mini-VTAB tasks ``nas.data.mini_vtab.TASKS`` builds, in its order.
MINI_VTAB_TASKS: tuple[str, ...] = (
    "animal_mnist", "mnist5k", "digits", "textures", "elpv", "dsprites_loc", "dsprites_ori",
    "clevr_count", "scenes_shape", "scenes_fill",
)  # fmt: skip
#: The domain-generalisation targets a task ships (``targets:`` of a spec's dataset entry).
TASK_TARGETS: dict[str, tuple[str, ...]] = {
    "mnist5k": ("uci_digits", "inverted", "noisy", "sketch")
}
#: Tasks whose source the train, val and test splits (and targets) use up: no ``devtest``.
WITHOUT_DEVTEST = frozenset({"digits", "mnist5k", "textures", "elpv"})
# ELPV's licence is non-commercial; the scene tasks are CLIP probes, asked for by name
DEFAULT_TASKS = tuple(t for t in MINI_VTAB_TASKS if t != "elpv" and not t.startswith("scenes_"))
