"""``import_peft``: reading a PEFT LoRA adapter directory onto a JAX base tree.

Everything is checked before anything is built: the config's options (DoRA, trained biases,
``modules_to_save`` and other non-LoRA parts are refused, not dropped), every key (a key that
is not a LoRA factor, or names a module the mapping gives no kernel for, is an error), every
factor's rank against ``r`` / ``rank_pattern``, and every shape against the base kernel.

Full weights PEFT saves beside the factors (``save_embedding_layers``: ``<module>.base_layer.
weight`` of an adapted ``lm_head`` / ``embed_tokens``, ``<module>.weight`` of an un-adapted one)
are accepted only where they equal the base kernel, compared in PyTorch's layout.

``fan_in_fan_out`` is not needed to read the factors: PEFT's ``lora_A`` is ``(r, in)`` and
``lora_B`` ``(out, r)`` whatever it says. It only tells PEFT how ``B@A`` lies on the stored
weight, and PEFT resets it from the layer type (``Conv1D``: true, ``Linear``: false), so a file
saying false over GPT-2's ``Conv1D`` loads into PEFT exactly as one saying true. The kernel's
layout on the JAX side comes from the mapping's axes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jlora._attach import check_unadapted, place_adapters
from jlora._axes import axis_roles
from jlora._config import LoraConfig
from jlora._dora import place_peft_magnitudes
from jlora._layout import adapter_shapes, axes_of, fans
from jlora._paths import path_str
from jlora._resolve import check_config, resolve_sites
from jlora._tensorfile import decode
from jlora.peft._convert import from_peft, module_names, orientation, peft_shapes
from jlora.peft._format import (
    BASE_SUFFIX,
    CONFIG_FILE,
    COPY_SUFFIX,
    MAGNITUDE_SUFFIX,
    PICKLE_FILE,
    PREFIX,
    WEIGHTS_FILE,
    factor_key,
    parse_key,
    pattern_value,
)
from jlora.peft._mapping import PeftMapping

# Options that add something a LoRA A/B pair cannot hold: refused, never silently dropped.
_UNSUPPORTED = {
    "lora_bias": "trained LoRA biases",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "layer_replication": "layer replication",
    "target_parameters": "adapters on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
}


# (shape, jlora roles or () until needed, the mapping's PyTorch axes or None) per kernel path.
_Kernels = dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...] | None]]
# module -> (kernel path, stack index)
_Owners = dict[str, tuple[str, tuple[int, ...]]]


def _read_config(path: str) -> dict[str, Any]:
    where = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"no PEFT adapter at {path!r}: {CONFIG_FILE} is missing")
    try:
        with open(where, encoding="utf-8") as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON ({err}); the file is corrupted") from None
    if isinstance(cfg, dict) and cfg.get("format") == "jlora-adapter":
        raise ValueError(f"{path!r} is a jlora adapter, not a PEFT one; use jlora.load_adapter")
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        found = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{where}: expected peft_type 'LORA', found {found!r}")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(
                f"{where} sets {key}={cfg[key]!r}: {what}, which a jlora LoRA adapter cannot "
                "hold. Re-train or re-save the adapter without it"
            )
    if cfg.get("bias", "none") != "none":
        raise ValueError(
            f"{where} sets bias={cfg['bias']!r}: trained biases are not LoRA factors and jlora "
            "does not import them; use an adapter trained with bias='none'"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise ValueError(f"{where}: {key!r} must be a number; found {cfg.get(key)!r}")
    return cfg


def _read_factors(path: str) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    where = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(where):
        pickled = os.path.isfile(os.path.join(path, PICKLE_FILE))
        hint = (
            " It holds adapter_model.bin, a pickle, which jlora never reads; re-save it with "
            "save_pretrained(..., safe_serialization=True)"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path!r}.{hint}")
    with open(where, "rb") as f:
        tensors = decode(f.read(), where)
    modules: dict[str, dict[str, Any]] = {}
    base_copies: dict[str, np.ndarray] = {}  # full weights by key (save_embedding_layers)
    for key, value in sorted(tensors.items()):  # file order is not meaningful
        if key.startswith(PREFIX) and key.endswith(MAGNITUDE_SUFFIX):  # DoRA
            module = key[len(PREFIX) : -len(MAGNITUDE_SUFFIX)]
            modules.setdefault(module, {"embedding": False})["m"] = value
            continue
        if key.startswith(PREFIX) and key.endswith(BASE_SUFFIX):
            base_copies[key] = value
            continue
        parsed = parse_key(key)
        if parsed is None and key.startswith(PREFIX) and key.endswith(COPY_SUFFIX):
            # A whole module's weight: PEFT's save_embedding_layers copy of an un-adapted
            # embed_tokens / lm_head; checked against the base once the mapping is known.
            base_copies[key] = value
            continue
        if parsed is None:
            raise ValueError(
                f"{where}: key {key!r} is not a LoRA factor (expected "
                f"'base_model.model.<module>.lora_A.weight' / '.lora_B.weight' / "
                "'.lora_embedding_A' / '.lora_embedding_B'); jlora imports LoRA factors only"
            )
        module, which, embedding = parsed
        entry = modules.setdefault(module, {"embedding": embedding})
        if value.ndim != 2:
            raise ValueError(f"{where}: {key!r} has shape {value.shape}; LoRA factors are 2-D")
        entry[which] = value
    for module, entry in modules.items():
        for which in ("A", "B"):
            if which not in entry:
                key = factor_key(module, which, entry["embedding"])
                raise ValueError(f"{where}: {key!r} is missing; module {module!r} needs A and B")
    return modules, base_copies


def _torch_weight(kernel: np.ndarray, roles: tuple[str, ...], embedding: bool) -> np.ndarray:
    """One module's slice of a kernel as PyTorch stores it: ``(out, in)``, embeddings ``(in, out)``.

    PEFT copies only ``nn.Linear`` / ``nn.Embedding`` weights (its ``has_valid_embedding_base_
    layer``), so the layer type, not ``fan_in_fan_out``, fixes the layout.
    """
    order = ("in", "out") if embedding else ("out", "in")
    axes = [i for role in order for i, r in enumerate(roles) if r == role]
    fan_in, fan_out = fans(kernel.shape, roles)
    return kernel.transpose(axes).reshape((fan_in, fan_out) if embedding else (fan_out, fan_in))


def _check_base_copies(
    path: str,
    base_copies: dict[str, np.ndarray],
    modules: dict[str, dict[str, Any]],
    owners: dict[str, tuple[str, tuple[int, ...]]],
    roles_of: Callable[[str], tuple[str, ...]],
    embed_pattern: str,
    base: dict[str, Any],
) -> None:
    """Accepts PEFT's copies of base weights only where they equal base_params' own.

    PEFT's ``save_embedding_layers="auto"`` writes the full weight of every targeted
    ``embed_tokens`` / ``lm_head`` (``<module>.base_layer.weight``), tied or not; with ``True``
    also un-targeted ones (``<module>.weight``). A copy equal to the base adds nothing; one that
    differs is a trained or resized table, which a LoRA adapter cannot hold.
    """
    for key, value in base_copies.items():
        adapted = key.endswith(BASE_SUFFIX)
        module = key[len(PREFIX) : -len(BASE_SUFFIX if adapted else COPY_SUFFIX)]
        if module not in owners or adapted != (module in modules):
            where = "adapted" if adapted else "un-adapted"
            raise ValueError(
                f"{path!r}: key {key!r} is not a LoRA factor: it holds full weights of module "
                f"{module!r}, but no {where} kernel of base_params maps to that module for it to "
                "be a copy of (PEFT copies only adapted modules' weights as '<module>.base_layer."
                "weight', and un-adapted embed_tokens / lm_head as '<module>.weight'). jlora "
                "imports LoRA factors only: fix the mapping, or, if that module is unchanged, "
                "re-save with save_pretrained(..., save_embedding_layers=False)"
            )
        kernel, index = owners[module]
        roles = roles_of(kernel)  # PyTorch's roles: the mapping's axes, else jlora's
        embedding = modules[module]["embedding"] if adapted else re.fullmatch(embed_pattern, kernel)
        stack = axes_of(roles, "stack")
        layer = np.moveaxis(np.asarray(base[kernel], np.float32), stack, range(len(stack)))[index]
        inner = tuple(r for r in roles if r != "stack")
        ours = _torch_weight(layer, inner, bool(embedding))
        theirs = value.astype(np.float32)
        what = "embedding table" if embedding else "kernel"
        copy = (
            f"{path!r}: key {key!r} holds full base weights, PEFT's copy of the {what} "
            f"{kernel!r} that differs from base_params'"
        )
        if ours.shape != theirs.shape:
            raise ValueError(
                f"{copy} in shape: {theirs.shape} against {ours.shape} (in PyTorch's layout). "
                "The vocabulary was resized or the adapter belongs to another model; a LoRA "
                "adapter cannot hold that. Import onto the base it was trained from"
            )
        if not np.allclose(ours, theirs, rtol=1e-2, atol=1e-3):
            worst = float(np.max(np.abs(ours - theirs)))
            raise ValueError(
                f"{copy} by up to {worst:.3g} (largest |weight| {float(np.max(np.abs(ours))):.3g};"
                " equal means within rtol 1e-2, atol 1e-3). Either base_params is not the base "
                "the adapter was trained on (import onto that one), or the module itself was "
                "trained, which a LoRA adapter cannot hold (merge the adapter in PyTorch with "
                "merge_and_unload and convert the whole model instead)"
            )


def _roles(
    name: str, shape: tuple[int, ...], config: LoraConfig, mapping: PeftMapping
) -> tuple[str, ...]:
    try:
        return axis_roles(name, shape, config)
    except ValueError:
        raise ValueError(
            f"kernel {name!r} of shape {shape}: mapping {mapping.name!r} does not say which of its "
            "axes are 'stack', 'in' and 'out', and jlora has no default for it. Give its "
            "ModuleRule axes, e.g. ModuleRule(pattern, module, axes=('stack', 'in', 'out'))"
        ) from None


def import_peft(
    path: str | os.PathLike[str],
    base_params: Any,
    mapping: PeftMapping,
    *,
    config: LoraConfig | None = None,
) -> tuple[Any, LoraConfig]:
    """Reads a PEFT LoRA adapter (``save_pretrained`` output) onto a JAX base tree.

    The inverse of :func:`jlora.export_peft`: each module's ``lora_A`` ``(r, in)`` and
    ``lora_B`` ``(out, r)`` become A and B beside the kernel that ``mapping`` maps to that
    module, and a LoraConfig with PEFT's ``r``, ``lora_alpha``, per-kernel ranks and alphas
    and ``use_rslora`` is built, so ``jlora.merge_params`` gives PEFT's merged weights. A DoRA
    adapter (``use_dora``) brings each module's ``lora_magnitude_vector`` as ``k_lora_m``.

    A ``config`` passed in is checked against the one the file gives: every adapted kernel must
    get the same axis roles, rank and scale (``lora_alpha / r``, ``alpha_pattern``,
    ``use_rslora``), since the tree shows only the rank.

    Args:
      path: the PEFT adapter directory.
      base_params: the un-adapted JAX parameters of the model the adapter was trained on.
      mapping: kernel paths to PyTorch module names (e.g. ``jlora.peft.BERT``).
      config: the config you mean to use with the adapter, to be checked; ``None`` to take the
        file's.

    Returns:
      ``(params, config)``: the adapted tree and its LoraConfig (targets are the exact kernel
      paths; the config can be saved with :func:`jlora.save_adapter`).

    Raises:
      FileNotFoundError: if the directory or a file is missing.
      ValueError: for a corrupted file, unsupported PEFT options, a key that is not a LoRA
        factor or names a module no base kernel maps to, a missing factor, a rank that differs
        from the config's, a shape that does not fit the base kernel, or DoRA magnitudes that
        are partial or belong to a module laid out the other way round, a copy of a base
        weight that differs from ``base_params``, or a ``config`` that gives a kernel another
        scale, rank or axis roles than the file.
      TypeError: if ``config`` is neither a ``LoraConfig`` nor ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> base = {"fc": {"kernel": jnp.ones((4, 3))}}
      >>> d = tempfile.mkdtemp()
      >>> _ = jlora.export_peft(d, jlora.init_lora(jax.random.key(0), base, cfg), cfg,
      ...                       jlora.peft.LLAMA)
      >>> params, config = import_peft(d, base, jlora.peft.LLAMA)
      >>> params["fc"]["kernel_lora_a"].shape, config.rank
      ((4, 2), 2)
    """
    path = os.fspath(path)
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(
            f"import_peft: config must be a LoraConfig or None; got {type(config).__name__}"
        )
    config_given = config
    cfg = _read_config(path)
    modules, base_copies = _read_factors(path)
    check_unadapted(base_params)
    roles_config = LoraConfig(axis_rules=mapping.axis_rules)
    owners, kernels = _mapped_kernels(base_params, mapping, roles_config)
    per_kernel = _modules_by_kernel(path, modules, owners, mapping)

    def roles_of(kernel: str) -> tuple[str, ...]:
        shape, roles, axes = kernels[kernel]
        return roles or axes or _roles(kernel, shape, roles_config, mapping)

    if base_copies:
        leaves = {path_str(p): x for p, x in jax.tree.flatten_with_path(base_params)[0]}
        _check_base_copies(
            path, base_copies, modules, owners, roles_of, roles_config.embed_pattern, leaves
        )

    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    magnitudes: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    kernel_roles: dict[str, tuple[str, ...]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dtype = next(iter(modules.values()))["A"].dtype if modules else np.dtype(np.float32)
    for kernel, slices in per_kernel.items():
        shape, _, axes = kernels[kernel]
        roles = roles_of(kernel)
        swap = orientation(kernel, roles, axes or roles)
        with_m = _magnitudes(path, kernel, slices, modules, bool(cfg.get("use_dora")))
        if with_m:
            magnitudes[kernel] = with_m
        rank, alpha, slice_alpha = _rank_and_alpha(
            path, kernel, slices, modules, shape, roles, swap, cfg
        )
        factors[kernel] = _stacked_factors(
            slices, modules, shape, roles, swap, rank, alpha, slice_alpha, dtype
        )
        kernel_roles[kernel] = roles
        ranks[kernel], alphas[kernel] = rank, alpha

    if not factors:
        raise ValueError(f"{path!r}: the adapter holds no LoRA factors")
    config = _file_config(cfg, ranks, alphas, dtype, mapping)
    if config_given is not None:
        kernels_used = [
            (k, kernels[k][0], kernel_roles[k], ranks[k], config.scale_for(k, ranks[k]))
            for k in factors
        ]
        check_config(f"PEFT adapter {path!r}", config, kernels_used, config_given)
    params = place_adapters(base_params, factors, kernel_roles, f"PEFT adapter {path!r}")
    if magnitudes:
        params = place_peft_magnitudes(params, config, magnitudes)
    resolve_sites(params, config)
    return params, config


def _mapped_kernels(
    base_params: Any, mapping: PeftMapping, roles_config: LoraConfig
) -> tuple[_Owners, _Kernels]:
    """The base kernels ``mapping`` maps to PyTorch modules, and each module's kernel."""
    owners: _Owners = {}
    kernels: _Kernels = {}
    for keypath, leaf in jax.tree.flatten_with_path(base_params)[0]:
        shape = tuple(getattr(leaf, "shape", ()))
        name = path_str(keypath)
        found = mapping.module_for(name) if len(shape) >= 2 else None
        if found is None:
            continue
        template, axes = found
        if "{layer}" not in template:
            owners[template] = (name, ())
            kernels[name] = (shape, (), axes)
            continue
        roles = axes or _roles(name, shape, roles_config, mapping)
        kernels[name] = (shape, roles, axes)
        for index, module in module_names(name, template, shape, roles):
            owners[module] = (name, index)
    return owners, kernels


