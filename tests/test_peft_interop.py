"""jlora <-> real PEFT: adapters trained in JAX load into PyTorch PeftModel, and back.

Needs the ``peft`` extra (``pip install -e ".[peft]"``: torch 2.13.0 CPU, transformers<5, peft);
skipped without it. Each model family is built tiny from a config in Flax and in PyTorch with
the same weights (no hub access). Logits must agree to 1e-5, and the adapter must visibly move
them: PEFT drops misnamed keys with only a warning, which would otherwise pass silently.
"""

from __future__ import annotations

import dataclasses
import functools
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
    # PEFT copies adapted embedding tables into the adapter; import_peft checks the copy.
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
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


@functools.cache  # one build per family for the whole module (PyTorch models are copied)
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
        peft_targets = ["q_proj", "v_proj", "o_proj", "up_proj", "embed_tokens"]
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
    lora, _ = jlora.split(jax.jit(jlora.init_lora, static_argnums=2)(jax.random.key(0), base, cfg))
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
    theirs = {k: v for k, v in theirs.items() if not k.endswith(".base_layer.weight")}
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


# ------------------------------------------- stacked N-d kernels on a hand-written model

L, D, H, K, M = 3, 8, 2, 4, 6  # layers, width, heads, head dim, mlp width
TOY_MAP = jlora.peft.PeftMapping(
    "toy",
    (
        jlora.peft.ModuleRule(r"layers/(query|out)/kernel", r"layers.{layer}.\1"),
        jlora.peft.ModuleRule(r"layers/mlp/kernel", "layers.{layer}.mlp", ("stack", "in", "out")),
        jlora.peft.ModuleRule(r"head/kernel", "head", ("out", "in")),
    ),
)
TOY_CFG = jlora.LoraConfig(
    rank=3,
    alpha=2.0,
    rank_pattern={r"layers/out/kernel": 2},
    alpha_pattern={r"head/kernel": 5.0},
    axis_rules=TOY_MAP.axis_rules,
)


def _toy_base():
    rng = np.random.default_rng(3)
    shapes = {"query": (L, D, H, K), "out": (L, H, K, D), "mlp": (L, D, M)}
    layers = {
        k: {"kernel": jnp.asarray(rng.normal(size=v) / 3, jnp.float32)} for k, v in shapes.items()
    }
    head = jnp.asarray(rng.normal(size=(M, D)) / 3, jnp.float32)  # stored (out, in)
    return {"layers": layers, "head": {"kernel": head}}


@jax.jit
def _toy_apply(params, x):
    p = params["layers"]
    s = 0.0
    for i in range(L):
        q = jnp.tanh(jnp.einsum("btd,dhk->bthk", x, p["query"]["kernel"][i]))
        x = x + jnp.einsum("bthk,hkd->btd", q, p["out"]["kernel"][i])
        s = s + jnp.tanh(x @ p["mlp"]["kernel"][i])
    return x @ params["head"]["kernel"].T + s


class _ToyLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.query = torch.nn.Linear(D, H * K, bias=False)
        self.out = torch.nn.Linear(H * K, D, bias=False)
        self.mlp = torch.nn.Linear(D, M, bias=False)


class _Toy(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.layers = torch.nn.ModuleList([_ToyLayer() for _ in range(L)])
        self.head = torch.nn.Linear(D, M, bias=False)
        t = jax.tree.map(lambda x: torch.tensor(np.array(x)), base)
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                layer.query.weight.copy_(t["layers"]["query"]["kernel"][i].reshape(D, H * K).T)
                layer.out.weight.copy_(t["layers"]["out"]["kernel"][i].reshape(H * K, D).T)
                layer.mlp.weight.copy_(t["layers"]["mlp"]["kernel"][i].T)
            self.head.weight.copy_(t["head"]["kernel"])

    def forward(self, x):
        s = 0.0
        for layer in self.layers:
            x = x + layer.out(torch.tanh(layer.query(x)))
            s = s + torch.tanh(layer.mlp(x))
        return self.head(x) + s


@pytest.fixture(scope="module")
def toy():
    base = _toy_base()
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, D)), jnp.float32)
    model = _Toy(base).eval()
    with torch.no_grad():
        out = model(torch.tensor(np.array(x))).numpy()
    np.testing.assert_allclose(out, _toy_apply(base, x), atol=TOL)
    return base, x


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.tensor(np.array(x))).numpy()


