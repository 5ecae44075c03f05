"""Mappings for jlora's own built-in models (``jlora.models``) to their PyTorch counterparts.

``BUILTIN_BERT`` maps :class:`jlora.models.bert.Bert` (all-MiniLM-L6-v2 and any BERT loaded with
``load_bert``) onto ``transformers.BertModel``, the class ``AutoModel`` gives for
``sentence-transformers/all-MiniLM-L6-v2``, so an adapter trained in JAX serves from PyTorch
with ``PeftModel.from_pretrained(BertModel.from_pretrained(...), adapter_dir)``. For a
``BertFor...`` head model (module names prefixed ``bert.``), use
``BUILTIN_BERT.with_prefix("bert.")``.
"""

from __future__ import annotations

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
