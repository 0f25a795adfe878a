"""Training and evaluation loops. They know nothing about Ray; ``nas`` adapts them."""
