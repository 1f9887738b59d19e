"""``attnlab bench speculative``: plain greedy decoding vs speculative decoding, side by side.

On the target + draft models (default: the shipped ``default`` and ``default-draft``) and prompts cut
from the default corpus's *test* split, it times plain greedy decoding, speculative decoding with a fixed
γ = 1..8, adaptive γ, prompt lookup, and the hybrid (lookup where the text matches, the draft model
elsewhere), alternating the runs prompt by prompt so that machine load hits
them alike. Every speculative output is compared with the plain output: a speed-up is reported only for
identical tokens. It also compares the measured tokens per target call with (1 − α^(γ+1)) / (1 − α) for the
measured per-token acceptance rate α, and times prompt lookup on input-grounded prompts (a function from
the test split, then a request to repeat it).

Two speeds per row: ``tok_per_s`` over the whole call (the prompt's prefill included) and
``decode_tok_per_s``, the tokens after the first over the time after the target's prefill and first token
(timed in the same rounds with ``generate(target, prompt, 1)``), like ``attnlab bench decode``'s decode
speed. Speculation only changes the decode phase; the prefill, the same for every method, dilutes the
whole-call ratio by its share (a 128-token prompt through SmolLM2 takes ~30% of a 64-token plain
generation here). The draft's own prefill stays in the speculative rows' decode time.

The first row, ``default: generate(draft=)``, is the call a user writes without flags:
``attnlab.generate(target, ids, n, draft=draft)`` on models straight from ``from_pretrained`` (fp32,
unprepared, γ = 4), timed in the same rounds as the tuned rows and compared with plain greedy decoding of
those same unprepared models; its speed-ups are over the ``plain`` row (the tuned one under
``--precision``), so the distance between the default and the tuned path is always in the table.

``--precision P`` prepares target and draft with the fast decode path; ``--static`` (precision fp32 unless
given) also compiles both into static-shape decode graphs (``inference/static.py``): each graph is
compiled in an untimed round before the timed ones, and ``compile_s`` in the JSON reports how long the
first calls took.
"""

from __future__ import annotations

import torch

from attnlab.bench.clock import Stopwatch, timed
from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.commands.args import add_precision, parser
from attnlab.figures import save_figure

DEFAULT_ROW = "default: generate(draft=)"  # from_pretrained models, no flags: what a user writes first


def test_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from the test split of the default corpus (deterministic)."""
    from attnlab.training.corpus import load_corpus

    docs = [d for d in load_corpus().documents["test"] if len(d) > 8 * length]
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in torch.randperm(len(docs), generator=g)[:n].tolist():
        ids = tokenizer.encode(docs[i])
        start = int(torch.randint(0, max(1, len(ids) - length), (1,), generator=g))
        prompts.append(ids[start:start + length])
    return prompts


def grounded_prompts(tokenizer, n: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Input-grounded prompts: a function from the test split, then the start of a verbatim copy."""
    import re

    from attnlab.training.corpus import load_corpus

    funcs = []
    for doc in load_corpus().documents["test"]:
        for m in re.finditer(r"\n(def [^\n]+\n(?:    [^\n]*\n|\n){4,30})", doc):
            funcs.append(m.group(1))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randperm(len(funcs), generator=g).tolist():
        f = funcs[i]
        ids = tokenizer.encode(f"# original\n{f}\n# the same function, unchanged\n{f.splitlines()[0]}\n")
        if len(ids) <= max_len:
            out.append(ids)
        if len(out) == n:
            break
    return out


