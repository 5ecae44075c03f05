"""``export_peft``: writing a jlora adapter as a PEFT LoRA adapter directory."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from jlora._atomic import atomic_write, fsync_dir
from jlora._config import LoraConfig
from jlora._resolve import Adapted, resolve_sites
from jlora._tensorfile import encode
from jlora.peft._convert import module_names, orientation, to_peft
from jlora.peft._format import (
    CONFIG_FILE,
    MAGNITUDE_SUFFIX,
    PREFIX,
    TASK_TYPES,
    WEIGHTS_FILE,
    factor_key,
)
from jlora.peft._mapping import PeftMapping


def _most_common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def export_peft(
    path: str | os.PathLike[str],
    params: Any,
    config: LoraConfig,
    mapping: PeftMapping,
    *,
    base_model_name_or_path: str | os.PathLike[str] | None = None,
    task_type: str | None = None,
) -> list[str]:
    """Writes the adapters of ``params`` as a PEFT LoRA adapter that ``PeftModel`` loads.

    Each adapted kernel becomes PyTorch module ``mapping.module_for(path)`` with
    ``lora_A = A`` as ``(r, in)`` and ``lora_B = B`` as ``(out, r)`` (N-d axes flattened in
    kernel order; factors swapped for kernels stored ``(out, in)``; ``lora_B`` rows reordered
    where the rule has an ``out_permutation``), so that PEFT's
    ``W + (lora_alpha/r)·lora_B@lora_A`` equals jlora's ``W + (alpha/r)·A@B`` exactly. Per-kernel
    ranks and alphas go to ``rank_pattern`` / ``alpha_pattern`` keyed by exact module names.

    Args:
      path: output directory. A new one appears complete or not at all; over an existing one,
        ``adapter_model.safetensors`` and ``adapter_config.json`` are each replaced atomically.
      params: an adapted tree (from :func:`jlora.init_lora`, trained).
      config: its LoraConfig.
      mapping: kernel paths to PyTorch module names (e.g. ``jlora.peft.LLAMA``).
      base_model_name_or_path: the base model's Hub id or directory (e.g. one written by
        :func:`jlora.models.pretrained.save_pretrained`), recorded so that
        ``peft.AutoPeftModelForCausalLM.from_pretrained(path)`` loads the base by itself.
      task_type: PEFT's ``task_type`` (``"CAUSAL_LM"``, ...); ``None`` keeps
        ``mapping.task_type``. The ``AutoPeftModelFor...`` classes need one.

    Returns:
      The PyTorch module names written, in tree order.

    Raises:
      ValueError: if ``task_type`` is not one of PEFT's :data:`TASK_TYPES`, ``params`` holds
        no adapters, a kernel is left unmapped by ``mapping``, two kernels map to one module,
        the mapping's layout cannot express a kernel's factors, or DoRA magnitudes cannot be
        written (some kernels DoRA and others not; a DoRA kernel whose PyTorch module is laid
        out the other way round).

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = jlora.init_lora(jax.random.key(0), {"fc": {"kernel": jnp.ones((4, 3))}}, cfg)
      >>> export_peft(tempfile.mkdtemp(), p, cfg, jlora.peft.LLAMA)
      ['fc']
      >>> d = tempfile.mkdtemp()
      >>> _ = export_peft(d, p, cfg, jlora.peft.LLAMA, base_model_name_or_path="org/base",
      ...                 task_type="CAUSAL_LM")
      >>> import json, pathlib
      >>> json.loads(pathlib.Path(d, "adapter_config.json").read_text())["task_type"]
      'CAUSAL_LM'
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(
            f"export_peft: task_type {task_type!r} is not one of PEFT's task types {TASK_TYPES}"
        )
    adapted = resolve_sites(params, config)
    dora = _check_adapters(adapted)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    origin: dict[str, str] = {}
    for item in adapted:
        name = item.site.name
        for module, factors in _module_tensors(item, config, mapping):
            if module in origin:
                raise ValueError(
                    f"export_peft: kernels {origin[module]!r} and {name!r} both map to module "
                    f"{module!r}; each PyTorch module holds one adapter. Fix the mapping's rules"
                )
            origin[module] = name
            tensors.update(factors)
            ranks[module] = item.rank
            alphas[module] = config.alpha_for(name)
    modules = list(origin)
    peft_config = _peft_config(
        modules, ranks, alphas, config, mapping, dora, base_model_name_or_path, task_type
    )
    _write(os.fspath(path), encode(tensors), json.dumps(peft_config, indent=2).encode())
    return modules


