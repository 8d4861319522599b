"""mindskip_ext: dynamic-depth attention (MindSkip) and Router-Tuning for Hugging Face causal LMs.

    import mindskip_ext as msk
    model = msk.get_mindskip_model(hf_model, msk.MindSkipConfig(granularity="attn"))

This imports the core only (the compiled ops, the config, the layer, the model with save/load). The rest
loads when used: ``mindskip_ext.training`` (Router-Tuning), ``mindskip_ext.eval`` (perplexity, lm-eval,
Attention-Drop), ``mindskip_ext.cli``, ``mindskip_ext.offline_models`` (fetching SmolLM2 through pip) and
``mindskip_ext.testing`` (tiny models and built-in data).
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (loads the compiled core and checks how it was built)
from .config import MindSkipConfig  # noqa: E402
from .layer import MindSkipDecoderLayer, RoutingRecord  # noqa: E402
from .model import MindSkipModel, get_mindskip_model  # noqa: E402

__all__ = [
    "MindSkipConfig",
    "MindSkipDecoderLayer",
    "MindSkipModel",
    "RoutingRecord",
    "__version__",
    "get_mindskip_model",
    "ops",
]