def run(target_name: str, draft_name: str, n_prompts: int, prompt_len: int, new_tokens: int,
        gammas: list[int], repeats: int = 2, precision: str | None = None,
        static: bool = False, info: dict | None = None, models: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Rows per (prompt set, method) and the formula check; ``info`` (if given) receives the static graphs
    compiled per model and the seconds their first calls took, ``models`` the (prepared) target and draft."""
    from attnlab.hub import from_pretrained, load_tokenizer
    from attnlab.inference.generate import generate
    from attnlab.inference.speculative import expected_tokens_per_call, speculative_generate

    target, draft = from_pretrained(target_name), from_pretrained(draft_name)
    # the default call's models: from_pretrained and nothing else (separate objects when the others are prepared)
    default_target, default_draft = ((target, draft) if precision is None and not static else
                                     (from_pretrained(target_name), from_pretrained(draft_name)))
    if static and precision is None:
        precision = "fp32"
    if precision is not None:  # both through the fast decode path (speculation multiplies its gain)
        from attnlab.inference.fast import prepare_for_decode

        target, draft = (prepare_for_decode(m, precision=precision, compile="static" if static else False)
                         for m in (target, draft))
    if models is not None:
        models.update(target=target, draft=draft)
    tok = load_tokenizer(target_name)
    variants = [(DEFAULT_ROW, default_draft, 4), ("plain", None, None)] + [(f"draft γ={g}", draft, g) for g in gammas]
    from attnlab.inference.drafters import HybridDrafter

    variants += [("draft adaptive", draft, max(gammas)), ("prompt lookup γ=4", "prompt_lookup", 4),
                 ("hybrid γ=4", HybridDrafter(draft), 4), ("hybrid adaptive", HybridDrafter(draft), max(gammas))]
    prompt_sets = {"test split": test_prompts(tok, n_prompts, prompt_len),
                   "input-grounded": grounded_prompts(tok, n_prompts, target.config.max_seq_len - new_tokens)}
    rows, formula = [], []
    from tqdm.auto import tqdm

    progress = tqdm(total=sum(len(p) for p in prompt_sets.values()) * (repeats + int(static)),
                    desc="speculative rounds", unit="round", leave=False)
    for set_name, prompts in prompt_sets.items():
        totals = {name: dict(secs=0.0, decode_secs=0.0, tokens=0, calls=0, proposed=0, accepted=0, same=0, rejected=0)
                  for name, _, _ in variants}
        for ids in prompts:
            x = torch.tensor([ids])
            plain = generate(target, x, new_tokens)  # also the warm-up
            # the default call's reference: plain greedy decoding of the same unprepared models
            default_plain = plain if default_target is target else generate(default_target, x, new_tokens)
            best: dict[str, tuple[float, object]] = {}
            prefill = float("inf")
            for rnd in range(repeats + int(static)):  # every variant once per round: load spikes hit them alike
                progress.set_postfix_str(f"{set_name}{', compiling' if static and rnd == 0 else ''}")
                progress.update()
                with Stopwatch() as clock:
                    generate(target, x, 1)  # the prompt's prefill and first token: what every method pays alike
                if not (static and rnd == 0):
                    prefill = min(prefill, clock.seconds)
                for name, d, g in variants:
                    with Stopwatch() as clock:
                        if d is None:
                            res = (generate(target, x, new_tokens), None)
                        elif name == DEFAULT_ROW:  # exactly what a user writes; gives no statistics
                            res = (generate(default_target, x, new_tokens, draft=d), None)
                        else:
                            res = speculative_generate(target, d, x, new_tokens, gamma=g,
                                                       adaptive=name.endswith("adaptive"), return_stats=True)
                    secs = clock.seconds
                    if static and rnd == 0:
                        continue  # the untimed round that compiles this prompt's graphs
                    if name not in best or secs < best[name][0]:
                        best[name] = (secs, res)
            for name, _, _ in variants:
                secs, (out, st) = best[name]
                tot = totals[name]
                tot["secs"] += secs
                # decode phase: after the target's prefill and first token (the draft's own prefill stays in)
                tot["decode_secs"] += max(secs - prefill, 1e-9)
                tot["tokens"] += new_tokens
                if st is not None:
                    tot["calls"] += st.target_calls
                    tot["proposed"] += st.proposed
                    tot["accepted"] += st.accepted
                    tot["rejected"] += st.rejected
                tot["same"] += int(torch.equal(out, default_plain if name == DEFAULT_ROW else plain))
        n = len(prompts)
        base = totals["plain"]["tokens"] / totals["plain"]["secs"]
        base_decode = (totals["plain"]["tokens"] - n) / totals["plain"]["decode_secs"]
        for name, _, g in variants:
            tot = totals[name]
            toks = tot["tokens"]
            row = {"prompts": set_name, "method": name, "tok_per_s": toks / tot["secs"],
                   "decode_tok_per_s": (toks - n) / tot["decode_secs"]}
            if name != "plain":
                acc, rej = tot["accepted"], tot["rejected"]
                alpha = acc / max(acc + rej, 1)  # per position: see SpecStats.alpha
                identical = tot["same"] == n
                per_call = (toks - n) / max(tot["calls"], 1)  # each prompt's first token comes from its prefill
                differ = "outputs differ"
                row.update(identical=identical, speedup=row["tok_per_s"] / base if identical else differ,
                           decode_speedup=row["decode_tok_per_s"] / base_decode if identical else differ)
                if name != DEFAULT_ROW:  # generate() returns no statistics
                    row.update(acceptance=acc / max(tot["proposed"], 1), alpha=alpha, tokens_per_call=per_call)
                if name.startswith("draft γ="):
                    formula.append({"prompts": set_name, "gamma": g, "alpha": alpha,
                                    "measured_tokens_per_call": per_call,
                                    "formula_tokens_per_call": expected_tokens_per_call(alpha, g)})
            rows.append(row)
    progress.close()
    if static and info is not None:
        for role, m in (("target", target), ("draft", draft)):
            sd = m.static_decoder
            info[role] = ({"graphs": len(sd.stats.graphs), "compile_s": sum(sd.stats.graphs.values()),
                           "failed": sd.failed} if sd is not None else {"failed": "not covered"})
    return rows, formula


@torch.inference_mode()
def call_costs(model, widths: list[int], prompt_len: int = 128, calls: int = 20, rounds: int = 5) -> dict[int, float]:
    """Seconds of one ``model`` call that feeds ``w`` new tokens to a cache holding ``prompt_len``, per width
    (best of ``rounds`` means over ``calls``; the cache is cropped back after every call)."""
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, prompt_len + max(widths) + 1)
    model(torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g), cache=cache)
    def feed(x: torch.Tensor) -> None:
        for _ in range(calls):
            model(x, cache=cache)
            cache.crop(prompt_len)

    costs = {}
    for w in widths:  # the warm-up round also compiles this width's static graph
        x = torch.randint(0, model.config.vocab_size, (1, w), generator=g)
        costs[w] = timed(lambda x=x: feed(x), repeats=rounds, warmup=1)[0] / calls
    return costs


def ceiling(alpha: float, gamma: int, target_cost: dict[int, float], draft_cost: float) -> float:
    """Speed-up over plain decoding if a round cost nothing but its model calls: γ draft calls of one token and
    one target call of γ + 1, for the tokens per call that ``alpha`` predicts."""
    from attnlab.inference.speculative import expected_tokens_per_call

    round_cost = gamma * draft_cost + target_cost[gamma + 1]
    return expected_tokens_per_call(alpha, gamma) * target_cost[1] / round_cost


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, set_name in enumerate(sorted({r["prompts"] for r in rows})):
        for key, style, what in (("decode_speedup", "o-", "decode"), ("speedup", "s--", "whole call")):
            pts = [(int(r["method"].split("=")[1]), r[key]) for r in rows if r["prompts"] == set_name
                   and r["method"].startswith("draft γ=") and isinstance(r.get(key), float)]
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{set_name} prompts, {what}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("γ (drafted tokens per target call)")
    ax.set_ylabel("speed-up over plain greedy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: list[str]) -> int:
    p = parser("attnlab bench speculative", "Plain vs speculative decoding (draft model, adaptive, prompt lookup).")
    p.add_argument("--target", default="default")
    p.add_argument("--draft", default="default-draft")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    p.add_argument("--repeats", type=int, default=2, help="rounds per prompt; the best time of each method counts")
    p.add_argument("--threads", type=int, default=None)
    add_precision(p, ("fp32", "bf16", "int8"), default=None, flag="--precision",
                  help="prepare target and draft with the fast decode path at this precision")
    p.add_argument("--static", action="store_true",
                   help="also compile target and draft into static-shape decode graphs (precision fp32 unless "
                        "--precision is given)")
    p.add_argument("--costs", action="store_true",
                   help="also time single calls of each width and print each draft row's ceiling: the speed-up "
                        "if a round cost only its model calls")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info: dict = {}
    models: dict = {}
    rows, formula = run(args.target, args.draft, args.prompts, args.prompt_len, args.new_tokens, args.gammas,
                        args.repeats, args.precision, args.static, info, models)
    costs = None
    if args.costs:
        costs = {"target": call_costs(models["target"], sorted({1, *[g + 1 for g in args.gammas]}), args.prompt_len),
                 "draft": call_costs(models["draft"], [1], args.prompt_len)}
        for f in formula:
            f["ceiling_speedup"] = ceiling(f["alpha"], f["gamma"], costs["target"], costs["draft"][1])
    print(f"machine: {machine()}")
    print(markdown_table(rows, ["prompts", "method", "tok_per_s", "decode_tok_per_s", "acceptance", "alpha",
                                "tokens_per_call", "identical", "speedup", "decode_speedup"]))
    print()
    print(markdown_table(formula, ["prompts", "gamma", "alpha", "measured_tokens_per_call",
                                   "formula_tokens_per_call"] + (["ceiling_speedup"] if costs else [])))
    if costs:
        print("ms per call, by new tokens fed: target " + ", ".join(f"{w}: {c * 1e3:.2f}" for w, c in costs["target"].items())
              + f"; draft 1: {costs['draft'][1] * 1e3:.2f}")
    if args.plot:
        plot(rows, args.plot)
    if info:
        print(f"static decode graphs: {info}")
    write_json(args.json, {"machine": machine(), "rows": rows, "formula": formula, "precision": args.precision or ("fp32" if args.static else None),
                           "static": info or None,
                           "call_costs_s": None if costs is None else {k: {str(w): c for w, c in v.items()}
                                                                       for k, v in costs.items()}})
    return 0
