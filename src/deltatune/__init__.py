"""deltatune: parameter-efficient fine-tuning with HF PEFT's API and checkpoint format."""

from deltatune.checkpoint import CheckpointError
from deltatune.config import ConfigError, PeftConfig, PeftType, TaskType
from deltatune.engine import TargetModuleError
from deltatune.methods import (
    AdaLoraConfig,
    BOFTConfig,
    BottleneckConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
)
from deltatune.peft_model import (
    Parallel,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    Stack,
    get_peft_model,
)
from deltatune.quantization import prepare_model_for_kbit_training

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "BOFTConfig",
    "BottleneckConfig",
    "Parallel",
    "Stack",
    "CheckpointError",
    "ConfigError",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "VeraConfig",
    "TargetModuleError",
    "TaskType",
    "get_peft_model",
    "prepare_model_for_kbit_training",
]
