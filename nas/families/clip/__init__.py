"""The CLIP family: its spec (``spec.ClipSpec``: an open_clip architecture or the
offline clip_fmnist) and its prompted model (``model.PromptedCLIP``)."""
