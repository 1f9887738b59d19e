"""Held-out text for ``attnlab bench peer``: the default corpus's validation split (the prefill prompt and one
perplexity text) and a chat transcript rendered with the model's own chat template (the other)."""

from __future__ import annotations

# A short conversation written for this benchmark (not from any training set): plain questions and answers
# of the kind a small instruct model is asked, so its perplexity measures the chat format and ordinary prose.
TRANSCRIPT: list[dict[str, str]] = [
    {"role": "user", "content": "I keep forgetting to water my plants. Any simple tricks?"},
    {"role": "assistant", "content": "Tie watering to something you already do every day, such as making the first "
                                     "coffee on Monday and Thursday. Keep the watering can next to the plants so "
                                     "it is in sight, and push a finger into the soil first: if the top two "
                                     "centimetres are dry, water until it runs out of the bottom of the pot."},
    {"role": "user", "content": "What about when I go away for a week?"},
    {"role": "assistant", "content": "Water well the day before you leave and move the pots out of direct sun. "
                                     "For thirsty plants, stand them on a tray of wet pebbles or put one end of a "
                                     "cotton string in a jar of water and bury the other end in the soil; the "
                                     "string keeps drawing water up while you are gone."},
    {"role": "user", "content": "Thanks. Which houseplants are hard to kill?"},
    {"role": "assistant", "content": "Snake plants, ZZ plants and pothos cope with low light and irregular "
                                     "watering. Spider plants forgive a lot as well and grow new plantlets you "
                                     "can give away. Avoid ferns and calatheas until the routine sticks, because "
                                     "they sulk when the soil dries out."},
]


def validation_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` ids of the default corpus's validation split, by ``tokenizer``."""
    from attnlab.training.corpus import load_corpus

    ids: list[int] = []
    for doc in load_corpus(max_files=300).documents["validation"]:
        ids += tokenizer.encode(doc)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the default corpus's validation split has {len(ids)} tokens, fewer than {n_tokens}")


def chat_transcript(tokenizer) -> list[int]:
    """``TRANSCRIPT`` rendered with the tokenizer's chat template (system prompt included), as ids."""
    from attnlab.chat import render_chat

    text = render_chat(tokenizer.chat_template, TRANSCRIPT, add_generation_prompt=False,
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return tokenizer.encode(text)