def _modules_by_kernel(
    path: str, modules: dict[str, dict[str, Any]], owners: _Owners, mapping: PeftMapping
) -> dict[str, dict[tuple[int, ...], str]]:
    """Each kernel's modules by stack index; B's (and m's) rows put back in jlora's order.

    Raises:
      ValueError: for a module no kernel of the base maps to.
    """
    per_kernel: dict[str, dict[tuple[int, ...], str]] = {}
    for module, entry in modules.items():
        if module not in owners:
            key = factor_key(module, "A", entry["embedding"])
            known = ", ".join(sorted(owners)[:6]) or "none"
            raise ValueError(
                f"{path!r}: key {key!r} names module {module!r}, but mapping {mapping.name!r} "
                f"maps no kernel of base_params to it (it maps e.g. {known}). Was the adapter "
                "trained on another model, or does the mapping need another rule?"
            )
        kernel, index = owners[module]
        per_kernel.setdefault(kernel, {})[index] = module
        perm = mapping.permutation(kernel, entry["B"].shape[0])
        if perm is not None:  # back from PyTorch's order of the output features to jlora's
            inverse = np.argsort(perm)
            entry["B"] = entry["B"][inverse]
            if "m" in entry:
                entry["m"] = entry["m"][inverse]
    return per_kernel


