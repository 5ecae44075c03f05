"""jlora's own adapter files: only the A/B leaves, plus the config and where they belong.

On disk an adapter is a directory::

    <path>/adapter_config.json             format, version, LoraConfig, weights file + sha256,
                                           and per adapted kernel: path, shape, roles, rank,
                                           scale and the names/shapes/dtypes of A and B
    <path>/adapter-<sha256[:16]>.safetensors  the A/B tensors, named by their "a/b/c" leaf paths

``adapter_config.json`` is the commit point. A save writes the weights under a name derived from
their content, then atomically replaces the JSON, then deletes weights files no longer named.
A crash at any moment leaves a directory whose JSON names a complete weights file (the previous
adapter until the JSON is replaced, the new one after), and the sha256 catches a file damaged
later. No pickle anywhere: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._atomic import atomic_write, fsync_dir
from jlora._attach import check_unadapted, place_adapters
from jlora._axes import axis_roles
from jlora._config import LoraConfig
from jlora._dora import place_magnitudes
from jlora._layout import adapter_keys, adapter_shapes, magnitude_key
from jlora._paths import path_str, some_paths
from jlora._quantized import is_quantized
from jlora._resolve import check_config, resolve_sites
from jlora._tensorfile import decode, encode
from jlora.peft._format import WEIGHTS_FILE as PEFT_WEIGHTS_FILE

FORMAT = "jlora-adapter"
VERSION = 1
CONFIG_FILE = "adapter_config.json"
_WEIGHTS = re.compile(r"adapter-[0-9a-f]{16}\.safetensors")


def _spec(name: str, x: Any) -> dict[str, Any]:
    return {"name": name, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}


def save_adapter(path: str | os.PathLike[str], params: Any, config: LoraConfig) -> None:
    """Saves only the adapter leaves of ``params`` (and ``config``) to the directory ``path``.

    The base weights are not written: an adapter for ``W + s·A·B`` is just every A and B. Saving
    over an existing adapter is atomic: a crash mid-save leaves the previous one loadable.

    Args:
      path: a directory (created if missing).
      params: an adapted tree (from :func:`jlora.init_lora`, possibly trained). Arrays must be
        fully addressable from this process (for multi-host sharded state use
        :func:`jlora.save_checkpoint`).
      config: the config the tree was initialised with.

    Raises:
      ValueError: if ``params`` holds no adapters, an adapter does not fit ``config``, the config
        holds Python predicates (not JSON-able), or ``path`` is an existing file.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> base = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> path = tempfile.mkdtemp()
      >>> save_adapter(path, jlora.init_lora(jax.random.key(0), base, cfg), cfg)
      >>> params, config = load_adapter(path, base)
      >>> sorted(params["dense"]), config == cfg
      (['kernel', 'kernel_lora_a', 'kernel_lora_b'], True)
    """
    path = os.fspath(path)
    adapted = resolve_sites(params, config)
    if not adapted:
        raise ValueError(
            "save_adapter: params hold no LoRA adapters (no '*_lora_a' / '*_lora_b' leaves); "
            "pass the tree returned by jlora.init_lora, not the base params"
        )
    config_dict = config.to_dict()
    tensors: dict[str, np.ndarray] = {}
    entries = []
    for item in adapted:
        site = item.site
        a_key, b_key = adapter_keys(site.key)
        a_name = path_str((*site.parent, jax.tree_util.DictKey(a_key)))
        b_name = path_str((*site.parent, jax.tree_util.DictKey(b_key)))
        tensors[a_name] = np.asarray(jax.device_get(site.a))
        tensors[b_name] = np.asarray(jax.device_get(site.b))
        entry = {
            "kernel": site.name,
            "kernel_shape": list(site.kernel.shape),
            "kernel_dtype": jnp.dtype(site.kernel.dtype).name,
            "roles": list(item.roles),
            "rank": item.rank,
            "scale": item.scale,
            "a": _spec(a_name, site.a),
            "b": _spec(b_name, site.b),
        }
        if site.m is not None:  # DoRA magnitude
            m_name = path_str((*site.parent, jax.tree_util.DictKey(magnitude_key(site.key))))
            tensors[m_name] = np.asarray(jax.device_get(site.m))
            entry["m"] = _spec(m_name, site.m)
        entries.append(entry)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_adapter: {path!r} is a file; an adapter is saved as a directory")
    os.makedirs(path, exist_ok=True)
    data = encode(tensors)
    digest = hashlib.sha256(data).hexdigest()
    weights = f"adapter-{digest[:16]}.safetensors"
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "weights": {"file": weights, "sha256": digest},
        "lora_config": config_dict,
        "adapters": entries,
    }
    atomic_write(os.path.join(path, weights), data)
    atomic_write(os.path.join(path, CONFIG_FILE), json.dumps(manifest, indent=2).encode())
    for name in os.listdir(path):  # weights of earlier saves, no longer named by the JSON
        if _WEIGHTS.fullmatch(name) and name != weights:
            os.unlink(os.path.join(path, name))
    fsync_dir(path)


def _read_manifest(path: str) -> dict[str, Any]:
    where = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(where):
        hint = (
            f" It holds {PEFT_WEIGHTS_FILE}: a PEFT adapter; read it with jlora.import_peft"
            if os.path.isfile(os.path.join(path, PEFT_WEIGHTS_FILE))
            else " Save one with jlora.save_adapter"
        )
        raise FileNotFoundError(f"no jlora adapter at {path!r}: {CONFIG_FILE} is missing.{hint}")
    try:
        with open(where, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON ({err}); the file is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(
            f"{where} is not a jlora adapter manifest: expected format {FORMAT!r}, found "
            f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r}"
        )
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{where} has format version {manifest.get('version')!r}; this jlora reads version "
            f"{VERSION}. Upgrade jlora to read it"
        )
    for key in ("weights", "lora_config", "adapters"):
        if key not in manifest:
            raise ValueError(f"{where} is missing the key {key!r}; the file is corrupted")
    entries = manifest["adapters"]
    fields = ("kernel", "kernel_shape", "a", "b")
    if not isinstance(entries, list) or not all(
        isinstance(e, dict)
        and all(k in e for k in fields)
        and all(isinstance(e[w], dict) and {"name", "shape", "dtype"} <= set(e[w]) for w in "ab")
        for e in entries
    ):
        raise ValueError(
            f"{where}: 'adapters' must be a list of entries with keys {fields}, A and B each "
            "with 'name', 'shape' and 'dtype'; the file is corrupted"
        )
    return manifest


def _read_tensors(path: str, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    weights = manifest["weights"]
    name = str(weights.get("file", ""))
    if not _WEIGHTS.fullmatch(name):
        raise ValueError(f"{CONFIG_FILE} in {path!r} names an invalid weights file {name!r}")
    where = os.path.join(path, name)
    if not os.path.isfile(where):
        raise FileNotFoundError(
            f"{where} is missing: {CONFIG_FILE} names it as this adapter's weights. Copy the "
            "whole adapter directory, not only its JSON"
        )
    with open(where, "rb") as f:
        data = f.read()
    found = hashlib.sha256(data).hexdigest()
    if found != weights.get("sha256"):
        raise ValueError(
            f"{where} is truncated or corrupted: its sha256 is {found[:16]}..., but "
            f"{CONFIG_FILE} expects {str(weights.get('sha256'))[:16]}... ({len(data)} bytes read)"
        )
    return decode(data, where)


def _check_tensors(path: str, entries: list[dict[str, Any]], tensors: dict[str, Any]) -> None:
    specs = {e[w]["name"]: e[w] for e in entries for w in ("a", "b", "m") if w in e}
    for name in specs:
        if name not in tensors:
            raise ValueError(
                f"adapter {path!r}: tensor {name!r} is listed in {CONFIG_FILE} but missing from "
                "the weights file"
            )
    for name in tensors:
        if name not in specs:
            raise ValueError(
                f"adapter {path!r}: the weights file holds an extra tensor {name!r} that "
                f"{CONFIG_FILE} does not list"
            )
    for name, spec in specs.items():
        got = (list(tensors[name].shape), tensors[name].dtype.name)
        if got != (spec["shape"], spec["dtype"]):
            raise ValueError(
                f"adapter {path!r}: tensor {name!r} has shape {got[0]} and dtype {got[1]}, but "
                f"{CONFIG_FILE} lists shape {spec['shape']} and dtype {spec['dtype']}"
            )


def _check_base(
    path: str, entries: list[dict[str, Any]], config: LoraConfig, base_params: Any
) -> dict[str, tuple[str, ...]]:
    """Checks every entry against the base; returns each kernel's axis roles under ``config``."""
    leaves = jax.tree.flatten_with_path(base_params, is_leaf=is_quantized)[0]
    base = {path_str(p): x for p, x in leaves}  # a quantised kernel is one leaf: the kernel
    roles: dict[str, tuple[str, ...]] = {}
    for entry in entries:
        kernel = entry["kernel"]
        if kernel not in base:
            raise ValueError(
                f"adapter {path!r} adapts {kernel!r}, which base_params does not have; was it "
                f"trained on another model? The base has paths such as:\n"
                f"{some_paths(base_params)}"
            )
        shape = tuple(base[kernel].shape)
        if shape != tuple(entry["kernel_shape"]):
            raise ValueError(
                f"adapter {path!r} was trained on {kernel!r} of shape "
                f"{tuple(entry['kernel_shape'])}, but base_params has shape {shape} there; it "
                "belongs to a model of another size"
            )
        rank = config.rank_for(kernel)
        roles[kernel] = axis_roles(kernel, shape, config)
        want = adapter_shapes(shape, roles[kernel], rank)
        got = (tuple(entry["a"]["shape"]), tuple(entry["b"]["shape"]))
        if got != want:
            raise ValueError(
                f"adapter {path!r}: {kernel!r} has A {got[0]} and B {got[1]}, but its config "
                f"(rank {rank}) expects A {want[0]} and B {want[1]}; the file is inconsistent"
            )
    return roles


