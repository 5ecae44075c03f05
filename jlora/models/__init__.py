"""Built-in models for the fine-tuning runner: a small Llama-style decoder and a BERT encoder.

Both are plain Flax Linen modules whose parameters are nested dicts, so every ``jlora``
function works on them unchanged. ``jlora.models.llama_hf`` turns the decoder into a Hugging
Face ``LlamaForCausalLM`` (``to_hf``), on which a ``jlora finetune`` adapter serves through PEFT
with ``jlora.peft.BUILTIN_LLAMA``.
"""
