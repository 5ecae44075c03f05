"""generate(pad_to=...): prompts of any length up to it run one compiled program, same tokens."""

import jax
import pytest

from jlora.models.sampling import generate
from models.test_sampling import init_standin, standin_cache, standin_step


def test_pad_to_compiles_once_and_keeps_the_tokens():
    params = init_standin()
    traces = []

    def counting(p, tokens, *rest):
        traces.append(tokens.shape)
        return standin_step(p, tokens, *rest)

    kw = dict(init_cache=standin_cache, max_new_tokens=6, temperature=1.0, key=jax.random.key(3))
    short, long = [[1, 2], [4]], [[7, 7, 7, 7, 7], [9, 3]]
    got = [generate(counting, params, p, pad_to=8, cache_len=16, **kw) for p in (short, long)]
    assert len(traces) == 2  # one prefill and one decode trace for both calls
    # Left padding is masked out and positions start at each prompt's first token.
    assert got == [generate(standin_step, params, p, cache_len=16, **kw) for p in (short, long)]


def test_a_prompt_longer_than_pad_to_is_refused():
    with pytest.raises(ValueError, match=r"a prompt is 3 tokens, longer than pad_to=2"):
        generate(
            standin_step, None, [[1, 2, 3]], init_cache=standin_cache, max_new_tokens=1, pad_to=2
        )
