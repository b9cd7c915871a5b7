"""One module per method: its config, its layer and the rule that attaches it (see ``registry``)."""

from deltatune.methods.lora import LoraConfig

__all__ = ["LoraConfig"]