def _check_adapters(adapted: list[Adapted]) -> bool:
    """Whether the adapters are DoRA (all of them), refusing none or a mix.

    Raises:
      ValueError: if there are no adapters, or only some kernels have DoRA magnitudes.
    """
    if not adapted:
        raise ValueError(
            "export_peft: params hold no LoRA adapters; pass the tree returned by "
            "jlora.init_lora (trained), not the base params"
        )
    dora = [item.site.name for item in adapted if item.site.m is not None]
    if dora and len(dora) != len(adapted):
        raise ValueError(
            f"export_peft: {dora} are DoRA kernels but "
            f"{[i.site.name for i in adapted if i.site.m is None]} are not; PEFT's use_dora is "
            "one switch for the whole adapter. Add magnitudes to all (jlora.add_magnitudes) or "
            "to none"
        )
    return bool(dora)


def _module_tensors(
    item: Adapted, config: LoraConfig, mapping: PeftMapping
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The PyTorch modules one adapted kernel maps to, each with its PEFT state-dict entries.

    Raises:
      ValueError: if the mapping maps the kernel to no module or gives it the wrong number of
        axes, or a DoRA kernel's module is laid out the other way round.
    """
    name = item.site.name
    found = mapping.module_for(name)
    if found is None:
        raise ValueError(
            f"export_peft: kernel {name!r} is adapted, but mapping {mapping.name!r} maps it "
            "to no PyTorch module (no rule matches); add a ModuleRule for it, or leave it "
            "out of LoraConfig.targets"
        )
    template, axes = found
    shape = tuple(item.site.kernel.shape)
    torch_roles = item.roles if axes is None else axes
    if len(torch_roles) != len(shape):
        raise ValueError(
            f"export_peft: mapping {mapping.name!r} gives {name!r} axes {torch_roles}, but "
            f"the kernel has shape {shape}; give one role per axis"
        )
    swap = orientation(name, item.roles, torch_roles)
    embedding = re.fullmatch(config.embed_pattern, name) is not None
    a = np.asarray(jax.device_get(item.site.a))
    b = np.asarray(jax.device_get(item.site.b))
    m = None if item.site.m is None else np.asarray(jax.device_get(item.site.m))
    if m is not None and swap:
        raise ValueError(
            f"export_peft: {name!r} is a DoRA kernel whose PyTorch module has its input and "
            "output axes the other way round; PEFT would normalise over the other axis, so "
            "its magnitude has no PEFT form. Train with LoraConfig(axis_rules="
            "mapping.axis_rules) so jlora normalises as PEFT does, or export the merged "
            "model (merge_params)"
        )
    out = []
    for index, module in module_names(name, template, shape, item.roles):
        lora_a, lora_b = to_peft(a, b, index, swap)
        m_i = None if m is None else m[index].reshape(-1)
        perm = mapping.permutation(name, lora_b.shape[0])
        if perm is not None:  # PyTorch orders this module's output features differently
            lora_b = lora_b[perm]
            m_i = None if m_i is None else m_i[perm]
        entries = {
            factor_key(module, "A", embedding): lora_a,
            factor_key(module, "B", embedding): lora_b,
        }
        if m_i is not None:  # DoRA: one magnitude per output feature of the module
            entries[PREFIX + module + MAGNITUDE_SUFFIX] = m_i
        out.append((module, entries))
    return out


def _peft_config(
    modules: list[str],
    ranks: dict[str, int],
    alphas: dict[str, float],
    config: LoraConfig,
    mapping: PeftMapping,
    dora: bool,
    base_model_name_or_path: str | os.PathLike[str] | None,
    task_type: str | None,
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json``: the most common rank and alpha, the rest as patterns."""
    r0 = _most_common([ranks[m] for m in modules])
    alpha0 = _most_common([alphas[m] for m in modules])
    return {
        "peft_type": "LORA",
        "task_type": mapping.task_type if task_type is None else task_type,
        "r": r0,
        "lora_alpha": alpha0,
        "target_modules": modules,
        "rank_pattern": {re.escape(m): ranks[m] for m in modules if ranks[m] != r0},
        "alpha_pattern": {re.escape(m): alphas[m] for m in modules if alphas[m] != alpha0},
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": mapping.fan_in_fan_out,
        "lora_dropout": config.dropout,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": dora,
        "inference_mode": True,
        "base_model_name_or_path": (
            None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)
        ),
        "revision": None,
    }


def _write(path: str, weights: bytes, config: bytes) -> None:
    # PEFT's file names are fixed, so a save over an existing adapter replaces the two files one
    # at a time (each atomically). A new directory is built beside its final name and renamed
    # into place: all or nothing.
    if os.path.isdir(path):
        atomic_write(os.path.join(path, WEIGHTS_FILE), weights)
        atomic_write(os.path.join(path, CONFIG_FILE), config)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        atomic_write(os.path.join(tmp, WEIGHTS_FILE), weights)
        atomic_write(os.path.join(tmp, CONFIG_FILE), config)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
