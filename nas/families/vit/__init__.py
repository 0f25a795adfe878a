"""The timm Vision Transformer family: its spec (``spec.BackboneSpec``) and its prompted
model (``model.PromptedViT``)."""
