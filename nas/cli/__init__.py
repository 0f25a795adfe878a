"""The ``nas`` command: ``main`` (the parser, ``nas run`` and ``nas export``), ``report``
(``nas report``, ``nas relocate``), ``data`` (``nas data ...``), ``space`` (``nas space ...``,
``nas subnet ...``) and ``args`` (argument checks). Each command imports what it needs when it
runs, inside its function: torch, Ray and MLflow take seconds to import, and the parser and
the light commands need none of them."""
