r"""The built-in Llama (:mod:`jlora.models.llama`) as a Hugging Face ``LlamaForCausalLM``.

The two compute the same function; only names and one layout differ. jlora's rotary turns
interleaved channel pairs ``(x[2i], x[2i+1])`` of each head; Hugging Face's ``rotate_half``
turns ``(x[i], x[i + head_dim/2])``. Both use the frequency ``theta^(-2i/head_dim)`` for pair
``i``, so reordering every head's query and key output features as ``[evens..., odds...]``
(:func:`rotary_permutation`) makes them agree; the scores ``q·k`` do not change, as q and k are
permuted alike. Everything else maps one to one: RMSNorm ``x / sqrt(mean(x²) + eps) · scale``,
scores scaled by ``1/sqrt(head_dim)``, SwiGLU ``down(silu(gate(x)) · up(x))``, no biases, an
untied LM head, and Flax ``(in, out)`` kernels become PyTorch ``(out, in)`` weights.

The conversion is numpy only; PyTorch and ``transformers`` are imported by :func:`to_hf` alone.
An adapter on the same model goes over with :data:`jlora.peft.BUILTIN_LLAMA`, which applies the
same permutation to the adapters of ``attn/query`` and ``attn/key``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jlora._paths import path_str

if TYPE_CHECKING:  # flax and torch stay unimported here
    from jlora.models.llama import LlamaConfig

__all__ = ["hf_config", "hf_state_dict", "rotary_permutation", "to_hf"]


def rotary_permutation(width: int, n_heads: int) -> np.ndarray:
    """Index array ``perm``: Hugging Face query/key feature ``j`` is jlora's feature ``perm[j]``.

    Per head of ``head_dim = width / n_heads`` features, Hugging Face's order is jlora's even
    features then its odd ones.

    Args:
      width: output features of the query or key projection (``n_heads · head_dim``).
      n_heads: attention heads.

    Returns:
      An int64 permutation of ``range(width)``.

    Raises:
      ValueError: if ``width`` does not split into ``n_heads`` heads of even size.

    Example:
      >>> rotary_permutation(8, 2).tolist()
      [0, 2, 1, 3, 4, 6, 5, 7]
    """
    if n_heads < 1 or width % n_heads or (width // n_heads) % 2:
        raise ValueError(
            f"rotary_permutation: {width} query/key features do not split into {n_heads} heads "
            "of even size; pass the model's LlamaConfig.n_heads (for an adapter, "
            "jlora.peft.builtin_llama(n_heads))"
        )
    head_dim = width // n_heads
    within = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1).astype(np.int64)


def hf_config(config: LlamaConfig) -> dict[str, Any]:
    """Keyword arguments of ``transformers.LlamaConfig`` for the model ``config`` describes.

    Example:
      >>> from jlora.models.llama import LlamaConfig
      >>> kw = hf_config(LlamaConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=48))
      >>> kw["hidden_size"], kw["num_key_value_heads"], kw["tie_word_embeddings"]
      (32, 2, False)
    """
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }


def _names(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each leaf path of the built-in Llama -> (Hugging Face state-dict key, its shape)."""
    d, f, v = config.dim, config.ffn_dim, config.vocab_size
    names = {
        "embed/embedding": ("model.embed_tokens.weight", (v, d)),
        "final_norm/scale": ("model.norm.weight", (d,)),
        "lm_head/kernel": ("lm_head.weight", (d, v)),
    }
    layer = {
        "attn/query/kernel": ("self_attn.q_proj.weight", (d, d)),
        "attn/key/kernel": ("self_attn.k_proj.weight", (d, d)),
        "attn/value/kernel": ("self_attn.v_proj.weight", (d, d)),
        "attn/out/kernel": ("self_attn.o_proj.weight", (d, d)),
        "mlp/gate/kernel": ("mlp.gate_proj.weight", (d, f)),
        "mlp/up/kernel": ("mlp.up_proj.weight", (d, f)),
        "mlp/down/kernel": ("mlp.down_proj.weight", (f, d)),
        "attn_norm/scale": ("input_layernorm.weight", (d,)),
        "mlp_norm/scale": ("post_attention_layernorm.weight", (d,)),
    }
    for i in range(config.n_layers):
        names.update(
            {f"layer_{i}/{k}": (f"model.layers.{i}.{t}", s) for k, (t, s) in layer.items()}
        )
    return names


def hf_state_dict(params: Any, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The ``LlamaForCausalLM`` state dict (numpy arrays) of the built-in Llama's ``params``.

    Kernels are transposed to PyTorch's ``(out, in)``; query and key rows are reordered by
    :func:`rotary_permutation`. Takes the ``"params"`` collection (no adapters: merge them first
    with ``jlora.merge_params``, or keep them apart and export them with ``export_peft``).

    Raises:
      ValueError: if a leaf is missing, unexpected, or of the wrong shape for ``config``.

    Example:
      >>> from jlora.models.llama import LlamaConfig, init_params
      >>> cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=48)
      >>> sd = hf_state_dict(init_params(cfg), cfg)
      >>> sd["model.layers.0.self_attn.q_proj.weight"].shape, len(sd)
      ((32, 32), 12)
    """
    leaves = {path_str(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(params)[0]}
    names = _names(config)
    if set(leaves) != set(names):
        missing, extra = sorted(set(names) - set(leaves)), sorted(set(leaves) - set(names))
        raise ValueError(
            f"hf_state_dict: params do not match the built-in Llama of {config}: missing "
            f"{missing[:4]}, unexpected {extra[:4]}. Pass the base 'params' collection for this "
            "config (merge adapters first with jlora.merge_params)"
        )
    perm = rotary_permutation(config.dim, config.n_heads)
    out: dict[str, np.ndarray] = {}
    for name, (torch_name, shape) in names.items():
        x = leaves[name]
        if x.shape != shape:
            raise ValueError(
                f"hf_state_dict: {name!r} has shape {x.shape}, but {config} needs {shape}"
            )
        if name.endswith("/kernel"):
            x = x.T  # Flax (in, out) -> PyTorch (out, in)
        if name.endswith(("/attn/query/kernel", "/attn/key/kernel")):
            x = x[perm]  # interleaved rotary pairs -> rotate_half's halves
        out[torch_name] = np.ascontiguousarray(x)
    return out


def to_hf(params: Any, config: LlamaConfig, *, attn_implementation: str = "eager") -> Any:
    """A ``transformers.LlamaForCausalLM`` (eval mode) computing the same logits as ``params``.

    Needs the ``peft`` extra (PyTorch, ``transformers<5``). Serve a ``jlora finetune`` adapter
    on it with ``peft.PeftModel.from_pretrained(model, dir)`` after
    ``jlora.export_peft(dir, params, cfg, jlora.peft.BUILTIN_LLAMA)``.

    Args:
      params: the built-in Llama's ``"params"`` collection (base, or merged).
      config: its :class:`~jlora.models.llama.LlamaConfig`.
      attn_implementation: Hugging Face's attention kernel (``"eager"`` or ``"sdpa"``).

    Returns:
      The PyTorch model, float32.
    """
    import torch
    import transformers

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_config(config), attn_implementation=attn_implementation)
    )
    state = {
        k: torch.from_numpy(v.astype(np.float32)) for k, v in hf_state_dict(params, config).items()
    }
    model.load_state_dict(state, strict=True)
    return model.eval()
