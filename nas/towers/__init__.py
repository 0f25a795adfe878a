"""Transformer towers as prompt modules see them: their geometry, the sites a module acts
at (``geometry``), and the adapters that hook those sites into timm's and open_clip's
Vision Transformers (``adapters``)."""
