"""Other tools' formats: exports to PEFT and timm, NOAH's subnet configs, and PGN's
prompts inverted into pixels."""
