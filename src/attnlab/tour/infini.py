"""Tour section: Infini-attention — bounded memory for unbounded input, and what it retrieves from far back.

Memory is measured as ``attnlab bench infini`` measures it (``bench.infini.stream_memory``): the passkey
Infini model trained here streams N tokens in a fresh process, and the memory *above the warmed-up process*
(median per-chunk peak, and what the stream retains) is compared with the KV cache a softmax model of the
same shape would need.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from attnlab.tour.common import pick, plt, save
from attnlab.tour.report import Section
from attnlab.tour.verdict import Verdict, check, combine, exact


def _settings(mode: str, seed: int):
    from attnlab.bench.infini import Settings

    return pick(
        mode,
        tiny=Settings(train_len=64, segment_len=16, d_model=32, steps=4, baseline_steps=3, batch=4, warmup=1,
                      eval_examples=4, multiples=[1, 4], stream_lengths=[2048, 16384], chunk=1024, seed=seed),
        quick=Settings(train_len=64, segment_len=16, d_model=32, steps=30, baseline_steps=10, batch=8, warmup=3,
                       eval_examples=8, multiples=[1, 4], stream_lengths=[4096, 65536], chunk=2048, seed=seed),
        full=Settings(train_len=256, segment_len=32, d_model=64, n_layers=3, steps=3000, baseline_steps=1000,
                      batch=16, lr=3e-3, warmup=100, eval_examples=32, multiples=[1, 4, 16],
                      stream_lengths=[8192, 131072, 1048576], chunk=4096, seed=seed))


def _recall(passkey: list[dict]) -> Verdict:
    """Recall beyond the training length, judged only if the model learned the task at 1x."""
    near, far = passkey[0], passkey[-1]
    rule = ("if the Infini model retrieves >= 90% at 1x the training length (it learned the task), then at "
            f"{far['multiple']}x >= 90% and 20 points above the windowed softmax model confirms, no better than the "
            "softmax model refutes; a model that did not learn the task at 1x leaves it inconclusive")
    detail = (f"passkey at 1x: Infini {near['infini_acc']:.0%}; at {far['multiple']}x: Infini {far['infini_acc']:.0%}, "
              f"windowed softmax {far['softmax_acc']:.0%}")
    if near["infini_acc"] < 0.9:
        return Verdict("inconclusive", rule, detail + " (not learned at this training budget)")
    if far["infini_acc"] >= 0.9 and far["infini_acc"] > far["softmax_acc"] + 0.2:
        return Verdict("confirmed", rule, detail)
    return Verdict("refuted" if far["infini_acc"] <= far["softmax_acc"] else "inconclusive", rule, detail)


def infini(out: Path, mode: str, seed: int) -> Section:
    from attnlab.bench.infini import evaluate, growth_vs_kv, stream_memory, train

    s = Section("infini", "Infini-attention: bounded memory for unbounded input",
                "Segment-local attention plus a compressive memory keeps the state constant however long the "
                "input, and can still recall what it saw segments ago; a standard KV cache grows linearly.",
                "ModelConfig.attention_mechanism = 'infini', segment_len, memory_update")
    settings = _settings(mode, seed)
    with tempfile.TemporaryDirectory() as tmp:  # fresh runs: the same seed gives the same models
        models = {name: train(settings, name, Path(tmp) / name, None)[0] for name in ("infini", "softmax")}
        passkey = evaluate(models, settings)
        kv = models["softmax"].new_cache(1)
        memory = stream_memory(Path(tmp) / "infini", settings.stream_lengths, settings.chunk, 1,
                               kv.nbytes() / kv.max_len, log=lambda *_: None)
    fig, (a, b) = plt().subplots(1, 2, figsize=(9, 3.2))
    tokens = [r["tokens"] for r in memory]
    a.loglog(tokens, [r["chunk_peak_MiB"] for r in memory], "o-", label="Infini: above warmed-up process")
    a.loglog(tokens, [r["state_bytes"] / 2**20 for r in memory], "^-", label="Infini: state nbytes()")
    a.loglog(tokens, [r["kv_cache_MiB"] for r in memory], "s-", label="KV cache, same shape")
    a.set_xlabel("tokens streamed")
    a.set_ylabel("MiB")
    a.legend(fontsize=7)
    b.plot([r["multiple"] for r in passkey], [r["infini_acc"] for r in passkey], "o-", label="Infini (streamed)")
    b.plot([r["multiple"] for r in passkey], [r["softmax_acc"] for r in passkey], "s-", label="softmax, window")
    b.set_xscale("log", base=2)
    b.set_xlabel(f"input length / training length ({settings.train_len})")
    b.set_ylabel("passkey retrieval")
    b.set_ylim(-0.05, 1.05)
    b.legend()
    s.figure = save(fig, out, "infini.png")
    s.rows = memory + passkey
    s.measured = (f"memory above the warmed-up process (median per-chunk peak RSS, and RSS retained after the "
                  f"stream; fresh process per length, as `attnlab bench infini`) while streaming N tokens in chunks of "
                  f"{settings.chunk}, against a softmax model's KV cache; passkey retrieval of a small Infini model and "
                  f"a same-size windowed softmax model, each trained here for {settings.steps} / "
                  f"{settings.baseline_steps} steps at {settings.train_len} tokens")
    lo, hi = memory[0], memory[-1]
    s.judge(combine(
        exact(len({r["state_bytes"] for r in memory}) == 1, what="state bytes equal at every length",
              detail=f"state {lo['state_bytes']:,} B at {lo['tokens']:,} and {hi['state_bytes']:,} B at "
                     f"{hi['tokens']:,} tokens"),
        check(growth_vs_kv(memory), below=0.05, refuted_at=0.5,
              what=f"growth of the memory above the warmed-up process from {lo['tokens']:,} to {hi['tokens']:,} "
                   f"tokens / the KV cache's growth ({lo['kv_cache_MiB']:.1f} -> {hi['kv_cache_MiB']:.1f} MiB)"),
        _recall(passkey)))
    s.because += (f"; above the warmed-up process {lo['chunk_peak_MiB']:.2f} -> {hi['chunk_peak_MiB']:.2f} MiB, "
                  f"retained {lo['retained_MiB']:.2f} -> {hi['retained_MiB']:.2f} MiB")
    return s
