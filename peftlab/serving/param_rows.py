r"""Mixed batches through layers whose adapters adapt the base module's parameters (slots with ``params``: LoRA on
3-D MoE expert stacks and routers via ``target_parameters``). A slot whose module's call cannot be split by rows
(``rows_separable`` False: LoRA on ``nn.MultiheadAttention``, whose attention mask is not per row) is refused.

Such an adapter changes the module's weights, W' = W + s·ΔW_a, not its output, so one call cannot serve rows of
different adapters. The layer instead runs the base module once per group of rows that share W'::

    out[rows of a] = f(x[rows of a]; W + s_a ΔW_a)        one group per adapter that adapts this module
    out[other rows] = f(x[other rows]; W)                  "__base__" rows and adapters that adapt other modules

so every row computes exactly what it computes alone with its adapter (the functions involved act on each entry
of the leading dimension independently: an MoE block routes and mixes experts per token). Every tensor argument
with the input's leading size (the experts' ``top_k_index`` / ``top_k_weights``) is split the same way, and every
tensor output with it is put back in place.

**Which rows.** A layer's input either has the batch's rows first (``batch`` entries), or it is the (batch, T)
input flattened row-major to ``batch·T`` entries: the MoE blocks of Qwen3-MoE, OLMoE and Mixtral pass their
experts and router ``hidden_states.view(-1, d)`` (transformers 5.24), so entry i belongs to row i // T. T is the
sequence length of the model call's ``input_ids`` / ``inputs_embeds`` (:mod:`peftlab.serving.hooks` records it).
Any other leading size is refused: the rows of its entries cannot be known.

HF PEFT 0.21 refuses mixed batches on these layers (``lora.ParamWrapper``: "does not support mixed adapter
batches yet").
"""

from __future__ import annotations

from typing import Any

import torch


def entry_rows(router, n: int, device) -> torch.Tensor:
    """(n,) long: the batch row of each of a layer input's ``n`` leading entries (module docstring).

    Raises:
        RuntimeError: ``n`` is neither the batch nor batch · the call's sequence length.
    """
    tokens = getattr(router, "tokens", None)

    def make():
        rows = torch.arange(router.batch, device=device)
        return rows if n == router.batch else rows.repeat_interleave(n // router.batch)

    if n == router.batch or (tokens and n == router.batch * tokens):
        return router.cached(("entry_rows", n, str(device)), make)
    raise RuntimeError(
        f"mixed batch: a layer whose adapters adapt its parameters got {n} entries for a batch of {router.batch} rows"
        f"{f' of {tokens} tokens' if tokens else ''}; its rows can be told only when it sees the rows first "
        f"({router.batch}) or the (rows, tokens) input flattened row-major ({router.batch}·T, as MoE blocks pass "
        f"their experts); run these adapters in separate calls"
    )


def _split(value: Any, index: torch.Tensor, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.index_select(0, index)
    return value


def _place(full: Any, part: Any, index: torch.Tensor, n: int, whole: bool) -> Any:
    """Put a group's output ``part`` into ``full`` (None: make it) at ``index``; tuples element by element. An
    output with t entries per input entry (a module that flattens its (rows, T, d) input to tokens, as DeepSeek-V3's
    router does) goes to entries index·t … index·t + t − 1."""
    if isinstance(part, (tuple, list)):
        full = full if full is not None else [None] * len(part)
        return type(part)(_place(f, p, index, n, whole) for f, p in zip(full, part))
    if whole or part is None:
        return part
    g = index.numel()
    if not isinstance(part, torch.Tensor) or part.dim() == 0 or part.shape[0] % g:
        raise RuntimeError(
            f"mixed batch: a layer whose adapters adapt its parameters returned {type(part).__name__}"
            f"{list(part.shape) if isinstance(part, torch.Tensor) else ''} for {g} of its {n} entries; "
            f"only outputs with the same number of entries for each input entry can be put back per row"
        )
    t = part.shape[0] // g
    if t > 1:
        index = (index[:, None] * t + torch.arange(t, device=index.device)).reshape(-1)
    if full is None:
        full = part.new_zeros((n * t, *part.shape[1:]))
    return full.index_copy(0, index, part)


def grouped_forward(layer, router, x: torch.Tensor, args: tuple, kwargs: dict, adapting: list) -> Any:
    """The layer's base module run once per group of rows (module docstring).

    Args:
        layer: the :class:`~peftlab.core.layer.AdapterLayer`; router: the batch's router.
        adapting: ``[(j, slot)]``: the router's adapters (index j) whose slot here adapts parameters.
    """
    refused = [(router.adapters[j], s) for j, s in adapting if not s.rows_separable]
    if refused:
        name, slot = refused[0]
        raise RuntimeError(
            f"mixed batch: adapter {name!r} adapts parameters of {type(layer.base_layer).__name__} "
            f"({', '.join(slot.params)}) whose call cannot be split by rows ({type(slot).__name__}; HF PEFT 0.21 "
            f"refuses mixed batches here too); run this adapter in separate calls, or merge it"
        )
    n = x.shape[0]
    rows = entry_rows(router, n, x.device)
    group_of = torch.full(
        (len(router.adapters) + 1,), -1, dtype=torch.long
    )  # last entry: "__base__" rows (-1)
    for g, (j, _) in enumerate(adapting):
        group_of[j] = g
    per_row = group_of[router.row_adapter].to(x.device)
    entry_group = per_row.index_select(0, rows)
    out = None
    for g, running in [(-1, [])] + [(g, [(slot, 1.0)]) for g, (_, slot) in enumerate(adapting)]:
        index = (entry_group == g).nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        whole = index.numel() == n
        part_args = args if whole else tuple(_split(a, index, n) for a in args)
        part_kwargs = kwargs if whole else {k: _split(v, index, n) for k, v in kwargs.items()}
        xs = x if whole else x.index_select(0, index)
        part = layer.adapted_base_forward(running, xs, part_args, part_kwargs)
        out = _place(out, part, index, n, whole)
    return out
