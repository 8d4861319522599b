"""mindskip_ext: dynamic-depth attention (MindSkip) and Router-Tuning for Hugging Face causal LMs.

    import mindskip_ext as msk
    model = msk.get_mindskip_model(hf_model, msk.MindSkipConfig(granularity="attn"))
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (loads the compiled core and checks how it was built)
from . import hub  # noqa: E402  (fetches the real small default model; standard library only)
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
    "hub",
    "ops",
]
