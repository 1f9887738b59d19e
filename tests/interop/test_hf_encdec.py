"""Hugging Face parity for the encoder (BERT) and encoder-decoders (BART, Marian), with padding."""

import pytest
import torch

import attnlab

transformers = pytest.importorskip("transformers")


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:  # Marian's fixed sinusoidal table is a frozen parameter
                continue
            is_norm = "LayerNorm" in name or "layer_norm" in name or "layernorm" in name
            p.copy_(torch.randn_like(p) * (0.3 if is_norm else 0.08) + (1.0 if is_norm and name.endswith("weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model.eval()


def right_padded(vocab, lengths, pad, start=3):
    B, T = len(lengths), max(lengths)
    ids = torch.randint(start, vocab, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = pad
    return ids, mask


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
def test_bert_parity(tmp_path, head):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, type_vocab_size=2)
    hf = randomise(getattr(transformers, head)(cfg))
    hf.save_pretrained(tmp_path)
    ours = attnlab.from_pretrained(tmp_path)
    ids, mask = right_padded(99, [17, 9, 13], pad=0)
    types = torch.randint(0, 2, ids.shape)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types)
        hidden = ours.encode(ids, mask, types)
        if head == "BertModel":
            m = mask.bool()
            torch.testing.assert_close(hidden[m], ref.last_hidden_state[m], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.pool(hidden), ref.pooler_output, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours(ids, attention_mask=mask, token_type_ids=types)[m],
                                       ref.last_hidden_state[m], rtol=1e-5, atol=1e-5)
        else:
            m = mask.bool()
            torch.testing.assert_close(ours(ids, attention_mask=mask, token_type_ids=types)[m], ref.logits[m],
                                       rtol=1e-5, atol=1e-5)


def make_bart():
    cfg = transformers.BartConfig(vocab_size=97, d_model=64, encoder_layers=2, decoder_layers=3,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                  decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(cfg)


def make_marian():
    cfg = transformers.MarianConfig(vocab_size=97, d_model=64, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                    decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=96,
                                    eos_token_id=0, decoder_start_token_id=96, forced_eos_token_id=None)
    return transformers.MarianMTModel(cfg)


@pytest.fixture(scope="module", params=["bart", "marian"])
def s2s(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = randomise({"bart": make_bart, "marian": make_marian}[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, attnlab.from_pretrained(path)


def test_seq2seq_logits_match_hf(s2s):
    hf, ours = s2s
    pad = hf.config.pad_token_id
    src, src_mask = right_padded(97, [15, 8], pad=pad)
    tgt = torch.randint(3, 90, (2, 11))
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
        out = ours(tgt, encoder_input_ids=src, encoder_attention_mask=src_mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_seq2seq_greedy_generation_matches_hf(s2s):
    hf, ours = s2s
    pad = hf.config.pad_token_id
    src, src_mask = right_padded(97, [12, 7, 10], pad=pad)
    expected = hf.generate(input_ids=src, attention_mask=src_mask, max_new_tokens=24, min_new_tokens=24,
                           do_sample=False, num_beams=1, no_repeat_ngram_size=0, forced_bos_token_id=None,
                           forced_eos_token_id=None, eos_token_id=None)
    got = attnlab.generate(ours, src, 24, attention_mask=src_mask)
    assert torch.equal(got, expected)


def test_cached_seq2seq_decode_equals_full_and_cross_kv_computed_once(s2s):
    _, ours = s2s
    src, src_mask = right_padded(97, [10, 6], pad=ours.config.pad_token_id)
    tgt = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        full = ours(tgt, encoder_input_ids=src, encoder_attention_mask=src_mask)
        cache, _, _ = ours.begin_generation(src, src_mask, 12)
        steps = [ours(tgt[:, :3], cache=cache)] + [ours(tgt[:, t:t + 1], cache=cache) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.cross_computations == ours.config.n_layers  # once per decoder layer, not once per step