def _magnitudes(
    path: str,
    kernel: str,
    slices: dict[tuple[int, ...], str],
    modules: dict[str, dict[str, Any]],
    use_dora: bool,
) -> dict[tuple[int, ...], np.ndarray]:
    """The kernel's DoRA magnitudes by stack index (empty without DoRA).

    Raises:
      ValueError: if the file's ``use_dora`` and the magnitudes present disagree.
    """
    with_m = {
        index: modules[module]["m"] for index, module in slices.items() if "m" in modules[module]
    }
    if bool(with_m) != use_dora or (with_m and len(with_m) != len(slices)):
        raise ValueError(
            f"{path!r}: use_dora is {use_dora} but kernel {kernel!r} has "
            f"lora_magnitude_vector for {len(with_m)} of its {len(slices)} modules; the files "
            "do not belong together"
        )
    return with_m


def _rank_and_alpha(
    path: str,
    kernel: str,
    slices: dict[tuple[int, ...], str],
    modules: dict[str, dict[str, Any]],
    shape: tuple[int, ...],
    roles: tuple[str, ...],
    swap: bool,
    cfg: dict[str, Any],
) -> tuple[int, float, dict[str, float]]:
    """The kernel's one rank and alpha, and each module's alpha, its factors' shapes checked.

    Raises:
      ValueError: for a rank other than the file's config gives, layers of different ranks,
        or factors that do not fit the kernel.
    """
    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rank, alpha = 0, 0.0
    slice_alpha: dict[str, float] = {}
    for module in slices.values():
        want_r = int(pattern_value(rank_pattern, module, r0))
        got_r = modules[module]["A"].shape[0]
        key = factor_key(module, "A", modules[module]["embedding"])
        if got_r != want_r:
            raise ValueError(
                f"{path!r}: {key!r} has rank {got_r}, but the adapter's config gives module "
                f"{module!r} rank {want_r} (r / rank_pattern); the files do not belong "
                "together"
            )
        if rank and got_r != rank:
            raise ValueError(
                f"{path!r}: the layers of stacked kernel {kernel!r} have ranks {rank} and "
                f"{got_r}; one jlora kernel holds one rank"
            )
        slice_alpha[module] = float(pattern_value(alpha_pattern, module, alpha0))
        rank, alpha = got_r, alpha or slice_alpha[module]
        want_a, want_b = peft_shapes(shape, roles, swap, got_r)
        got = (modules[module]["A"].shape, modules[module]["B"].shape)
        if got != (want_a, want_b):
            raise ValueError(
                f"{path!r}: module {module!r} has lora_A {got[0]} and lora_B {got[1]}, but "
                f"kernel {kernel!r} of shape {shape} (roles {roles}) needs lora_A {want_a} "
                f"and lora_B {want_b} at rank {got_r}; was it trained on another model size?"
            )
    return rank, alpha, slice_alpha