def load_adapter(
    path: str | os.PathLike[str], base_params: Any, *, config: LoraConfig | None = None
) -> tuple[Any, LoraConfig]:
    """Loads an adapter saved by :func:`save_adapter` onto ``base_params``.

    Every file, tensor name, shape and dtype is checked, and every adapted path and kernel shape
    is checked against ``base_params``, before anything is built; ``base_params`` itself is never
    modified.

    The file records each kernel's rank and scale (``alpha / r``, or ``alpha / sqrt(r)``) as
    well as the config; they must agree. A ``config`` passed in must give every adapted kernel
    the same axis roles, rank and scale: the tree alone shows the rank (A's shape) but not
    alpha or ``use_rslora``, so another alpha would otherwise merge a differently scaled model
    without a word.

    Args:
      path: the adapter directory.
      base_params: the un-adapted parameters of the model the adapter was trained on.
      config: the config you mean to use with the adapter (e.g. the one you trained with), to
        be checked against the recorded one; ``None`` to take the recorded one.

    Returns:
      ``(params, config)``: ``base_params`` with the A/B leaves beside their kernels (as
      :func:`jlora.init_lora` would place them), and the adapter's recorded ``LoraConfig``.

    Raises:
      FileNotFoundError: if the directory, its JSON or its weights file is missing.
      ValueError: for a corrupted or truncated file, a missing or extra tensor, a kernel the
        base lacks or has with another shape, adapters whose shapes do not fit the config, a
        recorded scale the recorded config does not give, a ``config`` that gives a kernel
        another scale, rank or axis roles, or a base that already holds adapters.
      TypeError: if ``config`` is neither a ``LoraConfig`` nor ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> base = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> path = tempfile.mkdtemp()
      >>> save_adapter(path, jlora.init_lora(jax.random.key(0), base, cfg), cfg)
      >>> params, _ = load_adapter(path, base)
      >>> params["dense"]["kernel_lora_b"].shape
      (2, 3)
      >>> _ = load_adapter(path, base, config=jlora.LoraConfig(rank=2, alpha=16.0))
      Traceback (most recent call last):
      ValueError: ... scale 4 (alpha 8 / r, r = 2), but the config given has scale 8 ...
    """
    path = os.fspath(path)
    given = config
    if given is not None and not isinstance(given, LoraConfig):
        raise TypeError(
            f"load_adapter: config must be a LoraConfig or None; got {type(given).__name__}"
        )
    manifest = _read_manifest(path)
    try:
        config = LoraConfig.from_dict(manifest["lora_config"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{CONFIG_FILE} in {path!r} holds an invalid LoraConfig: {err}") from None
    entries = manifest["adapters"]
    tensors = _read_tensors(path, manifest)
    _check_tensors(path, entries, tensors)

    check_unadapted(base_params)
    roles = _check_base(path, entries, config, base_params)
    kernels = [
        (
            e["kernel"],
            tuple(e["kernel_shape"]),
            tuple(e.get("roles", roles[e["kernel"]])),
            int(e.get("rank", e["a"]["shape"][-1])),
            float(e.get("scale", config.scale_for(e["kernel"], e["a"]["shape"][-1]))),
        )
        for e in entries
    ]
    where = f"adapter {path!r}"
    check_config(where, config, kernels, config, f"its {CONFIG_FILE}'s lora_config")
    if given is not None:
        check_config(where, config, kernels, given)
    params = place_adapters(
        base_params,
        {e["kernel"]: (tensors[e["a"]["name"]], tensors[e["b"]["name"]]) for e in entries},
        roles,
        f"adapter {path!r}",
    )
    params = place_magnitudes(
        params, {e["kernel"]: tensors[e["m"]["name"]] for e in entries if "m" in e}
    )
    resolve_sites(params, config)
    return params, config
