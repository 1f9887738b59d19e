"""One engine in one fresh process, for ``attnlab bench peer``: ``python -m attnlab.bench.peer_worker SPEC OUT``.

SPEC is a JSON file naming the engine (``llama.cpp``, ``attnlab``, ``transformers``), its variant and
precision, the model file, the token ids to feed (every engine gets the same ids) and the run's sizes. The
worker imports only its own library (``import attnlab`` alone does not import torch), so the resident
memory after the import is that library's baseline, then:

- ``mode = "time"``: loads the model (``load_s``), runs one warm-up generation of ``new_tokens`` after the
  short prompt (``first_gen_s``: includes compiling, for the compiled rows) and one token after the long
  prompt, reads the resident memory (``rss_bytes``), then times ``new_tokens`` tokens after the short
  prompt, stamping the moment the first token is out (attnlab's ``stream`` callback, a transformers
  streamer, llama.cpp's own loop), and 1 token after the long prompt. prefill = call -> first token
  (prompt + first token); decode tok/s = (N - 1) / (first token -> last token).
- ``mode = "quality"``: the next-token log-likelihood of each held-out text (one forward over all of it),
  returned as its perplexity exp(-mean log p(x_t | x_<t)).

Greedy decoding on every engine is arg-max over the last logits with end-of-text ignored, so all engines
produce exactly ``new_tokens`` tokens, comparable position by position. The result goes to OUT as JSON.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attnlab.atomic import atomic_write_text
from attnlab.bench.clock import Stopwatch, now


def rss_bytes() -> int:
    """This process's current resident set (VmRSS), in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024


def perplexity_from_logits(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean over t of -log softmax(logits[t])[ids[t + 1]]) for (T, V) ``logits`` of the T ``ids``,
    in float64 (the same arithmetic for every engine)."""
    x = np.asarray(logits, dtype=np.float64)[:-1]  # (T-1, V): row t predicts ids[t + 1]
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    target = x[np.arange(len(x)), np.asarray(ids[1:])]
    return float(np.exp(np.mean(log_z - target)))


# ----------------------------------------------------------------------------- engines
class Engine:
    """load() -> None; generate(ids, n) -> (n greedy token ids, seconds from the call to the first token);
    logits(ids) -> (T, V); weight_bytes."""

    weight_bytes: int = 0

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        raise NotImplementedError

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError


class LlamaCppEngine(Engine):
    def __init__(self, spec: dict) -> None:
        import llama_cpp  # the import baseline is read after this line

        self.llama_cpp = llama_cpp
        self.spec = spec

    def load(self, *, logits_all: bool = False) -> None:
        spec = self.spec
        self.llm = self.llama_cpp.Llama(
            model_path=spec["model"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
            n_ctx=spec["context"], n_batch=spec["context"], n_ubatch=min(spec["context"], 512),
            logits_all=logits_all, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.weight_bytes = int(self.llama_cpp.llama_model_size(self.llm.model))

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        llm, lib = self.llm, self.llama_cpp
        start = now()
        llm.reset()
        llm.eval(ids)
        out: list[int] = []
        first = 0.0
        for i in range(n):
            last = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(self.n_vocab,))
            out.append(int(last.argmax()))
            if i == 0:
                first = now() - start
            if i < n - 1:
                llm.eval([out[-1]])
        return out, first

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)


class TorchEngine(Engine):
    """attnlab (``default``: ``from_pretrained`` + ``attnlab.generate``, nothing else; ``compiled``:
    ``prepare_for_decode(precision=..., compile=True)``) or Hugging Face transformers (fp32)."""

    def __init__(self, spec: dict) -> None:
        import torch

        import attnlab

        if spec["engine"] == "transformers":
            import transformers  # noqa: F401  (its import is part of this engine's baseline)
        torch.set_num_threads(spec["threads"])
        self.torch, self.attnlab, self.spec = torch, attnlab, spec

    def load(self, *, logits_all: bool = False) -> None:
        torch, spec = self.torch, self.spec
        path = Path(spec["model"])
        if spec["engine"] == "transformers":
            import transformers

            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32).eval()
            self.model.generation_config.eos_token_id = None
            self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            return
        from attnlab.inference.fast import prepare_for_decode, weight_bytes

        native = spec["precision"].startswith("native")  # the file's formats as stored
        self.model = self.attnlab.from_pretrained(path, precision="native" if native else None)
        if spec["variant"] == "compiled":
            prepare_for_decode(self.model, precision="native" if native else spec["precision"],
                               compile=not logits_all)
        self.weight_bytes = weight_bytes(self.model)

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        torch = self.torch
        stamps: list[float] = []
        start = now()
        x = torch.tensor([ids])
        with torch.inference_mode():
            if self.spec["engine"] == "transformers":
                from transformers.generation.streamers import BaseStreamer

                class Stamp(BaseStreamer):  # put() gets the prompt first, then each new token
                    def put(self, value) -> None:
                        stamps.append(now())

                    def end(self) -> None:
                        pass

                out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=0, streamer=Stamp())
                stamps.pop(0)
            else:
                out = self.attnlab.generate(self.model, x, n, stream=lambda _: stamps.append(now()))
        return out[0, len(ids):].tolist(), stamps[0] - start

    def logits(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]))
            out = out.logits if hasattr(out, "logits") else out
        return out[0].float().numpy()


ENGINES: dict[str, Callable[[dict], Engine]] = {"llama.cpp": LlamaCppEngine, "attnlab": TorchEngine,
                                                "transformers": TorchEngine}




def run(spec: dict) -> dict:
    """Everything one process measures (see the module docstring)."""
    rss_start = rss_bytes()
    import_s, engine = Stopwatch.call(lambda: ENGINES[spec["engine"]](spec))
    result: dict = {"rss_python_bytes": rss_start, "rss_import_bytes": rss_bytes(), "import_s": import_s}
    short, long, n = spec["prompt"], spec["long_prompt"], spec["new_tokens"]
    if spec["mode"] == "quality":
        engine.load(logits_all=True)
        result["ppl"] = {name: perplexity_from_logits(engine.logits(ids), ids) for name, ids in spec["texts"].items()}
        return result
    result["load_s"], _ = Stopwatch.call(engine.load)
    result["first_gen_s"], _ = Stopwatch.call(lambda: engine.generate(short, n))
    engine.generate(long, 1)  # warm-up of the long prompt's path (compiles its shapes)
    result["rss_bytes"] = rss_bytes()
    result["weight_bytes"] = engine.weight_bytes
    total, (tokens, first) = Stopwatch.call(lambda: engine.generate(short, n))
    _, (_, first_long) = Stopwatch.call(lambda: engine.generate(long, 1))
    result.update(prefill_s=first, prefill_long_s=first_long, decode_s=total - first, tokens=tokens,
                  decode_tok_s=(n - 1) / (total - first))
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    atomic_write_text(argv[1], json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
