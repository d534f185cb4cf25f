"""Pruning scope: which weights of a model DSD prunes, and at which sparsity.

Defaults, as torch.ao.pruning's: every floating parameter of 2 or more dims held by any module
(Linear, Conv*, ConvTranspose*, Hugging Face's Conv1D, user modules), never those of
embeddings or normalisation layers, never biases (1-D). `include` / `exclude` take module
types and regular expressions searched in qualified parameter names ("h\\.\\d+\\.attn"); an
included embedding is prunable. A parameter held by several modules (tied embeddings) is
one weight with one mask, selected only if every module holding it is (by default: none is an
embedding or a norm and none is excluded; with `include`: include matches every holder, and a
warning names the holders it missed), whatever module its gradient comes through. Every
include/exclude rule and sparsity pattern must match some weight (a ValueError names it).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .ops import magnitude_masks
from .ops._common import as_sparsity

NEVER_BY_DEFAULT = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                    nn.GroupNorm, nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class Selected:
    name: str  # the first qualified name of the parameter in model.named_parameters() order
    param: torch.Tensor
    sparsity: float


def _rules(rules, name: str) -> tuple[tuple[type, ...], list[re.Pattern]]:
    if rules is None:
        return (), []
    if isinstance(rules, (str, type)):
        rules = [rules]
    types, patterns = [], []
    for i, rule in enumerate(rules):
        if isinstance(rule, type) and issubclass(rule, nn.Module):
            types.append(rule)
        elif isinstance(rule, str):
            try:
                patterns.append(re.compile(rule))
            except re.error as err:
                raise ValueError(f"{name}[{i}] is not a valid regular expression: {rule!r} ({err})") from err
        else:
            raise TypeError(f"{name}[{i}] must be a module type or a regular expression string, "
                            f"got {type(rule).__name__}")
    return tuple(types), patterns


def _matches(rules, module: nn.Module, qualified: str) -> bool:
    types, patterns = rules
    return (bool(types) and isinstance(module, types)) or any(p.search(qualified) for p in patterns)


def select(model: nn.Module, sparsity, *, include=None, exclude=None) -> list[Selected]:
    """The weights of `model` to prune, each with its sparsity, in named_parameters() order.

    sparsity: one float in [0, 1), or {regular expression: float}: the first pattern found in a
    parameter's qualified name gives its sparsity; a parameter no pattern matches stays dense.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    include_rules, exclude_rules = _rules(include, "include"), _rules(exclude, "exclude")
    if isinstance(sparsity, dict):
        per_pattern = []
        for pattern, value in sparsity.items():
            if not isinstance(pattern, str):
                raise TypeError(f"sparsity keys must be regular expression strings, got {pattern!r}")
            per_pattern.append((re.compile(pattern), as_sparsity(value, f"sparsity[{pattern!r}]",
                                                                   allow_one=False)))
    else:
        per_pattern = [(re.compile(""), as_sparsity(sparsity, allow_one=False))]
    owners: dict[int, list[tuple[str, nn.Module, torch.Tensor]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{local}" if module_name else local
            owners.setdefault(id(param), []).append((qualified, module, param))
    weights = [entries for entries in owners.values()
               if entries[0][2].dim() >= 2 and entries[0][2].is_floating_point()]
    _check_every_rule_matches(weights, include, include_rules, "include")
    _check_every_rule_matches(weights, exclude, exclude_rules, "exclude")
    chosen, used_patterns = [], set()
    for entries in weights:
        param = entries[0][2]
        if include is not None:
            # a shared weight (tied embeddings) is one weight: pruned only if every holder is included
            matched = [_matches(include_rules, m, q) for q, m, _ in entries]
            selected = all(matched)
            if any(matched) and not selected:
                held = ", ".join(f"{q} ({type(m).__name__})" for (q, m, _), hit in zip(entries, matched) if not hit)
                warnings.warn(f"include selects {entries[matched.index(True)][0]} through one of its holders only: "
                              f"it is also held by {held}, so it stays dense; name every holder in include to "
                              f"prune it", UserWarning, stacklevel=3)
        else:
            selected = not any(isinstance(m, NEVER_BY_DEFAULT) for _, m, _ in entries)
        if not selected or any(_matches(exclude_rules, m, q) for q, m, _ in entries):
            continue
        names = [q for q, _, _ in entries]
        found = next(((i, s) for i, (pattern, s) in enumerate(per_pattern) if any(pattern.search(n) for n in names)),
                     None)
        if found is not None:
            used_patterns.add(found[0])
            chosen.append(Selected(min(names, key=_order(model)), param, found[1]))
    if isinstance(sparsity, dict):
        unused = [pattern for i, pattern in enumerate(sparsity) if i not in used_patterns]
        if unused:
            raise ValueError(f"sparsity pattern(s) {unused} match no weight selected for pruning (weights of 2 or "
                             f"more dims; see dk.summary(model) for their names)")
    return chosen


def select_held(model: nn.Module, optimizer, sparsity, *, include=None, exclude=None) -> list[Selected]:
    """select(), checked for a scheduler: some weight is selected, and the optimizer holds every one
    (a ValueError naming the first missing ones otherwise)."""
    selected = select(model, sparsity, include=include, exclude=exclude)
    if not selected:
        raise ValueError("the scope selects no weight of the model to prune (include, exclude and sparsity "
                         "together); see dk.summary(model) for the weights and their module types")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [s.name for s in selected if id(s.param) not in held]
    if missing:
        raise ValueError(f"the optimizer does not hold {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}, selected for pruning")
    return selected


def _check_every_rule_matches(weights, given, rules, name: str) -> None:
    """Every include/exclude rule must match some weight: a typo would otherwise prune all or nothing."""
    if given is None:
        return
    types, patterns = rules
    for rule in list(types) + list(patterns):
        alone = ((rule,), []) if isinstance(rule, type) else ((), [rule])
        if not any(_matches(alone, m, q) for entries in weights for q, m, _ in entries):
            shown = rule.__name__ if isinstance(rule, type) else repr(rule.pattern)
            raise ValueError(f"{name} rule {shown} matches no weight of the model (weights of 2 or more dims; "
                             f"see dk.summary(model) for their names and module types)")


def _order(model: nn.Module):
    index = {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    return lambda name: index.get(name, len(index))


def check_selection(selected: list[Selected], scope: str = "layer") -> None:
    """Every reason the selected weights cannot be pruned as asked, found before anything prunes
    (DSDScheduler checks at construction): one error naming every offending weight by its name.
    - an N:M sparsity needs rows (shape[0], -1) of a whole number of groups of M;
    - N:M masks of sharded (DTensor) weights are not supported yet;
    - scope="global" takes one fractional sparsity for all weights (one threshold)."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    from .masks import mask_rows_cols
    from .ops._common import any_dtensor, nm_pattern
    patterns = [s for s in selected if isinstance(s.sparsity, str)]
    if patterns and any_dtensor([s.param for s in patterns]):
        raise NotImplementedError(f"N:M sparsity of sharded (DTensor, FSDP2) weights is not supported yet "
                                  f"({', '.join(s.name for s in patterns[:3])}{' ...' if len(patterns) > 3 else ''}"
                                  f"): give them a fractional sparsity")
    misfits = []
    for s in patterns:
        m = nm_pattern(s.sparsity)[1]
        rows, cols = mask_rows_cols(s.param.shape)
        if cols % m:
            misfits.append(f"{s.name} {tuple(s.param.shape)} (rows of {cols}, sparsity {s.sparsity!r})")
    if misfits:
        raise ValueError(f"an N:M sparsity needs rows (shape[0], -1) whose length is a multiple of M; "
                         f"{len(misfits)} selected weight(s) have none: {'; '.join(misfits)}. Leave them out "
                         f"(exclude=[...]) or give them a fraction in a sparsity dict ({{pattern: 0.5}})")
    if scope == "global" and len(selected) > 1:
        values = {s.sparsity for s in selected}
        if patterns and len(patterns) != len(selected):
            raise ValueError(f"scope='global' prunes with one threshold over all weights: it cannot mix N:M "
                             f"patterns ({', '.join(s.name for s in patterns[:3])}) with fractions; use "
                             f"scope='layer', or one fraction for all")
        if not patterns and len(values) != 1:
            raise ValueError(f"scope='global' takes one sparsity for all weights (one threshold over all of "
                             f"them), got {sorted(values)} from the sparsity dict; use scope='layer' for one "
                             f"sparsity per pattern")


def masks_for(selected: list[Selected], *, scope: str = "layer", block=None) -> dict[torch.Tensor, "object"]:
    """Exact magnitude masks of the selected weights: per layer (each at its sparsity; with
    block=(bh, bw) exactly round(s * tiles) whole tiles, see magnitude_masks), or with
    scope="global" one threshold over all of them (round(s * total) pruned, the same tie rule:
    lowest index first in the weights' concatenation), which needs one sparsity for all."""
    check_selection(selected, scope)
    if not selected:
        return {}
    if scope == "layer" or all(isinstance(s.sparsity, str) for s in selected):  # N:M is per group anyway
        by_device: dict[torch.device, list[Selected]] = {}
        for s in selected:
            by_device.setdefault(s.param.device, []).append(s)
        masks = {}
        for group in by_device.values():
            found = magnitude_masks([s.param for s in group], [s.sparsity for s in group], block=block)
            masks.update({s.param: m for s, m in zip(group, found)})
        return masks
    if scope != "global":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    from .masks import Mask
    sparsity, flat = _global_pool(selected, [s.param.detach().reshape(-1) for s in selected])
    keep = magnitude_masks(flat, sparsity)[0].to_bool()
    masks, start = {}, 0
    for s in selected:
        n = s.param.numel()
        masks[s.param] = Mask.from_bool(keep[start:start + n].reshape(s.param.shape))
        start += n
    return masks


def grown_masks(selected: list[Selected], prior: dict, *, scope: str = "layer") -> dict[torch.Tensor, "object"]:
    """masks_for, growing the `prior` masks ({param: Mask}) of a gradual prune: every weight they
    prune stays pruned, and the survivors' smallest |w| (the same tie rule, in the survivors'
    order) are pruned on top, so that exactly round(s * numel) are pruned per layer (scope="global":
    round(s * total) over all). A mask only grows: where prior already prunes more, it is kept."""
    check_selection(selected, scope)
    if not any(s.param in prior for s in selected):
        return masks_for(selected, scope=scope)
    from .masks import Mask
    keeps = [prior[s.param].to_bool().reshape(-1) if s.param in prior else
             torch.ones(s.param.numel(), dtype=torch.bool, device=s.param.device) for s in selected]
    survivors = [s.param.detach().reshape(-1)[keep] for s, keep in zip(selected, keeps)]
    if scope == "global":
        sparsity, pool = _global_pool(selected, survivors)
        total = sum(s.param.numel() for s in selected)
        chosen = _survivors_kept([pool], [round(sparsity * total) - (total - pool.numel())])[0]
        kept_parts = chosen.split([v.numel() for v in survivors])
    elif scope == "layer":
        counts = [round(s.sparsity * s.param.numel()) - (s.param.numel() - v.numel()) for s, v in zip(selected, survivors)]
        kept_parts = _survivors_kept(survivors, counts)
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    masks = {}
    for s, keep, kept in zip(selected, keeps, kept_parts):
        grown = keep.clone()
        grown[keep] = kept
        masks[s.param] = Mask.from_bool(grown.reshape(s.param.shape))
    return masks


def _global_pool(selected: list[Selected], parts: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(the one sparsity of a global prune, the 1-D `parts` of the selected weights concatenated in
    their promoted dtype)."""
    values = {s.sparsity for s in selected}
    if len(values) != 1:
        raise ValueError(f"scope='global' takes one sparsity for all weights, got {sorted(values)}")
    from functools import reduce
    dtype = reduce(torch.promote_types, (s.param.dtype for s in selected))
    return values.pop(), torch.cat([v.to(dtype) for v in parts])


def _survivors_kept(survivors: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Keep-flags of 1-D survivor tensors with `counts[i]` more of each pruned by magnitude (one
    selection call per device)."""
    kept = [torch.ones(v.numel(), dtype=torch.bool, device=v.device) for v in survivors]
    by_device: dict[torch.device, list[int]] = {}
    for i, (v, count) in enumerate(zip(survivors, counts)):
        if count > 0 and v.numel() > 0:
            by_device.setdefault(v.device, []).append(i)
    for index in by_device.values():
        # count / numel: round(fraction * numel) gives back exactly count
        found = magnitude_masks([survivors[i] for i in index],
                                [min(counts[i], survivors[i].numel()) / survivors[i].numel() for i in index])
        for i, mask in zip(index, found):
            kept[i] = mask.to_bool().reshape(-1)
    return kept


def warn_without_model(caller: str, stacklevel: int = 2) -> None:
    """The warning of a prune given no model=: module types (embeddings, norms) cannot be known."""
    warnings.warn(f"{caller} without model=: every weight of 2 or more dims the optimizer holds is pruned, "
                  f"embeddings and norms included, since module types cannot be known; pass model=your_model for "
                  f"the default scope (Linear, Conv and other weights; never embeddings or norms), as the trainer "
                  f"callbacks use", UserWarning, stacklevel=stacklevel + 1)


def summary(model: nn.Module, masks=None) -> str:
    """A table, one row per weight of 2 or more dims: qualified name, module type, shape, elements,
    measured sparsity (exact zeros), whether the scope prunes it (a DSDScheduler's own selection when
    `masks` is one, also while it is dense; else the default scope), and where its mask
    lives (a MaskedLinear module, or "optimizer": one of `masks`, applied around the step). masks: None, a DSDScheduler, a
    MaskedSGD/MaskedAdamW, an OptimizerMasks, or a {param: Mask} dict."""
    selected = getattr(masks, "selected", None)  # a DSDScheduler's own selection, also while dense
    if selected is not None:
        scope, scope_name = {id(s.param) for s in selected}, "scheduler's scope"
    else:
        scope, scope_name = {id(s.param) for s in select(model, 0.5)}, "default scope"
    masks = {id(p): "optimizer" for p in _masks_of(masks)}
    rows = [("weight", "module", "shape", "elements", "zeros", scope_name, "mask")]
    seen = set()
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            mask = "module" if getattr(module, "mask_words", None) is not None and local == "weight" else \
                masks.get(id(p), "-")
            zeros = float((p.detach() == 0).float().mean()) if p.numel() else 0.0
            rows.append((f"{module_name}.{local}" if module_name else local, type(module).__name__,
                         "x".join(map(str, p.shape)), str(p.numel()), f"{zeros:.1%}",
                         "pruned" if id(p) in scope else "dense", mask))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _masks_of(source) -> dict:
    """The {param: Mask} of whatever holds masks; a TypeError for anything it cannot read."""
    if source is None:
        return {}
    held = source if isinstance(source, dict) else getattr(source, "masks", None)
    if not isinstance(held, dict) or not all(isinstance(p, torch.Tensor) for p in held):
        raise TypeError(f"summary: masks must be a DSDScheduler, MaskedSGD/MaskedAdamW, OptimizerMasks or a "
                        f"{{param: Mask}} dict, got {type(source).__name__}")
    return held


def adopt_torch_prune(model: nn.Module) -> dict:
    """Take over weights pruned with torch.nn.utils.prune: every `<name>_orig` / `<name>_mask`
    reparametrisation is made permanent (torch.nn.utils.prune.remove: the parameter object the
    optimizer holds becomes the plain `<name>` again, its pruned entries 0) and its mask returned
    as ours, {param: Mask}, to give to MaskedSGD.set_masks or OptimizerMasks.set_masks."""
    from torch.nn.utils import prune

    from .masks import Mask
    adopted = {}
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod) or isinstance(hook, prune.PruningContainer):
                name = hook._tensor_name
                keep = getattr(module, f"{name}_mask").detach() != 0
                prune.remove(module, name)
                param = getattr(module, name)
                adopted[param] = Mask.from_bool(keep)
    return adopted
