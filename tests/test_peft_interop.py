"""jlora <-> real PEFT: adapters trained in JAX load into PyTorch PeftModel, and back.

Needs the ``peft`` extra (``pip install -e ".[peft]"``: torch 2.13.0 CPU, transformers<5, peft);
skipped without it. Each model family is built tiny from a config in Flax and in PyTorch with
the same weights (no hub access). Logits must agree to 1e-5, and the adapter must visibly move
them: PEFT drops misnamed keys with only a warning, which would otherwise pass silently.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.modeling_flax_pytorch_utils import (  # noqa: E402
    load_flax_weights_in_pytorch_model,
)

import jlora  # noqa: E402

pytestmark = [
    pytest.mark.peft,
    # transformers<5 announces the end of its Flax classes; nothing else is tolerated, so
    # PEFT's warning about keys it could not place fails the test.
    pytest.mark.filterwarnings("ignore:.*(deprecated|Flax).*:FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
]

TOL = 1e-5
IDS = np.array([[3, 14, 15, 9, 2, 6, 5, 35], [8, 9, 7, 9, 3, 2, 38, 4]])


@dataclasses.dataclass
class Family:
    name: str
    flax: object
    torch: object
    mapping: jlora.peft.PeftMapping
    targets: str
    peft_targets: list[str]

    def flax_logits(self, params):
        return np.asarray(self.flax(jnp.asarray(IDS), params=params).logits)

    def torch_logits(self, model):
        with torch.no_grad():
            return model(torch.tensor(IDS)).logits.numpy()

    def fresh_torch(self):
        cls = type(self.torch)
        model = cls(self.torch.config).eval()
        model.load_state_dict(self.torch.state_dict())
        return model


def _build(name):
    T = transformers
    if name == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=16)
        pair = (T.FlaxGPT2LMHeadModel, T.GPT2LMHeadModel)
        mapping, targets = jlora.peft.GPT2, r".*/(c_attn|c_proj|c_fc)/kernel"
        peft_targets = ["c_attn", "c_proj", "c_fc"]
    elif name == "llama":
        cfg = T.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=40,
            max_position_embeddings=16,
        )
        pair = (T.FlaxLlamaForCausalLM, T.LlamaForCausalLM)
        mapping = jlora.peft.LLAMA
        targets = r".*/(q_proj|k_proj|v_proj|o_proj|down_proj)/kernel|model/embed_tokens/embedding"
        peft_targets = ["q_proj", "v_proj", "o_proj", "up_proj"]
    else:
        cfg = T.BertConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=40,
            max_position_embeddings=16,
            num_labels=5,
        )
        pair = (T.FlaxBertForSequenceClassification, T.BertForSequenceClassification)
        mapping = jlora.peft.BERT
        targets = r".*/attention/self/(query|value)/kernel|.*/output/dense/kernel"
        peft_targets = ["query", "key", "dense"]
    flax_model = pair[0](cfg, seed=0)
    torch_model = pair[1](cfg).eval()
    load_flax_weights_in_pytorch_model(torch_model, jax.tree.map(np.array, flax_model.params))
    return Family(name, flax_model, torch_model, mapping, targets, peft_targets)


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def family(request):
    fam = _build(request.param)
    np.testing.assert_allclose(  # the two models really are the same model
        fam.flax_logits(fam.flax.params), fam.torch_logits(fam.torch), atol=TOL
    )
    return fam


def _config(fam):
    # Per-path rank and alpha, and rsLoRA on one family, so every scale path is exercised.
    return jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=fam.targets,
        rank_pattern={r".*/0/.*": 2},
        alpha_pattern={r".*/1/.*": 3.0},
        use_rslora=fam.name == "llama",
        axis_rules=fam.mapping.axis_rules,
    )


def _train(fam, cfg, steps=4):
    base = fam.flax.params
    lora, _ = jlora.split(jlora.init_lora(jax.random.key(0), base, cfg))
    ids = jnp.asarray(IDS)
    tx = optax.adam(5e-2)

    def loss(lora):
        params = jlora.merge_params(jlora.combine(lora, base), cfg)
        logits = fam.flax(ids, params=params).logits
        return jnp.mean(logits**2) if fam.name == "bert" else -jnp.mean(logits[:, :-1, 7])

    @jax.jit
    def step(lora, opt):
        grads = jax.grad(loss)(lora)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(lora, updates), opt

    opt = tx.init(lora)
    for _ in range(steps):
        lora, opt = step(lora, opt)
    return jlora.combine(lora, base)


def test_jax_trained_adapter_loads_into_peft(family, tmp_path):
    cfg = _config(family)
    params = _train(family, cfg)
    modules = jlora.export_peft(tmp_path, params, cfg, family.mapping)
    assert modules

    expected = family.flax_logits(jlora.merge_params(params, cfg))
    base_logits = family.torch_logits(family.torch)
    model = peft.PeftModel.from_pretrained(family.fresh_torch(), str(tmp_path))
    got = family.torch_logits(model)

    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    assert np.abs(got - base_logits).max() > 1e-3, "the adapter did not change PEFT's output"
    lora_modules = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {f"base_model.model.{m}" for m in modules} == lora_modules


def test_peft_saved_adapter_imports(family, tmp_path):
    model = family.fresh_torch()
    lcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=family.peft_targets,
        init_lora_weights=False,  # random A and B: the adapter changes the output
        rank_pattern={
            "gpt2": {"h.1.attn.c_attn": 2},
            "llama": {"layers.1.self_attn.q_proj": 2},
            "bert": {"layer.1.*query": 2},
        }[family.name],
        alpha_pattern={r".*\.0\..*": 5},
        use_rslora=family.name == "bert",
        fan_in_fan_out=family.name == "gpt2",
    )
    pm = peft.get_peft_model(model, lcfg).eval()
    pm.save_pretrained(str(tmp_path))
    expected = family.torch_logits(pm)

    base = family.flax.params
    params, cfg = jlora.import_peft(tmp_path, base, family.mapping)
    got = family.flax_logits(jlora.merge_params(params, cfg))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    assert np.abs(got - family.flax_logits(base)).max() > 1e-3

    # jlora -> PEFT again gives back PEFT's own tensors.
    jlora.export_peft(tmp_path / "again", params, cfg, family.mapping)
    ours = jlora._tensorfile.decode(
        (tmp_path / "again" / "adapter_model.safetensors").read_bytes(), "again"
    )
    theirs = jlora._tensorfile.decode((tmp_path / "adapter_model.safetensors").read_bytes(), "peft")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
