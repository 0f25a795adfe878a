"""UPT as data (torch-free; the module with its weights is ``nas.modules.upt``): its modes,
options, space and costs.

UPT (Zang et al.) and its text-only parent CoOp (Zhou et al.): learned context for CLIP's
text tower, and in UPT also visual prompts for its image tower, from one tiny network.

A choice is ``(mode, n_ctx)``:

- ``text`` (CoOp): ``n_ctx`` learned vectors of the text width take the place of the prompt
  template's words: ``[SOT] ctx_1 .. ctx_n <class name> . [EOT]``.
- ``unified`` (UPT): a learned prompt of ``2 n_ctx`` text-width vectors goes through one
  Transformer encoder layer (1 head, FFN width = text width, two LayerNorms, dropout 0.1);
  the first ``n_ctx`` outputs are the text context, the last ``n_ctx``, through a linear map to
  the image width, are visual prompts that join the image tower's sequence before block 0
  (after the positional embedding, without one of their own) and flow through every block.

Visual prompts alone are VPT (``nas.modules.vpt``) on the image tower; a space offers "text /
visual / unified" by declaring this module with its modes beside ``vpt``.

Weight entanglement: the supernet holds ``n_ctx`` up to the space's maximum; a choice uses
``ctx[:n]`` (text) or ``u_text[:n]``, ``u_visual[:n]`` (unified); the encoder layer and the
linear map serve every ``n``. The two modes' weights are separate, chosen categorically. The
first vectors of ``ctx`` and ``u_text`` start from the embedding of ``options.init`` ("a photo
of a"), the rest N(0, 0.02), as both papers do (``init: random``: all N(0, 0.02));
``PromptedCLIP`` sets that from its tokenizer.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nas.core.validate import Reader
from nas.core.yamlio import join_key
from nas.modules.kind import Kind
from nas.modules.options import Options
from nas.modules.spaces import ModuleSpace, Param
from nas.towers.geometry import TowerGeometry

MODES = ("text", "unified")
RANDOM_INIT = "random"  # options.init: no phrase, every context vector N(0, 0.02)
Choice = tuple  # (mode, n_ctx); () when absent (the zero-shot prompt template)


def encoder_layer_params(width: int) -> int:
    """Parameters of UPT's encoder layer at ``width``: attention (in and out projections with
    biases), the FFN width -> width -> width, and two LayerNorms."""
    return 6 * width * width + 10 * width


@dataclass(frozen=True)
class UPTOptions(Options):
    """UPT's options: dropout of its encoder layer, and the phrase the first context vectors
    start from (``random``: none)."""

    dropout: float = field(default=0.1, metadata={"below": 1.0})
    init: str = "a photo of a"


class UPTKind(Kind):
    kind = "upt"
    sites = frozenset({"tokens"})
    text_side = True
    Options = UPTOptions

    # -- choices as data -------------------------------------------------------------------
    @classmethod
    def empty_choice(cls) -> Choice:
        return ()

    @classmethod
    def canonical(cls, choice: Sequence[Any]) -> Choice:
        if not choice or choice[0] == "none" or int(choice[1]) == 0:
            return ()
        return (str(choice[0]), int(choice[1]))

    @classmethod
    def parse_choice(cls, value: Any, reader: Reader, key: str) -> Choice:
        """``{mode: text|unified, n_ctx: n}``, or null (the zero-shot template)."""
        if value is None:
            return ()
        value = reader.mapping(value, key, required=["mode", "n_ctx"])
        mode = _mode(reader, value["mode"], join_key(key, "mode"), allow_none=True)
        n_ctx = reader.integer(value["n_ctx"], join_key(key, "n_ctx"), minimum=1)
        return cls.canonical((mode, n_ctx))

    @classmethod
    def choice_to_data(cls, choice: Choice) -> dict[str, Any] | None:
        return {"mode": choice[0], "n_ctx": choice[1]} if choice else None

    @classmethod
    def choice_str(cls, choice: Choice) -> str:
        return f"{choice[0]}{choice[1]}" if choice else "-"

    @classmethod
    def parse_space(cls, value: Any, reader: Reader, key: str, geometry: TowerGeometry) -> UPTSpace:
        if geometry.text_width <= 0:
            reader.fail(key, "upt prompts a CLIP text tower; this space's backbone has none")
        value = reader.mapping(value, key, required=["modes", "n_ctx"], optional=["options"])
        names = value["modes"]
        if not isinstance(names, list) or not names:
            reader.fail(join_key(key, "modes"), f"expected a list of: none, {', '.join(MODES)}")
        modes = tuple(
            dict.fromkeys(
                _mode(reader, v, join_key(key, f"modes[{i}]"), allow_none=True)
                for i, v in enumerate(names)
            )
        )
        if modes == ("none",):
            reader.fail(join_key(key, "modes"), "only 'none': give text and/or unified")
        n_ctx = reader.int_choices(value["n_ctx"], join_key(key, "n_ctx"), minimum=1)
        limit = geometry.text_context - 8  # SOT, EOT and room for the class name
        if max(n_ctx) > limit:
            reader.fail(
                join_key(key, "n_ctx"),
                f"{max(n_ctx)} context vectors leave no room for class names in the text "
                f"tower's {geometry.text_context} tokens; use at most {limit}",
            )
        options = UPTOptions.parse(value.get("options", {}), reader, join_key(key, "options"))
        return UPTSpace(modes, n_ctx, options)

    # -- costs -------------------------------------------------------------------------------
    @classmethod
    def flops(
        cls, choice: Choice, geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        # Its network runs once per batch (the prompts do not depend on the image): nothing per
        # image; its tokens' attention and MLP cost is nas.space.cost's.
        return 0

    @classmethod
    def params(cls, choice: Choice, geometry: TowerGeometry) -> int:
        if not choice:
            return 0
        modes, n = choice
        modes = (modes,) if isinstance(modes, str) else modes
        d, total = geometry.text_width, 0
        if "text" in modes:
            total += n * d
        if "unified" in modes:
            total += 2 * n * d + encoder_layer_params(d) + d * geometry.width + geometry.width
        return total

    @classmethod
    def extra_tokens(cls, choice: Choice, geometry: TowerGeometry) -> list[int]:
        added = choice[1] if choice and choice[0] == "unified" else 0
        return [added] * geometry.depth

    # flops: the encoder layer and the linear map run once per batch, not per image; the
    # blocks' cost of the visual prompts is counted by nas.space.cost (extra_tokens).


def _mode(reader: Reader, value: Any, key: str, allow_none: bool = False) -> str:
    known = (("none",) if allow_none else ()) + MODES
    if value not in known:
        reader.fail(key, f"{value!r} is not a mode; expected one of: {', '.join(known)}")
    return value


@dataclass(frozen=True)
class UPTSpace(ModuleSpace):
    """The choices: a mode (``none`` = the zero-shot template, ``text``, ``unified``), then a
    number of context vectors (none has no n_ctx)."""

    modes: tuple[str, ...]
    n_ctx: tuple[int, ...]
    options: UPTOptions

    kind = "upt"
    module = UPTKind

    def choices(self) -> Iterator[Choice]:
        if "none" in self.modes:
            yield ()
        yield from itertools.product([m for m in self.modes if m != "none"], self.n_ctx)

    def count(self) -> int:
        return sum(1 for _ in self.choices())

    def contains(self, choice: Choice) -> bool:
        choice = UPTKind.canonical(choice)
        if not choice:
            return "none" in self.modes
        return choice[0] in self.modes and choice[1] in self.n_ctx

    def sample(self, rng: random.Random) -> Choice:
        """A uniform mode, then a uniform n_ctx."""
        mode = rng.choice(self.modes)
        return () if mode == "none" else (mode, rng.choice(self.n_ctx))

    def sample_uniform(self, rng: random.Random) -> Choice:
        return rng.choice(list(self.choices()))

    def parameters(self) -> list[Param]:
        """The mode first; n_ctx exists only for a mode that has context (and is carried
        through a mutation to ``none`` and back)."""
        return [
            Param("mode", self.modes, structural=True),
            Param("n_ctx", self.n_ctx, when=lambda v: v["mode"] != "none", latent=True),
        ]

    def encode(self, choice: Choice) -> dict[str, Any]:
        choice = UPTKind.canonical(choice)
        return {"mode": choice[0], "n_ctx": choice[1]} if choice else {"mode": "none"}

    def decode(self, values: Mapping[str, Any]) -> Choice:
        return () if values["mode"] == "none" else (values["mode"], values["n_ctx"])

    def capacity(self) -> tuple[Any, ...]:
        return (tuple(m for m in self.modes if m != "none"), max(self.n_ctx))

    def cost_distribution(self, geometry: TowerGeometry) -> Counter[int]:
        return Counter(UPTKind.params(c, geometry) for c in self.choices())

    def smallest(self, geometry: TowerGeometry) -> Choice:
        return min(self.choices(), key=lambda c: UPTKind.params(c, geometry))

    def largest(self, geometry: TowerGeometry) -> Choice:
        return max(self.choices(), key=lambda c: UPTKind.params(c, geometry))

    def to_data(self) -> dict[str, Any]:
        return {
            "modes": list(self.modes),
            "n_ctx": list(self.n_ctx),
            "options": self.options.to_data(),
        }
