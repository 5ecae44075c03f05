"""Checkpoint formats, apart from the architectures that use them.

- :mod:`~jlora.models.formats.hf_dir`: Hugging Face model directories (config, safetensors).
- :mod:`~jlora.models.formats.gguf`: GGUF files (llama.cpp), dequantised.
- :mod:`~jlora.models.formats.tokenizer`: tokenizers from ``tokenizer.json``, GGUF
  vocabularies or ``tokenizer.model``; :mod:`~jlora.models.formats.wordpiece`: BERT's.
- :mod:`~jlora.models.formats.chat_template`: chat templates rendered as transformers does.
- :mod:`~jlora.models.formats.weights`: parameter trees as flat safetensors files.
"""
