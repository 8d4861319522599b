"""Convert a stock Hugging Face causal LM to MindSkip, save and load its routers, and give it back.

Only model *instances* are changed, never transformers classes:

* each MindSkip decoder layer in ``model.<decoder>.layers`` is replaced by a
  :class:`~mindskip_ext.layer.MindSkipDecoderLayer` that keeps the original as ``base_layer``;
* the decoder module's ``forward`` gets an instance-level wrapper that hands the 2D padding mask
  and a fresh per-call :class:`~mindskip_ext.layer.RoutingRecord` down to the layers.

:meth:`MindSkipModel.unload` undoes both and restores every parameter's ``requires_grad``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import types
import weakref
from pathlib import Path

import torch
from torch import nn

from . import __version__
from ._io import atomic_write_bytes
from .architectures import (
    TOKEN_ROUTING_FAMILIES,
    arch_for,
    check_attn_implementation,
    check_layer,
    decoder_of,
    layer_list,
)
from .config import MindSkipConfig
from .layer import STATE_KWARG, ForwardState, MindSkipDecoderLayer, RoutingRecord

CONFIG_NAME = "mindskip_config.json"
WEIGHTS_NAME = "routers.safetensors"
RECORD_KWARG = "mindskip_record"
# ``model(..., mindskip_bypass=True)`` runs every MindSkip layer's original layer: the unconverted model's
# output, from the same weights (the self-distillation teacher of Router-Tuning).
BYPASS_KWARG = "mindskip_bypass"


def _model_signature(hf_model) -> dict:
    cfg = hf_model.config
    return {
        "model_type": cfg.model_type,
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
    }


def _patch_decoder_forward(decoder: nn.Module, owner: MindSkipModel) -> None:
    """Give ``decoder`` an instance-level forward that passes MindSkip's per-call state to the layers."""
    inner = decoder.forward
    names = list(inspect.signature(type(decoder).forward).parameters)[1:]  # after self
    owner_ref = weakref.ref(owner)

    @functools.wraps(type(decoder).forward)
    def forward(self, *args, **kwargs):
        record = kwargs.pop(RECORD_KWARG, None) or RoutingRecord()
        bypass = bool(kwargs.pop(BYPASS_KWARG, False))
        # The arguments by name, without Signature.bind (a compiled decode step would graph-break on its mappingproxy).
        bound = dict(zip(names, args), **kwargs)
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        num_tokens = tokens.shape[1] if tokens is not None else 0
        kwargs[STATE_KWARG] = ForwardState(bound.get("attention_mask"), num_tokens, record, bypass=bypass)
        out = inner(*args, **kwargs)
        mindskip = owner_ref()
        if mindskip is not None and record.layers:
            mindskip._last_record = record
        return out

    decoder.forward = types.MethodType(forward, decoder)


