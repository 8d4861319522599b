"""The MindSkip configuration: which layers get a router, what the router gates, and how."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

GRANULARITIES = ("attn", "mlp", "block")
# What one routing decision covers: a whole sequence (the paper's attn_sequence) or one token (attn_token).
ROUTING_LEVELS = ("sequence", "token")
PACKED_MODES = ("auto", "on", "off")
# Version of the router directory's config file (mindskip_config.json). Files from before the field existed
# are version 1. A reader refuses a newer version rather than guess at fields it does not know.
CONFIG_FORMAT_VERSION = 1


def default_layers(num_layers: int) -> list[int]:
    """The paper's choice: the last half of the layers except the very last one.

    32 layers give 15..30 (16 layers), 30 layers give 14..28 (15 layers).
    """
    if num_layers < 2:
        raise ValueError(f"MindSkip needs a model with at least 2 decoder layers, got {num_layers}")
    return list(range(num_layers // 2 - 1, num_layers - 1))


def wide_layers(num_layers: int) -> list[int]:
    """Every layer but the first eighth or so and the last: the candidates of the ``kd-joint`` (the default of
    ``mindskip train``) and ``kd-wide`` Router-Tuning recipes, which may then skip the early layers that
    Attention-Drop finds redundant too.

    30 layers give 4..28 (25 layers), 32 layers give 4..30.
    """
    if num_layers < 2:
        raise ValueError(f"MindSkip needs a model with at least 2 decoder layers, got {num_layers}")
    return list(range(max(1, round(0.13 * num_layers)), num_layers - 1)) or [0]


def capacity_for_skip_ratio(skip_ratio: float, num_layers: int, router_layers: int) -> float:
    """The kept fraction over ``router_layers`` MindSkip layers that skips ``skip_ratio`` of all ``num_layers``
    attention sublayers (0.125 of 30 over 25 routers: 0.85)."""
    if not 0.0 < skip_ratio < 1.0:
        raise ValueError(f"skip_ratio must be in (0, 1), got {skip_ratio!r}")
    capacity = 1.0 - skip_ratio * num_layers / router_layers
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"a skip ratio of {skip_ratio} cannot be reached with routers on {router_layers} of "
                         f"{num_layers} layers (at most {router_layers / num_layers:.3f})")
    return capacity


def _layer_list(name: str, layers, otherwise: str) -> list[int]:
    """``layers`` (decoder layer indices) checked and sorted; errors name the field."""
    layers = list(layers)
    if not layers:
        raise ValueError(f"{name} must name at least one decoder layer ({otherwise})")
    for idx in layers:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(f"{name} must be integers, got {idx!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} has duplicates: {layers}")
    return sorted(layers)


def check_token_layers(token_layers, layers) -> None:
    """Raise unless every layer of ``token_layers`` is one of the routed ``layers``."""
    stray = sorted(set(token_layers) - set(layers))
    if stray:
        raise ValueError(f"token_layers {stray} are not routed layers (the routers are on {layers})")


@dataclass
class MindSkipConfig:
    """How a model is converted to MindSkip.

    Every field is validated on construction. :meth:`to_json` / :meth:`from_json` write and read the config
    file of a router directory (``mindskip_config.json``), with its format version.
    """

    granularity: str = field(
        default="attn",
        metadata={
            "help": "What a router gates: 'attn' (the attention sublayer, MindSkip), 'mlp' or 'block'.",
            "choices": GRANULARITIES,
        },
    )
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Decoder layers that get a router, e.g. 14-28 or 3 5 7 (default: the last half but the "
            "last layer)."
        },
    )
    routing: str = field(
        default="sequence",
        metadata={
            "help": "What one decision covers: 'sequence' (the router pools the sequence; a skipped sequence skips "
            "the sublayer at prefill and every decode step) or 'token' (attention only: each token is routed on its "
            "own input; every token writes its keys and values, a skipped token computes no query, attention or "
            "output projection; see docs/token-routing.md).",
            "choices": ROUTING_LEVELS,
        },
    )
    token_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "With routing 'token': the routed layers that route per token; the other routed layers route per "
            "sequence with the same router (default: every routed layer per token). A router is linear, so taken per "
            "sequence it keeps a sequence when the mean of its tokens' logits clears the threshold, and a skipped "
            "sequence stores no KV cache there: route per token only the layers whose routers do not decide alike "
            "for every token (mindskip_ext.token_routing.varying_layers).",
        },
    )
    threshold: float = field(
        default=0.5,
        metadata={"help": "A sequence (token) runs the gated sublayer when sigmoid(router) >= threshold; in (0, 1)."},
    )
    packed_attention: str = field(
        default="auto",
        metadata={
            "help": "Run kept sequences through variable-length FlashAttention with padding removed: 'auto' "
            "(on CUDA when a varlen kernel is available and no KV cache is being written), 'on' or 'off'.",
            "choices": PACKED_MODES,
        },
    )
    train_all_sequences: bool = field(
        default=True,
        metadata={
            "help": "In training mode, compute the gated sublayer for every sequence so the straight-through "
            "gradient reaches the router for skipped sequences too (the paper's eqs. 3-4). --kept-only computes "
            "only kept sequences (cheaper; skipped sequences then get no task-loss gradient).",
            "flag": "--kept-only",
            "negated": True,
        },
    )

    pool_padding: bool = field(
        default=False,
        metadata={
            "help": "Average the router input over padding tokens too, as the paper's reference code does. "
            "Makes a sequence's routing depend on the rest of its batch; kept only to reproduce that code."
        },
    )

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number in (0, 1), got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.routing not in ROUTING_LEVELS:
            raise ValueError(f"routing must be one of {ROUTING_LEVELS}, got {self.routing!r}")
        if self.routing == "token" and self.granularity != "attn":
            raise ValueError(f"token routing gates the attention sublayer only (granularity 'attn'), got granularity "
                             f"{self.granularity!r}")
        if self.packed_attention not in PACKED_MODES:
            raise ValueError(f"packed_attention must be one of {PACKED_MODES}, got {self.packed_attention!r}")
        for name in ("train_all_sequences", "pool_padding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.layers is not None:
            self.layers = _layer_list("layers", self.layers, "or be None for the default")
        if self.token_layers is not None:
            if self.routing != "token":
                raise ValueError("token_layers chooses which routed layers route per token: it needs routing 'token'")
            self.token_layers = _layer_list("token_layers", self.token_layers,
                                            "or be None for every routed layer; for none, use routing 'sequence'")
        if self.routing == "token" and self.pool_padding:
            raise ValueError("pool_padding pools a sequence's router input; token routing pools nothing")

    @property
    def threshold_logit(self) -> float:
        """The router logit at which a sequence is kept: ``log(threshold / (1 - threshold))``."""
        return math.log(self.threshold / (1.0 - self.threshold))

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The layer indices for a model with ``num_layers`` decoder layers, checked against that count (and the
        token layers against them)."""
        if self.layers is None:
            layers = default_layers(num_layers)
        else:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"layer index {bad[0]} is out of range: the model has {num_layers} decoder layers "
                    f"(0..{num_layers - 1})"
                )
            layers = list(self.layers)
        check_token_layers(self.token_layers or (), layers)
        return layers

    def routing_of(self, layer_idx: int) -> str:
        """What one decision of routed layer ``layer_idx`` covers: ``"sequence"`` or ``"token"``."""
        if self.routing == "token" and (self.token_layers is None or layer_idx in self.token_layers):
            return "token"
        return "sequence"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["routing"] == "sequence":
            # The level is recorded where it is not the default, so that a file of sequence routers reads with a
            # mindskip_ext from before token routing (a file without the field is sequence routing).
            del data["routing"]
        if data["token_layers"] is None:  # likewise: a file without the field routes every layer at one level
            del data["token_layers"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MindSkipConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a MindSkip config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown MindSkip config field(s): {', '.join(unknown)} (a file written by a newer mindskip_ext? "
                "upgrade mindskip_ext to read it)"
            )
        return cls(**data)

    def to_json(self, **fields: Any) -> str:
        """The config file: ``{"format_version", "mindskip_config", **fields}`` as sorted, indented JSON."""
        data = {**fields, "format_version": CONFIG_FORMAT_VERSION, "mindskip_config": self.to_dict()}
        return json.dumps(data, sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "the config file") -> tuple[MindSkipConfig, dict[str, Any]]:
        """Read a config file written by :meth:`to_json`: the config and the file's other fields."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or "mindskip_config" not in data:
            raise ValueError(f"{source} lacks mindskip_config: not a MindSkip router config")
        version = data.pop("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{source} has an invalid format_version {version!r}")
        if version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"{source} was written by a newer mindskip_ext (config format {version}); this one reads format "
                f"{CONFIG_FORMAT_VERSION} and older: upgrade mindskip_ext"
            )
        return cls.from_dict(data.pop("mindskip_config")), data
