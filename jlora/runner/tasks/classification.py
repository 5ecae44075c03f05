"""The classification task: a BERT encoder, mean pooling and a linear head over labelled texts.

"Before" is a head trained alone on the frozen encoder's sentence embeddings (a linear probe);
the run then trains LoRA adapters and the head together, starting from that head.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.models.bert import MINILM_PACKAGE, Bert, load_bert, mean_pool, minilm_dir
from jlora.models.formats.weights import load_params, save_params
from jlora.models.formats.wordpiece import WordPiece
from jlora.runner.config import DataSection, RunConfig
from jlora.runner.data.stdlib_text import stdlib_docstrings
from jlora.runner.tasks.base import FixedBatches

FORTUNES_DIR = "/usr/share/games/fortunes"
PACKAGE = "package:"
PROBE_STEPS = 300
# L2 penalty on the head's kernel in both phases, so neither starts from (or ends in) a head
# that is saturated on the training set; the probe's held-out loss is best near this value.
HEAD_L2 = 1e-3


def model_dir(spec: str) -> str:
    """The Hugging Face BERT folder behind ``model.weights``.

    Raises:
      FileNotFoundError: for an unknown package, a missing package, or a missing folder.
    """
    if spec.startswith(PACKAGE):
        if spec != PACKAGE + MINILM_PACKAGE:
            raise FileNotFoundError(
                f"model.weights {spec!r}: the only packaged BERT is {PACKAGE + MINILM_PACKAGE!r}"
            )
        return minilm_dir()
    if not os.path.isdir(spec):
        raise FileNotFoundError(
            f"model.weights {spec!r} is not a folder; for kind=bert give "
            f"{PACKAGE + MINILM_PACKAGE!r} or a folder with config.json, model.safetensors and "
            "vocab.txt"
        )
    return spec


def _fortunes(category: str) -> list[str]:
    path = os.path.join(FORTUNES_DIR, category)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"fortune category file {path!r} not found; install Debian's fortunes "
            "(apt-get install fortunes), choose data.categories among those installed, or use "
            "data.source=stdlib (jlora finetune minilm_stdlib), which needs no install"
        )
    with open(path, encoding="utf-8", errors="replace") as f:
        items = f.read().split("\n%\n")
    return [" ".join(t.split()) for t in items if t.strip()]


def _read_jsonl(path: str) -> dict[str, list[str]]:
    """Texts by label from a JSON-lines file of ``{"text": ..., "label": ...}``; blank lines skip.

    Raises:
      ValueError: naming ``path:line`` for a line that is not JSON or not such an object, or
        naming ``path`` if it is not UTF-8 text.
    """
    by_label: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data.source {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); give a "
            'JSON-lines file of {"text": ..., "label": ...} records'
        ) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{n}: line {n} is not JSON ({err.msg} at column {err.colno}); each line "
                'must be one object like {"text": "...", "label": "..."}'
            ) from None
        if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
            raise ValueError(
                f"{path}:{n}: expected a JSON object with 'text' and 'label', found "
                f"{line.strip()[:60]!r}"
            )
        by_label.setdefault(str(rec["label"]), []).append(str(rec["text"]))
    return by_label


def load_examples(data: DataSection, seed: int) -> tuple[list[str], list[int], list[str]]:
    """``(texts, labels, label_names)``, at most ``max_per_class`` per label, shuffled by seed.

    Raises:
      FileNotFoundError: if the source is missing.
      ValueError: for a malformed JSON-lines record, an unknown stdlib family or fewer than two
        labels.
    """
    by_label: dict[str, list[str]] = {}
    if data.source == "stdlib":
        by_label = stdlib_docstrings(data.categories)
    elif data.source == "fortunes":
        for cat in data.categories:
            by_label[cat] = _fortunes(cat)
    else:
        if not os.path.isfile(data.source):
            raise FileNotFoundError(
                f"data.source {data.source!r}: for kind=bert give 'stdlib', 'fortunes' or a "
                'JSON-lines file of {"text": ..., "label": ...} records'
            )
        by_label = _read_jsonl(data.source)
    if len(by_label) < 2:
        raise ValueError(f"data.source {data.source!r} has {len(by_label)} label(s); need >= 2")
    names = sorted(by_label)
    rng = random.Random(seed)
    pairs = []
    for i, name in enumerate(names):
        texts = list(by_label[name])
        rng.shuffle(texts)
        pairs += [(t, i) for t in texts[: data.max_per_class]]
    rng.shuffle(pairs)
    return [t for t, _ in pairs], [y for _, y in pairs], names


class ClassificationTask(FixedBatches):
    """LoRA on a BERT encoder plus a trainable linear head; cross-entropy, accuracy."""

    unit = "ex"

    def __init__(self, config: RunConfig) -> None:
        """Loads the encoder and tokenizer; the data is read when first needed."""
        self.config = config
        self.dir = model_dir(config.model.weights)
        self.base, self.bert_config = load_bert(self.dir)
        self.tokenizer = WordPiece(os.path.join(self.dir, "vocab.txt"))
        self.model = Bert(self.bert_config)
        self.units_per_batch = config.train.batch_size
        self.data_stats: dict[str, Any] = {}

    @functools.cached_property
    def data(self) -> dict[str, Any]:
        """Tokenised train and validation splits and the label names."""
        d, bs = self.config.data, self.config.train.batch_size
        texts, labels, names = load_examples(d, self.config.train.seed)
        cut = int(len(texts) * (1.0 - d.val_fraction))
        if cut < bs or len(texts) - cut < 1:
            raise ValueError(
                f"{len(texts)} examples give {cut} for training and {len(texts) - cut} for "
                f"validation; need at least batch_size {bs} and 1; add data or change sizes"
            )
        ids, mask = self.tokenizer.encode_batch(texts, d.seq_len)
        y = np.asarray(labels, np.int32)
        return {
            "train": (ids[:cut], mask[:cut], y[:cut]),
            "val": (ids[cut:], mask[cut:], y[cut:]),
            "names": names,
        }

    @property
    def extra(self) -> dict[str, Any]:
        """A zero head (its shape; :meth:`initial_extra` gives the trained probe)."""
        n, h = len(self.data["names"]), self.bert_config.hidden_size
        return {"head": {"kernel": jnp.zeros((h, n)), "bias": jnp.zeros(n)}}

    def _features(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = cast(jax.Array, self.model.apply({"params": params}, ids, mask))
        return mean_pool(hidden, mask)

    def logits(self, params: Any, extra: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Class scores ``[b, labels]``."""
        head = extra["head"]
        return self._features(params, ids, mask) @ head["kernel"] + head["bias"]

    def loss(self, params: Any, extra: Any, batch: Any) -> jax.Array:
        """Mean cross-entropy of ``(ids, mask, labels)`` plus ``HEAD_L2·|head kernel|²``."""
        ids, mask, y = batch
        logits = self.logits(params, extra, ids, mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + HEAD_L2 * jnp.sum(extra["head"]["kernel"] ** 2)

    def train_batch(self, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch at data position ``position`` (examples reshuffled every epoch)."""
        ids, mask, y = self.data["train"]
        n, bs = len(y), self.config.train.batch_size
        rows = []
        for i in range(position * bs, (position + 1) * bs):
            perm = np.random.default_rng([self.config.train.seed, i // n]).permutation(n)
            rows.append(perm[i % n])
        return ids[rows], mask[rows], y[rows]

    @functools.cached_property
    def _scores(self) -> Any:
        def scores(params: Any, extra: Any, ids: Any, mask: Any, y: Any) -> Any:
            logits = self.logits(params, extra, ids, mask)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return ce.sum(), (logits.argmax(-1) == y).sum()

        return jax.jit(scores)

    def _batches(self, split: str) -> list[tuple[np.ndarray, ...]]:
        ids, mask, y = self.data[split]
        bs = self.config.train.batch_size
        return [(ids[i : i + bs], mask[i : i + bs], y[i : i + bs]) for i in range(0, len(y), bs)]

    def prepare_run(self, run_dir: str, start_model: Any, log: Callable[[str], None]) -> None:
        """Nothing to prepare: the data and model are read when the task is made."""
        del run_dir, start_model, log

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        """Validation cross-entropy and accuracy over the whole validation split."""
        total, correct, n = 0.0, 0, 0
        for ids, mask, y in self._batches("val"):
            ce, hits = self._scores(params, extra, ids, mask, y)
            total, correct, n = total + float(ce), correct + int(hits), n + len(y)
        return {"eval_loss": total / n, "accuracy": correct / n}

    def initial_extra(self, params: Any) -> dict[str, Any]:
        """A head fitted alone on the frozen encoder's embeddings (full-batch Adam, L2)."""
        features = jax.jit(self._features)
        x = jnp.concatenate([features(params, i, m) for i, m, _ in self._batches("train")])
        y = jnp.asarray(self.data["train"][2])
        tx = optax.adam(1e-2)

        def probe_loss(head: Any) -> jax.Array:
            logits = x @ head["kernel"] + head["bias"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + HEAD_L2 * jnp.sum(head["kernel"] ** 2)

        @jax.jit
        def fit(head: Any) -> Any:
            def body(_: Any, carry: Any) -> Any:
                head, state = carry
                updates, state = tx.update(jax.grad(probe_loss)(head), state)
                return optax.apply_updates(head, updates), state

            return jax.lax.fori_loop(0, PROBE_STEPS, body, (head, tx.init(head)))[0]

        return {"head": fit(self.extra["head"])}

    def show(
        self, params: Any, extra: Any, scores: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """Validation loss and accuracy (``scores`` when given: already computed)."""
        return self.evaluate(params, extra) if scores is None else dict(scores)

    def save_extra(self, run_dir: str, extra: Any) -> None:
        """Writes the head to ``head.safetensors`` with its label names."""
        meta = {"labels": json.dumps(self.data["names"])}
        save_params(os.path.join(run_dir, "head.safetensors"), extra, meta)

    def load_extra(self, run_dir: str) -> Any:
        """Reads the head written by :meth:`save_extra`."""
        return load_params(os.path.join(run_dir, "head.safetensors"))[0]
