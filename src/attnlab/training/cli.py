"""``attnlab train``: a model config (``--preset``, ``--config FILE`` and ``--set key=value`` overrides),
data (the built-in corpus, ``--data PATH`` or a built-in ``--task``), and a training budget.

Examples::

    attnlab train --preset default --out runs/target --max-time 2700
    attnlab train --preset default-draft --tokenizer runs/target --out runs/draft
    attnlab train --config my.yaml --set n_kv_heads=2 --steps 2000 --out runs/gqa
    attnlab train --out runs/target --resume
    attnlab train --preset translate-en-es --task translation --data data/en-es --out runs/translate-en-es
    torchrun --nproc-per-node 2 -m attnlab train --preset tiny --out runs/ddp
    torchrun --nproc-per-node 2 -m attnlab train --preset tiny --context-parallel 2 --out runs/cp
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from attnlab.checkpoint import WEIGHTS_NAME, write_json
from attnlab.commands.args import ALIASES, add_precision, parser
from attnlab.config import ModelConfig, check_field_types
from attnlab.presets import PRESETS
from attnlab.tokenizer import TOKENIZER_FILE, Tokenizer

TRAIN_KEYS = {f.name for f in fields(__import__("attnlab.training.trainer", fromlist=["TrainConfig"]).TrainConfig)}
EXTRA_KEYS = {"seq_len", "vocab_size"}


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different errors
        raise ValueError(f"--config {path} cannot be parsed: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping (model fields and training settings)")
    return data


def _split_settings(flat: dict) -> tuple[dict, dict]:
    """Split a flat or {"model": ..., "train": ...} mapping into model fields and training settings."""
    model = dict(flat.get("model", {}))
    train = dict(flat.get("train", {}))
    model_keys = {f.name for f in fields(ModelConfig)}
    for k, v in flat.items():
        if k in ("model", "train"):
            continue
        if k in model_keys:
            model[k] = v
        elif k in TRAIN_KEYS | EXTRA_KEYS:
            train[k] = v
        else:
            raise ValueError(f"unknown setting {k!r}: neither a ModelConfig field nor a training setting "
                             f"({', '.join(sorted(TRAIN_KEYS | EXTRA_KEYS))})")
    return model, train


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: write key=value, e.g. --set n_kv_heads=2")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string such as norm=layer
    return out


def build_parser():
    p = parser("attnlab train", "Train a model (see docs/training.md).")
    p.add_argument("--out", required=True, help="output model directory (also holds checkpoints/ and metrics)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named model size and training recipe")
    p.add_argument("--config", help="JSON or YAML file: model fields and training settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--data", help="text file, folder of text files, or JSONL with a 'text' field (default: stdlib); "
                                  "with --task translation: the folder made by `attnlab data translation`")
    p.add_argument("--task", help="a seq2seq task instead of text: numbers, digits, dates (built in) or translation "
                                  "(needs --data)")
    p.add_argument("--tokenizer", help="reuse the tokenizer.json of this model directory (e.g. a draft for a target)")
    p.add_argument("--init", help="start from this model directory's weights (e.g. after attnlab convert)")
    p.add_argument("--distill", metavar="TEACHER",
                   help="distil from this model (directory or shipped name): KL to its next-token distribution")
    p.add_argument("--teacher-data", metavar="DIR",
                   help="distil from stored teacher labels (made by `attnlab data teacher`); no teacher runs")
    p.add_argument("--distill-weight", type=float, default=0.9, help="weight of the KL term (the rest: CE)")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--distill-init-embeddings", action="store_true",
                   help="start the student's token table from the teacher's, projected on its principal directions "
                        "(with --teacher-data: the teacher named in its manifest)")
    add_precision(p, ("fp32", "bf16"), default="fp32", flag="--distill-precision",
                  help="run the teacher through the fast decode path at this precision (bf16: faster forward)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    for name, typ in (("steps", int), ("batch-size", int), ("grad-accum", int), ("seq-len", int), ("lr", float),
                      ("warmup", int), ("vocab-size", int), ("seed", int), ("eval-every", int), ("save-every", int),
                      ("max-time", float), ("keep-last", int), ("context-parallel", int)):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward/backward")
    add_precision(p, ("fp32", "bf16", "fp16"), default=None, flag="--save-dtype",
                  help="precision of the weights in --out and best/ (checkpoints keep fp32)")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files of the default corpus")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
    return value


def resolve_settings(args) -> tuple[dict, dict]:
    model, train = {}, {}
    if args.preset:
        model.update(PRESETS[args.preset]["model"])
        train.update(PRESETS[args.preset]["train"])
    if args.config:
        m, t = _split_settings(_load_config_file(args.config))
        model.update(m)
        train.update(t)
    m, t = _split_settings(_parse_set(args.set))
    model.update(m)
    train.update(t)
    for key in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup", "vocab_size", "seed", "eval_every",
                "save_every", "max_time", "keep_last", "save_dtype"):
        value = getattr(args, key)
        if value is not None:
            train[key] = value
    if isinstance(train.get("save_dtype"), str):  # a config file or --set may use the long name (bfloat16)
        train["save_dtype"] = ALIASES.get(train["save_dtype"], train["save_dtype"])
    if args.bf16:
        train["bf16"] = True
    return model, train


def main(argv: list[str]) -> int:
    from attnlab.training.distributed import DistContext
    from attnlab.training.resume import check_output, resume_settings, run_record
    from attnlab.training.trainer import TrainConfig, Trainer

    args = build_parser().parse_args(argv)
    model_fields, train = resolve_settings(args)
    check_field_types(model_fields)  # a wrong type in --set/--config: one line, before any work
    out = Path(args.out)
    latest = check_output(out, resume=args.resume)  # before any work: a file or foreign files in --out
    if latest is not None:  # every setting from the checkpoint; a flag that contradicts it is an error
        model_fields, train = resume_settings(latest, args, model_fields, train)
    elif args.resume:
        print(f"--resume: {out} holds no complete checkpoint; starting from step 0", file=sys.stderr)
    run = run_record(args, model_fields, train)
    dist_ctx = DistContext.from_env(args.context_parallel or 1)
    if args.context_parallel and args.context_parallel > 1:
        model_fields.update(attention_kernel="ring", ring_layout="zigzag")
    seq_len = _positive_int("seq_len", train.pop("seq_len", 256))
    vocab_size = _positive_int("vocab_size", train.pop("vocab_size", 8192))
    tcfg = TrainConfig(**{k: v for k, v in train.items() if k in TRAIN_KEYS}).validate()  # before any work

    if args.task == "translation":
        from attnlab.tasks.translation.task import build_translation_run

        if args.vocab_size is not None or args.tokenizer:
            raise ValueError("--task translation uses the tokenizer of its --data folder; choose its size with "
                             "`attnlab data translation --vocab-size N`")

        task, model_fields, extra_files, info = build_translation_run(args.data, model_fields,
                                                                      seed=train.get("seed", 0))
    elif args.task:
        from attnlab.tasks.seq2seq_data import build_task_run

        task, model_fields, extra_files, info = build_task_run(args.task, model_fields, seed=train.get("seed", 0))
    elif args.teacher_data:
        if args.distill:
            raise ValueError("--teacher-data and --distill are two ways to distil: choose one")
        task, model_fields, extra_files, info = _teacher_data_run(args, model_fields)
    else:
        task, model_fields, extra_files, info = _text_run(args, model_fields, seq_len, vocab_size, latest)

    cfg = _model_config(model_fields, args)
    torch.manual_seed(int(train.get("seed", 0)))  # initialisation (and dropout) are reproducible from --seed
    model = _build(cfg, args)
    if args.distill:
        from attnlab.hub import from_pretrained
        from attnlab.training.distill import DistillTask

        if args.task:
            raise ValueError("--distill works with text training, not with --task")
        from attnlab.inference.fast import prepare_for_decode

        teacher = prepare_for_decode(from_pretrained(args.distill), precision=args.distill_precision)
        task = DistillTask(task, teacher, weight=args.distill_weight,
                           temperature=args.distill_temperature)
        task.check_student(model)
        if args.distill_init_embeddings and latest is None:
            _init_embeddings(model, teacher)
    if args.teacher_data:
        task.check_student(model)
        if cfg.head_vocab_size and latest is None:
            from attnlab.training.teacher_data import frequent_tokens

            always = tuple(i for i in (cfg.eos_token_id,) if i is not None)
            model.head_token_ids.copy_(frequent_tokens(task.train, cfg.head_vocab_size, always=always))
        if args.distill_init_embeddings and latest is None:
            from attnlab.hub import from_pretrained

            _init_embeddings(model, from_pretrained(task.train.settings["teacher"]))
    if dist_ctx.is_main:
        print(f"model: {cfg.family}, {model.num_parameters():,} parameters; {info}", file=sys.stderr)
    start = time.time()
    trainer = Trainer(model, task, tcfg, out, extra_files=extra_files, dist_ctx=dist_ctx, progress=not args.quiet,
                      run=run)
    summary = trainer.fit(resume=latest is not None)
    if dist_ctx.is_main:
        record = {"command": "attnlab train " + " ".join(argv), "steps": summary["step"],
                  "best_val_loss": summary["best_val_loss"], "wall_seconds": round(time.time() - start, 1),
                  "parameters": model.num_parameters(), "info": info, "processes": dist_ctx.world,
                  "last_eval": next((r for r in reversed(trainer.history) if r.get("split") == "validation"), None)}
        if args.task == "translation":  # the held-out test books, greedy, scored once with the best checkpoint
            record.update(_test_bleu(args.data, out))
        elif args.task:  # the held-out test split, scored once with the best checkpoint
            record["test_exact_match"] = _test_exact_match(args.task, out)
        write_json(out / "training.json", record)
        print(json.dumps(record), file=sys.stderr)
    dist_ctx.close()
    return 130 if summary["interrupted"] else 0  # stopped by SIGINT/SIGTERM: saved, and said so


def _test_exact_match(task: str, out: Path) -> float:
    from attnlab.hub import load_model
    from attnlab.tasks.seq2seq_data import exact_match, test_split

    best = out / "best" if (out / "best" / WEIGHTS_NAME).is_file() else out
    return exact_match(load_model(best), test_split(task))


def _test_bleu(data: str, out: Path) -> dict:
    from attnlab.hub import load_model, load_tokenizer
    from attnlab.tasks.translation.data import SOURCE, TARGET, load_split
    from attnlab.tasks.translation.task import evaluate

    best = out / "best" if (out / "best" / WEIGHTS_NAME).is_file() else out
    pairs = [(r[SOURCE], r[TARGET]) for r in load_split(data, "test")]
    res = evaluate(load_model(best), load_tokenizer(best), pairs)
    return {"test_pairs": len(pairs), "test_bleu_greedy": round(res["bleu"], 2), "test_chrf_greedy": round(res["chrf"], 2)}


def _text_run(args, model_fields: dict, seq_len: int, vocab_size: int, latest: Path | None):
    from attnlab.tokenizer import train_bpe
    from attnlab.training.corpus import load_corpus
    from attnlab.training.data import TokenWindows, build_shards, separator_id
    from attnlab.training.losses import LMTask

    corpus = load_corpus(args.data, max_files=args.max_files)
    tok_source = latest or args.tokenizer  # a resumed run reads its tokenizer from its newest complete checkpoint
    if tok_source is None and args.init and (Path(args.init) / TOKENIZER_FILE).is_file():
        tok_source = args.init  # uptraining (e.g. after attnlab convert) keeps the model's own tokenizer
    tok = _reused_tokenizer(tok_source) if tok_source is not None else train_bpe(corpus.documents["train"],
                                                                                  vocab_size)
    shards = build_shards(corpus, tok)
    train_bytes = corpus.n_bytes("train")
    bytes_per_token = train_bytes / max(1, shards["train"].size)
    task = LMTask(TokenWindows(shards["train"], seq_len, name="train"),
                  TokenWindows(shards["validation"], seq_len, name="validation"), bytes_per_token=bytes_per_token)
    eos = tok.eos_token_id if tok.eos_token_id is not None else separator_id(tok)
    tok = _with_eos(tok, eos)
    model_fields = {**model_fields, "vocab_size": tok.vocab_size, "eos_token_id": eos}
    model_fields.setdefault("max_seq_len", max(seq_len, 256))
    if seq_len > model_fields["max_seq_len"]:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model_fields['max_seq_len']}")

    info = (f"corpus {corpus.name}: {train_bytes / 1e6:.1f} MB train, {shards['train'].size:,} tokens "
            f"({bytes_per_token:.2f} bytes/token), vocab {tok.vocab_size}")
    return task, model_fields, tok.save, info


def _with_eos(tok: Tokenizer, eos: int) -> Tokenizer:
    """The same tokenizer declaring ``eos`` as its end token (what a model trained on it stops at)."""
    return Tokenizer(tok.backend, eos_token=tok.id_to_token(eos), bos_token=tok.bos_token, pad_token=tok.pad_token,
                     chat_template=tok.chat_template, add_bos_token=tok.add_bos_token)


def _init_embeddings(model, teacher) -> None:
    from attnlab.training.distill import init_embeddings_from_teacher

    kept = init_embeddings_from_teacher(model, teacher)
    print(f"student embeddings: teacher's table on its top {model.config.d_model} principal directions "
          f"({kept:.0%} of its variance)", file=sys.stderr)


def _reused_tokenizer(source) -> Tokenizer:
    """The tokenizer of a model directory, .gguf file or shipped name (e.g. smollm2: its own vocabulary and end
    token, <|im_end|>)."""
    from attnlab.hub import load_tokenizer

    return load_tokenizer(source)


def _teacher_data_run(args, model_fields: dict):
    from attnlab.training.data import separator_id
    from attnlab.training.distill import TeacherDataTask
    from attnlab.training.teacher_data import TeacherSequences, tokenizer_fingerprint

    train = TeacherSequences(args.teacher_data, "train")
    source = args.tokenizer or train.settings["teacher"]
    tok = _reused_tokenizer(source)
    if tokenizer_fingerprint(tok) != train.settings["tokenizer"]:
        raise ValueError(f"--teacher-data {args.teacher_data} was made with another tokenizer than {source}'s; "
                         f"pass the teacher's: --tokenizer {train.settings['teacher']}")
    task = TeacherDataTask(train, TeacherSequences(args.teacher_data, "validation"),
                           temperature=args.distill_temperature)
    eos = tok.eos_token_id if tok.eos_token_id is not None else separator_id(tok)
    tok = _with_eos(tok, eos)
    model_fields = {**model_fields, "vocab_size": tok.vocab_size, "eos_token_id": eos}
    longest = max(len(r) for r in train.rows["topk_ids"])
    model_fields.setdefault("max_seq_len", max(longest, 256))
    if longest > model_fields["max_seq_len"]:
        raise ValueError(f"--teacher-data sequences have {longest} positions, more than max_seq_len "
                         f"{model_fields['max_seq_len']}")

    positions = sum(int(n) for n in train.rows["length"])
    info = (f"teacher data {args.teacher_data}: {train.n} sequences, {positions:,} labelled positions "
            f"(teacher {train.settings['teacher']}, top-{train.settings['k']})")
    return task, model_fields, tok.save, info


def _model_config(model_fields: dict, args) -> ModelConfig:
    if args.init:
        from attnlab.checkpoint import read_config

        base = read_config(args.init)
        if model_fields.get("vocab_size", 0) > base.vocab_size:
            raise ValueError(f"--init {args.init}: the tokenizer has {model_fields['vocab_size']} tokens, the model "
                             f"only {base.vocab_size}; use the model's own tokenizer (--tokenizer {args.init})")
        return base.replace(**{k: v for k, v in model_fields.items() if k in ("dropout", "attention_kernel",
                                                                                  "ring_layout")})
    return ModelConfig(**model_fields)


def _build(cfg: ModelConfig, args) -> torch.nn.Module:
    from attnlab.models import build_model

    model = build_model(cfg)
    if args.init:
        from attnlab.checkpoint import load_state_checked, read_weights

        load_state_checked(model, read_weights(Path(args.init) / WEIGHTS_NAME), str(args.init))
    return model