class MindSkipModel(nn.Module):
    """A Hugging Face causal LM with MindSkip routers. Behaves like the wrapped model otherwise.

    Build one with :func:`get_mindskip_model` or :meth:`from_pretrained`.
    """

    def __init__(self, model: nn.Module, config: MindSkipConfig):
        super().__init__()
        spec = arch_for(model.config)
        check_attn_implementation(model.config)
        layers = layer_list(model, spec)
        if any(isinstance(layer, MindSkipDecoderLayer) for layer in layers):
            raise ValueError("this model already has MindSkip layers; call unload() on its MindSkipModel first")
        indices = config.resolve_layers(len(layers))
        if spec.moe and config.granularity != "attn":
            raise ValueError(
                f"granularity {config.granularity!r} would gate the mixture-of-experts block of a "
                f"{model.config.model_type!r} model, whose router logits the auxiliary loss reads for every token; "
                "MindSkip skips attention in MoE models: use granularity 'attn'"
            )
        if config.routing == "token" and model.config.model_type not in TOKEN_ROUTING_FAMILIES:
            raise ValueError(
                f"token routing does not support {model.config.model_type!r} models (its attention output is not "
                f"recomputed per token as the stock layer computes it); token routing supports "
                f"{', '.join(TOKEN_ROUTING_FAMILIES)}. Sequence routing (routing='sequence') supports every family"
            )
        for idx in indices:
            check_layer(layers[idx], spec, model.config.model_type)
        self.base_model = model
        self.mindskip_config = config
        self._spec = spec
        self._last_record: RoutingRecord | None = None
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._decoder_forward = decoder_of(model, spec).__dict__.get("forward")
        hidden = int(model.config.hidden_size)
        for p in model.parameters():
            p.requires_grad_(False)
        for idx in indices:
            layers[idx] = MindSkipDecoderLayer(layers[idx], idx, spec, config, hidden).train(layers[idx].training)
        _patch_decoder_forward(decoder_of(model, spec), self)
        self.training = model.training  # a model loaded for inference stays in eval mode, its MindSkip layers too

    # ------------------------------------------------------------------ delegation

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ routers

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """Every decoder layer of the wrapped model, MindSkip or not, in order."""
        return layer_list(self.base_model, self._spec)

    @property
    def mindskip_layers(self) -> dict[int, MindSkipDecoderLayer]:
        return {i: layer for i, layer in enumerate(self.decoder_layers) if isinstance(layer, MindSkipDecoderLayer)}

    @property
    def routers(self) -> dict[int, nn.Linear]:
        """Layer index -> the router ``nn.Linear(hidden_size, 1)``."""
        return {i: layer.router for i, layer in self.mindskip_layers.items()}

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for router in self.routers.values() for p in router.parameters()]

    @property
    def last_record(self) -> RoutingRecord | None:
        """The routing of the last forward that made decisions (a prefill, or a forward without cache)."""
        return self._last_record

    @property
    def last_capacity(self) -> dict[int, float]:
        """Layer index -> kept fraction of the sequences in the last prefill/forward."""
        return self._last_record.capacity() if self._last_record is not None else {}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ save / load

    def router_state_dict(self) -> dict[str, torch.Tensor]:
        """Every router's weight and the bias its gate applies (a centred router's, uncentred: see
        :meth:`MindSkipDecoderLayer.set_router_centre`), fp32 on the CPU."""
        out = {}
        for idx, layer in self.mindskip_layers.items():
            out[f"layers.{idx}.router.weight"] = layer.router.weight.detach().to("cpu", torch.float32).contiguous()
            out[f"layers.{idx}.router.bias"] = layer.router_bias().detach().to("cpu", torch.float32).contiguous()
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write only the MindSkip config (JSON) and the router weights (safetensors)."""
        from safetensors.torch import save

        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} exists and is not a directory")
        payload = save(self.router_state_dict(), metadata={"format": "pt", "mindskip_ext": __version__})
        text = self.mindskip_config.to_json(
            layers=sorted(self.routers),
            base_model=_model_signature(self.base_model),
            weights_sha256=hashlib.sha256(payload).hexdigest(),
            mindskip_ext_version=__version__,
        )
        atomic_write_bytes(directory / WEIGHTS_NAME, payload)
        atomic_write_bytes(directory / CONFIG_NAME, text.encode())

    @classmethod
    def from_pretrained(cls, model: nn.Module, router_directory: str | os.PathLike, **overrides) -> MindSkipModel:
        """Convert ``model`` (a stock HF model of the same shape) and load routers saved with ``save_pretrained``.

        Everything is read and checked before ``model`` is touched: on any error it stays unchanged.
        ``overrides`` replace config fields (e.g. ``threshold=0.6``).
        """
        config, meta, state = read_router_directory(router_directory)
        signature = _model_signature(model)
        if meta["base_model"] != signature:
            raise ValueError(
                f"routers in {router_directory} were trained for {meta['base_model']}, but the base model is "
                f"{signature}"
            )
        if overrides:
            config = MindSkipConfig.from_dict({**config.to_dict(), **overrides})
        hidden = signature["hidden_size"]
        for idx in meta["layers"]:
            for name, shape in (("weight", (1, hidden)), ("bias", (1,))):
                key = f"layers.{idx}.router.{name}"
                if key not in state:
                    raise ValueError(f"{router_directory}: router file lacks {key}")
                if tuple(state[key].shape) != shape:
                    raise ValueError(
                        f"{router_directory}: {key} has shape {tuple(state[key].shape)}, expected {shape} "
                        f"for hidden size {hidden}"
                    )
        if sorted(meta["layers"]) != config.resolve_layers(signature["num_hidden_layers"]):
            raise ValueError(f"{router_directory}: the router layers do not match the config's layers")
        wrapped = cls(model, config)
        wrapped.load_router_state_dict(state)
        return wrapped

    def load_router_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`router_state_dict`'s tensors; a centred router keeps its centre and gets the same logits."""
        with torch.no_grad():
            for idx, layer in self.mindskip_layers.items():
                centre = layer.router_centre
                layer.set_router_centre(None)
                layer.router.weight.copy_(state[f"layers.{idx}.router.weight"])
                layer.router.bias.copy_(state[f"layers.{idx}.router.bias"])
                if centre is not None:
                    layer.set_router_centre(centre)

    @property
    def router_centres(self) -> dict[int, torch.Tensor] | None:
        """Layer index -> the centre of its router's input while Router-Tuning centres them, else None."""
        centres = {i: layer.router_centre for i, layer in self.mindskip_layers.items()}
        return None if all(c is None for c in centres.values()) else centres

    def set_router_centres(self, centres: dict[int, torch.Tensor] | None) -> None:
        """Centre every router's input (a centre per router layer), or stop centring (None); decisions unchanged."""
        if centres is not None and set(centres) != set(self.mindskip_layers):
            raise ValueError(f"router centres are for layers {sorted(centres)}, the routers are on "
                             f"{sorted(self.mindskip_layers)}")
        for idx, layer in self.mindskip_layers.items():
            layer.set_router_centre(None if centres is None else centres[idx])

    # ------------------------------------------------------------------ unload

    def unload(self) -> nn.Module:
        """Remove MindSkip and give back the original model, exactly as it was."""
        model = self.base_model
        layers = layer_list(model, self._spec)
        for idx, layer in list(enumerate(layers)):
            if isinstance(layer, MindSkipDecoderLayer):
                layers[idx] = layer.base_layer
        decoder = decoder_of(model, self._spec)
        if self._decoder_forward is None:
            decoder.__dict__.pop("forward", None)
        else:
            decoder.forward = self._decoder_forward
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        return model


def read_router_directory(router_directory: str | os.PathLike) -> tuple[MindSkipConfig, dict, dict[str, torch.Tensor]]:
    """Read and verify a router directory: ``(config, the config file's other fields, router weights)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    directory = Path(router_directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: not a MindSkip router directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    try:
        text = config_path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    config, meta = MindSkipConfig.from_json(text, str(config_path))
    missing = [key for key in ("layers", "base_model", "weights_sha256") if key not in meta]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}: not a MindSkip router config")
    payload = weights_path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{weights_path} is corrupted or truncated: its checksum does not match {CONFIG_NAME}")
    try:
        state = load(payload)
    except SafetensorError as err:
        raise ValueError(f"{weights_path} is not a valid safetensors file: {err}") from None
    return config, meta, state


def get_mindskip_model(model: nn.Module, config: MindSkipConfig | None = None) -> MindSkipModel:
    """Convert ``model`` in place: routers (zero-initialised: keeps everything) on the configured layers,
    base weights frozen. A fresh conversion computes exactly what the original model computes."""
    return MindSkipModel(model, config if config is not None else MindSkipConfig())
