"""UPT's module: the learned text context and, in UPT, the tiny network that also makes visual
prompts (what UPT is as data, and the semantics: ``nas.modules.upt_kind``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nas.modules.base import PromptModule
from nas.modules.options import Options
from nas.modules.upt_kind import RANDOM_INIT, Choice, UPTKind, UPTOptions
from nas.towers.geometry import TokenLayout, TowerGeometry


class UPT(UPTKind, PromptModule):
    def __init__(
        self,
        geometry: TowerGeometry,
        capacity: Sequence[Any],
        options: Options | Mapping[str, Any] | None = None,
    ) -> None:
        """``capacity``: a choice, or ``(modes, n_ctx)`` with a tuple of the modes the weights
        must serve (a supernet's)."""
        super().__init__()
        if geometry.text_width <= 0:
            raise ValueError("upt needs a CLIP backbone (a tower geometry with a text width)")
        modes, n = capacity[0], int(capacity[1])
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
        self.geometry = geometry
        self.capacity = (modes, n)
        self.options = UPTOptions.of(options)
        d, v = geometry.text_width, geometry.width
        if "text" in modes:
            self.ctx = nn.Parameter(torch.randn(n, d) * 0.02)
        if "unified" in modes:
            self.u_text = nn.Parameter(torch.randn(n, d) * 0.02)
            self.u_visual = nn.Parameter(torch.randn(n, d) * 0.02)
            self.encoder = nn.TransformerEncoderLayer(
                d,
                nhead=1,
                dim_feedforward=d,
                dropout=self.options.dropout,
                batch_first=True,
            )
            self.to_visual = nn.Linear(d, v)
        self.active: Choice = ()
        self._visual: torch.Tensor | None = None

    # -- runtime -----------------------------------------------------------------------------
    def fits(self, choice: Choice) -> bool:
        choice = self.canonical(choice)
        return not choice or (choice[0] in self.capacity[0] and choice[1] <= self.capacity[1])

    def activate(self, choice: Choice) -> None:
        choice = self.canonical(choice)
        if not self.fits(choice):
            raise ValueError(f"upt: choice {choice} exceeds the allocated capacity {self.capacity}")
        self.active = choice
        self._visual = None

    def text_init_phrase(self) -> str | None:
        phrase = self.options.init
        return None if not phrase or phrase == RANDOM_INIT else str(phrase)

    def init_context(self, phrase: torch.Tensor) -> None:
        """Start the first text vectors (``ctx`` and ``u_text``) from a phrase's token
        embeddings (k, text width)."""
        k = min(len(phrase), self.capacity[1])
        with torch.no_grad():
            for name in ("ctx", "u_text"):
                if hasattr(self, name):
                    getattr(self, name)[:k].copy_(phrase[:k])

    def text_context(self) -> torch.Tensor | None:
        """The active choice's text context (n_ctx, text width), or None (the template); in
        unified mode this runs the encoder layer and keeps the visual prompts for the image
        tower's next forward."""
        if not self.active:
            return None
        mode, n = self.active
        if mode == "text":
            return self.ctx[:n]
        out = self.encoder(torch.cat((self.u_text[:n], self.u_visual[:n]))[None])[0]
        self._visual = self.to_visual(out[n:])
        return out[:n]

    def tokens(self, layer: int, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if layer != 0 or not self.active or self.active[0] != "unified":
            return x
        if self._visual is None:
            self.text_context()
        prompts = self._visual.to(x.dtype)
        self._visual = None  # one text pass, one image pass: never reuse stale prompts
        return layout.replace(x, self.kind, prompts[None].expand(x.shape[0], -1, -1))

    def export(self, choice: Choice) -> UPT:
        choice = self.canonical(choice)
        if not choice or not self.fits(choice):
            raise ValueError(f"upt: cannot export {choice} from {self.capacity}")
        mode, n = choice
        clone = UPT(self.geometry, choice, self.options)
        reference = next(self.parameters())
        clone.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            if mode == "text":
                clone.ctx.copy_(self.ctx[:n])
            else:
                clone.u_text.copy_(self.u_text[:n])
                clone.u_visual.copy_(self.u_visual[:n])
                clone.encoder.load_state_dict(self.encoder.state_dict())
                clone.to_visual.load_state_dict(self.to_visual.state_dict())
        clone.activate(choice)
        clone.train(self.training)
        return clone
