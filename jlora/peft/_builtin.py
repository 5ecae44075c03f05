"""Mappings for jlora's own built-in models (``jlora.models``) to their PyTorch counterparts.

``BUILTIN_BERT`` maps :class:`jlora.models.bert.Bert` (all-MiniLM-L6-v2 and any BERT loaded with
``load_bert``) onto ``transformers.BertModel``, the class ``AutoModel`` gives for
``sentence-transformers/all-MiniLM-L6-v2``, so an adapter trained in JAX serves from PyTorch
with ``PeftModel.from_pretrained(BertModel.from_pretrained(...), adapter_dir)``. For a
``BertFor...`` head model (module names prefixed ``bert.``), use
``BUILTIN_BERT.with_prefix("bert.")``.

``BUILTIN_LLAMA`` maps :class:`jlora.models.llama.Llama` (the ``jlora finetune`` default) onto
the ``transformers.LlamaForCausalLM`` that :func:`jlora.models.llama_hf.to_hf` builds from the
same base. Its rotary layout differs (interleaved pairs against ``rotate_half``), so query and
key adapters have their output features reordered per head; that needs the head count, fixed at
4 (the shipped ``llama_pydoc`` base, ``LlamaConfig``'s default) in ``BUILTIN_LLAMA`` and given
to :func:`builtin_llama` for any other.
"""

from __future__ import annotations

import functools

from jlora.models.llama_hf import rotary_permutation
from jlora.peft._mapping import ModuleRule, PeftMapping

_LAYER = r"(?:.*/)?layer_(\d+)"  # the encoder may sit anywhere in a bigger tree

#: jlora.models.bert.Bert (``layer_{i}/attention/query/kernel``, ...) -> transformers BertModel
#: (``encoder.layer.{i}.attention.self.query``, ...).
BUILTIN_BERT = PeftMapping(
    "jlora-bert",
    (
        ModuleRule(
            rf"{_LAYER}/attention/(query|key|value)/kernel", r"encoder.layer.\1.attention.self.\2"
        ),
        ModuleRule(rf"{_LAYER}/attention/out/kernel", r"encoder.layer.\1.attention.output.dense"),
        ModuleRule(rf"{_LAYER}/intermediate/kernel", r"encoder.layer.\1.intermediate.dense"),
        ModuleRule(rf"{_LAYER}/output/kernel", r"encoder.layer.\1.output.dense"),
        ModuleRule(
            r"(?:.*/)?(word|position|token_type)_embeddings/embedding", r"embeddings.\1_embeddings"
        ),
    ),
)


def builtin_llama(n_heads: int) -> PeftMapping:
    r"""The mapping of a built-in Llama with ``n_heads`` heads onto ``LlamaForCausalLM``.

    ``layer_{i}/attn/{query,key,value,out}/kernel`` become ``model.layers.{i}.self_attn.
    {q,k,v,o}_proj``, ``layer_{i}/mlp/{gate,up,down}/kernel`` ``model.layers.{i}.mlp.
    {gate,up,down}_proj``, ``embed/embedding`` ``model.embed_tokens`` and ``lm_head/kernel``
    ``lm_head``. Query and key ``lora_B`` rows are reordered by
    :func:`jlora.models.llama_hf.rotary_permutation`, as the base weights are by ``to_hf``.

    Args:
      n_heads: the model's ``LlamaConfig.n_heads``.

    Returns:
      A :class:`PeftMapping` (task type ``CAUSAL_LM``).

    Raises:
      ValueError: if ``n_heads`` is not a positive integer.

    Example:
      >>> m = builtin_llama(2)
      >>> m.module_for("layer_1/attn/query/kernel")
      ('model.layers.1.self_attn.q_proj', None)
      >>> m.rule_for("layer_1/attn/query/kernel").permutation(8).tolist()
      [0, 2, 1, 3, 4, 6, 5, 7]
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"builtin_llama: n_heads must be a positive int; got {n_heads!r}")
    rotary = functools.partial(rotary_permutation, n_heads=n_heads)
    attn = r"model.layers.\1.self_attn"
    return PeftMapping(
        f"jlora-llama-{n_heads}-heads",
        (
            ModuleRule(rf"{_LAYER}/attn/query/kernel", rf"{attn}.q_proj", out_permutation=rotary),
            ModuleRule(rf"{_LAYER}/attn/key/kernel", rf"{attn}.k_proj", out_permutation=rotary),
            ModuleRule(rf"{_LAYER}/attn/value/kernel", r"model.layers.\1.self_attn.v_proj"),
            ModuleRule(rf"{_LAYER}/attn/out/kernel", r"model.layers.\1.self_attn.o_proj"),
            ModuleRule(rf"{_LAYER}/mlp/(gate|up|down)/kernel", r"model.layers.\1.mlp.\2_proj"),
            ModuleRule(r"(?:.*/)?embed/embedding", "model.embed_tokens"),
            ModuleRule(r"(?:.*/)?lm_head/kernel", "lm_head"),
        ),
        task_type="CAUSAL_LM",
    )


#: jlora.models.llama.Llama with 4 heads (the shipped ``llama_pydoc`` base that ``jlora
#: finetune`` adapts by default) -> transformers LlamaForCausalLM built by ``llama_hf.to_hf``.
BUILTIN_LLAMA = builtin_llama(4)
