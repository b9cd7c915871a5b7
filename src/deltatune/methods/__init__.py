"""One module per method: its config, its layer and the rule that attaches it (see ``registry``)."""

from deltatune.methods import full as _full  # noqa: F401  (registers the full fine-tuning defaults)
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.boft import BOFTConfig
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.ln_tuning import LNTuningConfig
from deltatune.methods.loha import LoHaConfig
from deltatune.methods.lokr import LoKrConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.oft import OFTConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptEncoderConfig, PromptTuningConfig
from deltatune.methods.vera import VeraConfig

__all__ = [
    "AdaLoraConfig",
    "BOFTConfig",
    "BottleneckConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "VeraConfig",
]