def _stacked_factors(
    slices: dict[tuple[int, ...], str],
    modules: dict[str, dict[str, Any]],
    shape: tuple[int, ...],
    roles: tuple[str, ...],
    swap: bool,
    rank: int,
    alpha: float,
    slice_alpha: dict[str, float],
    dtype: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Jlora's A and B for the kernel, each module's factors at its stack index."""
    full_a, full_b = adapter_shapes(shape, roles, rank)
    ns = roles.count("stack")
    a_shape, b_shape = full_a[ns:], full_b[ns:]  # one stack entry's (as PEFT stores it)
    a = np.zeros(full_a, dtype)  # layers PEFT left out get a zero update
    b = np.zeros(full_b, dtype)
    for index, module in slices.items():
        m = modules[module]
        a[index], b[index] = from_peft(m["A"], m["B"], a_shape, b_shape, swap)
        if slice_alpha[module] != alpha:  # one alpha per jlora kernel: fold the ratio into B
            b[index] *= np.asarray(slice_alpha[module] / alpha, dtype)
    return a, b


def _file_config(
    cfg: dict[str, Any],
    ranks: dict[str, int],
    alphas: dict[str, float],
    dtype: Any,
    mapping: PeftMapping,
) -> LoraConfig:
    """The LoraConfig the file gives: PEFT's r and alpha, per-kernel exceptions as patterns."""
    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    return LoraConfig(
        rank=r0,
        alpha=alpha0,
        targets=tuple(re.escape(k) for k in ranks),
        rank_pattern={re.escape(k): r for k, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(k): a for k, a in alphas.items() if a != alpha0},
        use_rslora=bool(cfg.get("use_rslora", False)),
        dtype=np.dtype(dtype).name,
        dropout=float(cfg.get("lora_dropout") or 0.0),
        axis_rules=mapping.axis_rules,
    )