def test_stacked_nd_adapter_loads_into_peft(toy, tmp_path):
    base, x = toy
    params = jlora.init_lora(jax.random.key(0), base, TOY_CFG)
    params = jax.tree.map_with_path(
        lambda p, v: (
            jax.random.normal(jax.random.key(len(jlora.path_str(p))), v.shape) / 4
            if jlora.is_adapter_path(p)
            else v
        ),
        params,
    )
    jlora.export_peft(tmp_path, params, TOY_CFG, TOY_MAP)
    model = peft.PeftModel.from_pretrained(_Toy(base).eval(), str(tmp_path))
    got = _torch_out(model, x)
    np.testing.assert_allclose(got, _toy_apply(jlora.merge_params(params, TOY_CFG), x), atol=TOL)
    assert np.abs(got - _toy_apply(base, x)).max() > 1e-3


def test_peft_adapter_imports_onto_stacked_nd_kernels(toy, tmp_path):
    base, x = toy
    lcfg = peft.LoraConfig(
        r=3,
        lora_alpha=4,
        target_modules=["query", "out", "mlp", "head"],
        init_lora_weights=False,
        rank_pattern={"out": 2},
    )
    pm = peft.get_peft_model(_Toy(base).eval(), lcfg).eval()
    pm.save_pretrained(str(tmp_path))
    params, cfg = jlora.import_peft(tmp_path, base, TOY_MAP)
    got = _toy_apply(jlora.merge_params(params, cfg), x)
    np.testing.assert_allclose(got, _torch_out(pm, x), atol=TOL)
    assert np.abs(got - _toy_apply(base, x)).max() > 1e-3


def test_gpt2_adapter_with_default_roles_loads_into_peft(tmp_path):
    """Flax GPT-2 kernels are (out, in); adapted with jlora's default roles, A and B swap."""
    fam = _build("gpt2")
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/c_attn/kernel")  # no axis_rules
    params = jax.jit(jlora.init_lora, static_argnums=2)(jax.random.key(0), fam.flax.params, cfg)
    rng = np.random.default_rng(5)
    params = jax.tree.map_with_path(
        lambda p, v: (
            jnp.asarray(rng.normal(size=v.shape) / 4, v.dtype) if jlora.is_adapter_path(p) else v
        ),
        params,
    )
    jlora.export_peft(tmp_path, params, cfg, fam.mapping)
    model = peft.PeftModel.from_pretrained(fam.fresh_torch(), str(tmp_path))
    got = fam.torch_logits(model)
    np.testing.assert_allclose(got, fam.flax_logits(jlora.merge_params(params, cfg)), atol=TOL)
    assert np.abs(got - fam.torch_logits(fam.torch)).max() > 1e-3


# ------------------------------------------- jlora's own BERT (all-MiniLM-L6-v2) <-> BertModel


def test_builtin_bert_adapter_serves_from_pytorch_both_ways(tmp_path):
    bert = pytest.importorskip("jlora.models.bert")
    hf_cfg = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=40,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.BertModel(hf_cfg, add_pooling_layer=False).save_pretrained(tmp_path / "base")

    def torch_base():
        return transformers.BertModel.from_pretrained(
            tmp_path / "base", add_pooling_layer=False
        ).eval()

    base, cfg = bert.load_bert(str(tmp_path / "base"))  # the runner's torch-free loader
    ids = IDS
    mask = np.ones_like(ids)
    mask[1, -2:] = 0

    def jax_out(params):
        return np.asarray(bert.Bert(cfg).apply({"params": params}, jnp.asarray(ids), mask))

    def torch_out(model):
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        return out.last_hidden_state.numpy()

    np.testing.assert_allclose(jax_out(base), torch_out(torch_base()), atol=TOL)
    mapping = jlora.peft.BUILTIN_BERT

    # JAX -> PEFT
    lcfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=r"layer_\d+/attention/(query|value|out)/kernel|layer_\d+/output/kernel"
        r"|word_embeddings/embedding",
    )
    params = jax.jit(jlora.init_lora, static_argnums=2)(jax.random.key(0), base, lcfg)
    rng = np.random.default_rng(6)
    params = jax.tree.map_with_path(
        lambda p, v: (
            jnp.asarray(rng.normal(size=v.shape) / 4, v.dtype) if jlora.is_adapter_path(p) else v
        ),
        params,
    )
    jlora.export_peft(tmp_path / "jax", params, lcfg, mapping)
    served = peft.PeftModel.from_pretrained(torch_base(), str(tmp_path / "jax"))
    got = torch_out(served)
    np.testing.assert_allclose(got, jax_out(jlora.merge_params(params, lcfg)), atol=TOL)
    assert np.abs(got - jax_out(base)).max() > 1e-3

    # PEFT -> JAX
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], init_lora_weights=False
    )
    pm = peft.get_peft_model(torch_base(), pcfg).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    imported, icfg = jlora.import_peft(tmp_path / "peft", base, mapping)
    got = jax_out(jlora.merge_params(imported, icfg))
    np.testing.assert_allclose(got, torch_out(pm), atol=TOL)
    assert np.abs(got - jax_out(base)).max() > 1e-3
