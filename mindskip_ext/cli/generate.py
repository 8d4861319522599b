"""``mindskip generate``: generate text and show which layers each sequence skipped."""

from __future__ import annotations

import sys

from .common import add_common, add_model_args, add_router_args, add_token_layers_arg, load_for_eval, say


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="Generate text and show which layers each sequence skipped.",
        description="Generate with a (MindSkip) model. Each --prompt is one sequence of a batch; without "
        "--prompt, prompts are read from stdin, one per line (write \\n for a newline). Prompts are wrapped in "
        "the chat template "
        "(or the plain prompt format) unless --raw.",
    )
    add_model_args(p)
    add_router_args(p)
    add_token_layers_arg(p)
    p.add_argument("--prompt", action="append", help="A prompt (repeat for a batch).")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="Feed prompts as they are, without a template.")
    add_common(p)
    p.set_defaults(func=run)


def skipped_layers(model, batch_size: int) -> list[list[int]] | None:
    """Per sequence of the last prefill, the MindSkip layers whose gated sublayer it skipped."""
    from ..model import MindSkipModel

    if not isinstance(model, MindSkipModel) or model.last_record is None:
        return None
    out: list[list[int]] = [[] for _ in range(batch_size)]
    for idx, routing in sorted(model.last_record.layers.items()):
        for row, keep in enumerate(routing.keep.tolist()):
            if not keep:
                out[row].append(idx)
    return out


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, raw: bool = False):
    """Greedy generation for a batch of prompts: (completions, skipped layers per sequence or None)."""
    import torch

    from ..data import pad_token_id, prompt_text

    texts = prompts if raw else [prompt_text(tokenizer, p) for p in prompts]
    templated = not raw and bool(getattr(tokenizer, "chat_template", None))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id(tokenizer),
        )
    skipped = skipped_layers(model, len(prompts))
    completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [c.strip() for c in completions], skipped


def run(args) -> int:
    model, tokenizer = load_for_eval(args)
    num_layers = len(model.routers) if args.routers else 0
    batches = [args.prompt] if args.prompt else ([line.strip()] for line in sys.stdin if line.strip())
    for prompts in batches:
        prompts = [p.replace("\\n", "\n") for p in prompts]  # a literal \n in a prompt is a newline
        completions, skipped = generate_batch(model, tokenizer, prompts, args.max_new_tokens, args.raw)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            say(f"[{i}] {prompt}\n    -> {completion}")
            if skipped is not None:
                say(f"    skipped attention in {len(skipped[i])} of {num_layers} MindSkip layers: {skipped[i]}")
    return 0
