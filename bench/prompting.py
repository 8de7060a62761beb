"""The prompting survey's claims, measured on models trained here: few-shot, CoT, cascades.

    .venv/bin/python bench/prompting.py --policies RUN/policies   # the full run (~20-25 min, 1 thread)
    .venv/bin/python bench/prompting.py --smoke --out-json /tmp/smoke.json   # tiny, < 1 min
    .venv/bin/python bench/prompting.py --report-only              # docs/prompting.{md,png} from the JSON

RUN is an `emergence search-train --out RUN` folder (its policies S, M, L: RUN/policies/NAME/model).
Every model call goes through the prompt programs of `emergence.prompts` (ZeroShot, FewShot, CoT,
FewShotCoT, Template, and a two-stage Program for the cascade) over `LocalBackend`, greedy.

**1. Few-shot against zero-shot on format-following extraction.** The packaged emergence-6m knows
only children's stories; a fair small-scale test of in-context learning needs a model whose
pretraining text has what GPT-3's web text has: documents that repeat one format several times.
So the script writes, by program, synthetic financial summaries (`make_summary`: a company, a
date, a revenue and distractors such as profit or staff counts, in SUMMARY_TEMPLATES sentence
patterns; the answers come from the same draw and are asserted to appear in the text) and
pretraining documents (`corpus`):

- extraction documents (EXTRACTION_SHARE): 2-10 (summary -> extraction line) pairs, all in ONE
  format drawn per document from the family `Format`: which fields (all three, or one or two), their
  order, a key name per field, the key-value separator, the pair separator and brackets around
  the line, e.g. `Company: X | Date: Y | Revenue: Z` or `[Sales=Z; Firm=X; Day=Y]`;
- date documents (DATE_SHARE): pairs `Date: May 3, 2023` -> `ISO date: 2023-05-03` (for task 3);
- words documents (WORDS_SHARE): pairs `Revenue: $3.5 billion` -> `In words: 3.5 billion dollars` (task 3);
- plain documents: summaries run together.

A ~1M-parameter model (LLaMA shapes, as the search policies) is pretrained on them with the
project's trainer (search.train's route: `train_tokenizer`, `write_token_shards`,
`train.trainer.train`). Evaluation: held-out summaries (their own seed, none in the corpus), each
in a format of the *seen* family (drawn from the training components) or of the *unseen* family
(key names, separators and brackets that never occur in the corpus: UNSEEN). Prompts: ZeroShot
(an instruction naming the format in words, `Format.describe`) = k=0, and FewShot with k = 1, 2,
4, 8 worked examples after the same instruction; and the same without the instruction (k=0 then is
the bare query). Scored: exact match of the whole line, and per field (`key`+`kv`+`value` as one
pair of the line). Then the base is instruction-tuned (`emergence.finetune`, full, on zero-shot
rows: the ZeroShot prompt of a seen-family format -> its line) and evaluated the same way.

**2. Direct answer against CoT and few-shot CoT** on `problems.generate_problems` word problems,
seed EVAL_SEED (search-train uses seed 0; any question also in RUN/problems is dropped), per
difficulty with Wilson 95% intervals, for the policies S, M, L: direct = `Question: q\\nAnswer:`
(the first number of the reply); CoT = the policies' own training prompt (`Question: q\\nAnswer
step by step.\\n`); few-shot CoT = as many worked examples (canonical solutions of other,
1-2 step problems) as fit the policies' 320-token context before it, after reserving the longest
canonical solution of that difficulty (+ 8 tokens); separated by a blank line, or by the EOS token
(how the policies saw consecutive documents in pretraining).

**3. A cascade against a single prompt** on a two-stage task with the extraction models: the
summary's date in ISO form. Single prompt: 4 examples (summary -> ISO date); single prompt with the
intermediate written out (summary -> Date -> ISO date, one call); cascade: Program of two FewShot
stages, extract the date (4 examples), then convert it (4 examples), the second reading the
first's output. The corpus holds each stage's task, never the composition.

Writes bench/results/prompting.json, docs/prompting.md, docs/prompting.png (--smoke: only the JSON,
to --out-json). torch runs on --threads threads (default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import commit, machine  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "prompting.json"
DOC, PLOT = ROOT / "docs" / "prompting.md", ROOT / "docs" / "prompting.png"

# ------------------------------------------------------------------ settings
FULL = {
    "docs": 9000, "val_docs": 200, "vocab_size": 1024, "split_digits": False,
    "model": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "phases": [{"context": 256, "batch": 4, "steps": 6000, "lr": 4e-3}, {"context": 1024, "batch": 2, "steps": 300, "lr": 2e-3}],
    "it_rows": 3000, "it_steps": 190, "it_batch": 16, "it_lr": 1e-3,
    "extract_items": 200, "cascade_items": 200, "shots": 4,
    "problems_per_difficulty": 25, "cot_tokens": 160,
}
SMOKE = {
    "docs": 240, "val_docs": 16, "vocab_size": 1024, "split_digits": False,
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2},
    "phases": [{"context": 128, "batch": 2, "steps": 6, "lr": 3e-3}, {"context": 1024, "batch": 1, "steps": 4, "lr": 2e-3}],
    "it_rows": 32, "it_steps": 3, "it_batch": 4, "it_lr": 1e-3,
    "extract_items": 3, "cascade_items": 3, "shots": 2,
    "problems_per_difficulty": 1, "cot_tokens": 24,
}
KS = (0, 1, 2, 4, 8)
EXTRACT_MAX_TOKENS = 48
CORPUS_SEED, VAL_SEED, IT_SEED, EVAL_SEED, EXAMPLE_SEED = 11, 12, 13, 14, 15  # summaries and formats
TRAIN_SEED = 1337  # the trainer's
EVAL_PROBLEM_SEED, POOL_PROBLEM_SEED = 2718, 3141  # search-train generates its problems with seed 0
EXTRACTION_SHARE, DATE_SHARE, WORDS_SHARE = 0.72, 0.1, 0.08  # of the corpus's documents; the rest: plain

# ------------------------------------------------------------------ synthetic financial summaries
FIRST = ("Blue", "Alpha", "Nova", "Green", "Silver", "Red", "North", "Summit", "Bright", "Iron", "Delta", "Ocean",
         "Pioneer", "Golden", "Apex", "Cedar", "Crystal", "Falcon", "Harbor", "Lunar", "Maple", "Orbit", "Prime",
         "Quantum", "River", "Solar", "Stone", "Terra", "Vista", "Zenith")
SECOND = ("Tech", "Industries", "Systems", "Foods", "Energy", "Motors", "Labs", "Media", "Health", "Logistics",
          "Capital", "Networks", "Materials", "Retail", "Pharma", "Robotics", "Textiles", "Airlines")
SUFFIX = ("Inc.", "Corp.", "Ltd.", "Group", "LLC", "Co.", "")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS_IN = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
PERIODS = ("Q1", "Q2", "Q3", "Q4", "the first quarter", "the second quarter", "the third quarter",
           "the fourth quarter", "the fiscal year", "the first half", "the second half")
SUMMARY_TEMPLATES = (
    "{company} published its financial statement for {period} on {date}, showing a revenue of {revenue}.",
    "The quarterly earnings report for {company}, dated {date}, revealed a total revenue of {revenue} for {period}.",
    "On {date}, {company} announced revenue of {revenue} in its financial report for {period}.",
    "{company} reported revenue of {revenue} on {date}, up {pct}% from a year earlier.",
    "In a filing dated {date}, {company} said sales reached {revenue}, while net income was {profit}.",
    "Revenue at {company} came to {revenue} for {period}, according to results released on {date}.",
    "{company} closed {period} with {revenue} in revenue and {staff} employees, it said on {date}.",
    "Results released on {date} show that {company} earned {revenue} in revenue during {period}, with a profit "
    "of {profit}.",
    "With a profit of {profit} and revenue of {revenue}, {company} ended {period}, its report of {date} said.",
    "{company} said on {date} that its revenue for {period} fell {pct}% to {revenue}.",
)
SHORT_TEMPLATES = (  # one short sentence with the three answers and nothing else
    "{company} reported revenue of {revenue} on {date}.",
    "On {date}, {company} posted revenue of {revenue}.",
    "{company} said on {date} that revenue was {revenue}.",
)
SHORT_SHARE = 0.25  # of all summaries (corpus and evaluation alike)
EXTRA_SENTENCES = ("Its shares rose {pct}% after the news.", "The company employs {staff} people.",
                   "It was founded in {founded}.", "Analysts had expected {profit} in profit.",
                   "Its shares fell {pct}% on the day.")
FIELDS = ("company", "date", "revenue")
FIELD_WORDS = {"company": "the company", "date": "the date", "revenue": "the revenue"}


def _money(rng: random.Random, big: bool) -> str:
    if big and rng.random() < 0.35:
        return f"${rng.randint(1, 9)}.{rng.randint(1, 9)} billion"
    n = rng.randint(5, 950)
    return f"${n} million" if rng.random() < 0.6 else f"${n}.{rng.randint(1, 9)} million"


def make_summary(rng: random.Random) -> dict:
    """One synthetic summary and its answers: company, date ("May 3, 2023"), revenue ("$120 million"),
    iso ("2023-05-03"), template (its index in SUMMARY_TEMPLATES, or "short-i" for SHORT_TEMPLATES[i])."""
    company = f"{rng.choice(FIRST)} {rng.choice(SECOND)} {rng.choice(SUFFIX)}".strip()
    month = rng.randrange(12)
    day, year = rng.randint(1, DAYS_IN[month]), rng.randint(2015, 2025)
    date = f"{MONTHS[month]} {day}, {year}"
    revenue = _money(rng, big=True)
    profit = _money(rng, big=False)
    while profit == revenue:
        profit = _money(rng, big=False)
    short = rng.random() < SHORT_SHARE
    t = rng.randrange(len(SHORT_TEMPLATES) if short else len(SUMMARY_TEMPLATES))
    slots = {"company": company, "date": date, "revenue": revenue, "period": rng.choice(PERIODS),
             "profit": profit, "pct": rng.randint(2, 40), "staff": f"{rng.randint(2, 90)},{rng.randint(0, 999):03d}",
             "founded": rng.randint(1950, 2010)}
    text = (SHORT_TEMPLATES if short else SUMMARY_TEMPLATES)[t].format(**slots)
    text = text[0].upper() + text[1:]
    if not short and rng.random() < 0.3:
        text += " " + rng.choice(EXTRA_SENTENCES).format(**slots)
    row = {"summary": text, "company": company, "date": date, "revenue": revenue,
           "iso": f"{year}-{month + 1:02d}-{day:02d}", "template": f"short-{t}" if short else t}
    assert all(text.count(row[f]) == 1 for f in FIELDS), row  # each answer is in the text, once
    return row


def summaries(n: int, seed: int, avoid: set[str] = frozenset()) -> list[dict]:
    """n distinct summaries drawn by random.Random(seed), none of whose text is in `avoid`."""
    rng, out, seen = random.Random(seed), [], set(avoid)
    while len(out) < n:
        row = make_summary(rng)
        if row["summary"] not in seen:
            seen.add(row["summary"])
            out.append(row)
    return out


# ------------------------------------------------------------------ the format family
SEEN = {"keys": {"company": ("Company", "Company Name", "company", "Firm", "Name"),
                 "date": ("Date", "date", "Reported", "Day", "As of"),
                 "revenue": ("Revenue", "Total Revenue", "revenue", "Sales", "Rev")},
        "kv": (": ", " - ", " = ", " -> "), "sep": (" | ", "; ", ", ", " / "),
        "wrap": (("", ""), ("[", "]"), ("{", "}"))}
UNSEEN = {"keys": {"company": ("Issuer", "Entity"), "date": ("Filed", "When"), "revenue": ("Turnover", "Receipts")},
          "kv": (" := ", " >> "), "sep": (" || ", " & "), "wrap": (("<", ">"), ("(", ")"))}
FAMILIES = {"seen": SEEN, "unseen": UNSEEN}
WRAP_WORDS = {"": "", "[": ", inside square brackets", "{": ", inside curly braces", "<": ", inside angle brackets",
              "(": ", inside round brackets"}


@dataclass(frozen=True)
class Format:
    """One extraction format: fields in order, a key per field, the separators, the brackets."""

    fields: tuple[str, ...]
    keys: tuple[str, ...]
    kv: str
    sep: str
    wrap: tuple[str, str]

    def line(self, row: dict) -> str:
        pairs = [f"{k}{self.kv}{row[f]}" for f, k in zip(self.fields, self.keys)]
        return self.wrap[0] + self.sep.join(pairs) + self.wrap[1]

    def describe(self) -> str:
        """The format in words: the zero-shot instruction."""
        names = [FIELD_WORDS[f] for f in self.fields]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        pairs = ", then ".join(f'"{k}" and {FIELD_WORDS[f]}' for f, k in zip(self.fields, self.keys))
        text = (f"Extract {listed} from the summary. Write one line: {pairs}; put \"{self.kv}\" between each name "
                f"and its value")
        if len(self.fields) > 1:
            text += f' and "{self.sep}" between the pairs'
        return text + WRAP_WORDS[self.wrap[0]] + "."

    def field_ok(self, output: str, row: dict) -> dict[str, bool]:
        """Per field: is `key kv value` one pair of the line (after an opening bracket, a pair
        separator or the start; before a separator, a closing bracket or the end)?"""
        line = output.strip()
        before = "|".join(["^", *(re.escape(s) for s in (self.wrap[0], self.sep) if s)])
        after = "|".join(["$", *(re.escape(s) for s in (self.wrap[1], self.sep) if s)])
        return {f: re.search(f"(?:{before}){re.escape(k + self.kv + row[f])}(?:{after})", line) is not None
                for f, k in zip(self.fields, self.keys)}

    def shape_ok(self, output: str) -> bool:
        """The line has this format's keys in order, its separators and brackets, whatever the values."""
        inner = re.escape(self.sep).join(re.escape(k + self.kv) + ".+?" for k in self.keys)
        return re.fullmatch(re.escape(self.wrap[0]) + inner + re.escape(self.wrap[1]), output.strip()) is not None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def draw_format(rng: random.Random, family: str = "seen", fields: tuple[str, ...] | None = None) -> Format:
    """A format of the family; fields None: all three in a random order."""
    fam = FAMILIES[family]
    if fields is None:
        fields = tuple(rng.sample(FIELDS, 3))
    return Format(fields, tuple(rng.choice(fam["keys"][f]) for f in fields), rng.choice(fam["kv"]),
                  rng.choice(fam["sep"]), rng.choice(fam["wrap"]))


def corpus_format(rng: random.Random) -> Format:
    """A pretraining document's format: 75% all three fields, else one or two, in a random order."""
    if rng.random() < 0.75:
        return draw_format(rng)
    return draw_format(rng, fields=tuple(rng.sample(FIELDS, rng.choice((1, 2)))))


# ------------------------------------------------------------------ the pretraining corpus
INPUT_PREFIXES = ("Summary: ", "Summary: ", "Text: ", "Report: ")
DATE_KEYS, ISO_KEYS = ("Date", "date", "Day"), ("ISO date", "ISO", "Numeric date")
REVENUE_KEYS, WORDS_KEYS = ("Revenue", "revenue", "Sales"), ("In words", "Spelled out", "Said")


def date_pair(row: dict, src: str = "Date", dst: str = "ISO date") -> str:
    return f"{src}: {row['date']}\n{dst}: {row['iso']}"


def in_words(revenue: str) -> str:
    """'$3.5 billion' -> '3.5 billion dollars' (the second stage of the revenue task)."""
    return revenue.lstrip("$") + " dollars"


def words_pair(row: dict, src: str = "Revenue", dst: str = "In words") -> str:
    return f"{src}: {row['revenue']}\n{dst}: {in_words(row['revenue'])}"


def corpus(n_docs: int, seed: int) -> tuple[list[str], dict]:
    """n_docs pretraining documents and what they hold."""
    rng = random.Random(seed)
    docs, kinds, formats, summary_texts = [], {"extraction": 0, "date": 0, "words": 0, "plain": 0}, set(), set()
    pairs = 0
    for _ in range(n_docs):
        u = rng.random()
        n = rng.randint(2, 10)
        rows = [make_summary(rng) for _ in range(n)]
        summary_texts.update(r["summary"] for r in rows)
        if u < EXTRACTION_SHARE:
            fmt, prefix = corpus_format(rng), rng.choice(INPUT_PREFIXES)
            formats.add(fmt)
            docs.append("\n\n".join(f"{prefix}{r['summary']}\n{fmt.line(r)}" for r in rows))
            kinds["extraction"] += 1
            pairs += n
        elif u < EXTRACTION_SHARE + DATE_SHARE:
            src, dst = rng.choice(DATE_KEYS), rng.choice(ISO_KEYS)
            docs.append("\n\n".join(date_pair(r, src, dst) for r in rows))
            kinds["date"] += 1
        elif u < EXTRACTION_SHARE + DATE_SHARE + WORDS_SHARE:
            src, dst = rng.choice(REVENUE_KEYS), rng.choice(WORDS_KEYS)
            docs.append("\n\n".join(words_pair(r, src, dst) for r in rows))
            kinds["words"] += 1
        else:
            docs.append(" ".join(r["summary"] for r in rows))
            kinds["plain"] += 1
    return docs, {"documents": kinds, "extraction_pairs": pairs, "formats": formats, "summaries": summary_texts}


# ------------------------------------------------------------------ progress
def progress(total: int, label: str):
    """The progress line of an evaluation: done/total, rate, ETA (emergence.progress)."""
    from emergence.progress import Progress

    return Progress(total, "items", desc=label, every_s=20.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ training the extraction model
def train_extraction_model(work: Path, p: dict) -> tuple[Path, dict]:
    """Corpus -> tokenizer -> shards -> pretraining (search.train's route); the model folder and facts."""
    import numpy as np

    from emergence.data.shards import write_token_shards
    from emergence.search.train import PolicySize, parameter_counts, policy_config, train_tokenizer
    from emergence.train.trainer import TrainConfig, resolve_model_config, train

    t0 = time.perf_counter()
    docs, info = corpus(p["docs"], CORPUS_SEED)
    val_docs, _ = corpus(p["val_docs"], VAL_SEED)
    tok = train_tokenizer(docs, p["vocab_size"], split_digits=p["split_digits"])
    tok.save(work / "tokenizer")

    def ids(texts):
        out = []
        for t in texts:
            out += tok.encode(t) + [tok.eos_id]
        return np.asarray(out, dtype=np.int64)

    train_ids, val_ids = ids(docs), ids(val_docs)
    write_token_shards({"train": train_ids, "val": val_ids}, tok, work / "shards", source="bench/prompting.py corpus")
    data_s = time.perf_counter() - t0
    m = p["model"]
    block = max(ph["context"] for ph in p["phases"])
    first = p["phases"][0]
    size = PolicySize("extract", m["n_layer"], m["n_embd"], m["n_head"], first["steps"], first["lr"])
    config = resolve_model_config(policy_config(size, block, tok.vocab_size, tok.eos_id), tok.vocab_size,
                                  tok.eos_id, "next-token")
    log(f"extraction model: {parameter_counts(config)['params']:,} parameters, {len(train_ids):,} training tokens, "
        + ", then ".join(f"{ph['steps']} steps of {ph['batch']} x {ph['context']}" for ph in p["phases"]))
    phases, init, seconds = [], None, 0.0
    for i, ph in enumerate(p["phases"]):
        run = work / f"extract-base-{i + 1}"
        shutil.rmtree(run, ignore_errors=True)
        val_windows = max(1, len(val_ids) // (ph["batch"] * ph["context"]))
        steps = ph["steps"]
        tc = TrainConfig(data=str(work / "shards"), out=str(run), init=init, context=ph["context"],
                         batch_size=ph["batch"], max_steps=steps, lr=ph["lr"], min_lr=ph["lr"] / 10,
                         warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 4),
                         eval_batches=min(10, val_windows), checkpoint_every=0, log_every=max(1, steps // 20),
                         sample_tokens=16, seed=TRAIN_SEED + i, device="cpu", progress=False)
        t1 = time.perf_counter()
        result = train(config if init is None else None, tc)
        took = time.perf_counter() - t1
        seconds += took
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        phases.append({**ph, "tokens_seen": steps * ph["batch"] * ph["context"], "seconds": took,
                       "final_train_loss": result.train_loss, "final_val_loss": result.val_loss,
                       "val_loss": [(r["step"], r["val_loss"]) for r in metrics if r.get("val_loss") is not None],
                       "train_loss": [(r["step"], r["train_loss"]) for r in metrics
                                      if r.get("train_loss") is not None]})
        log(f"  phase {i + 1}: {steps} steps of {ph['batch']} x {ph['context']} in {took:.0f} s, val loss "
            f"{result.val_loss:.3f}")
        init = str(run / "model")
    doc_tokens = [len(tok.encode(d)) + 1 for d in docs]
    tokens_seen = sum(ph["tokens_seen"] for ph in phases)
    facts = {"documents": info["documents"], "extraction_pairs": info["extraction_pairs"],
             "distinct_formats": len(info["formats"]), "distinct_summaries": len(info["summaries"]),
             "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
             "mean_doc_tokens": sum(doc_tokens) / len(doc_tokens), "max_doc_tokens": max(doc_tokens),
             "vocab_size": tok.vocab_size, **parameter_counts(config), **m, "context": block, "phases": phases,
             "steps": sum(ph["steps"] for ph in phases), "tokens_seen": tokens_seen,
             "epochs": tokens_seen / len(train_ids), "final_val_loss": phases[-1]["final_val_loss"],
             "data_seconds": data_s, "train_seconds": seconds}
    return Path(init), {**facts, "_formats": info["formats"], "_summaries": info["summaries"]}


def zero_shot_stage(fmt: Format, instruction: bool = True):
    from emergence.prompts import ZeroShot

    return ZeroShot(name="extract", instruction=_literal(fmt.describe()) if instruction else None,
                    template="Summary: {summary}\n", separator="\n\n", max_tokens=EXTRACT_MAX_TOKENS, stop=["\n"])


def few_shot_stage(fmt: Format, examples: list[dict], k: int, instruction: bool = True):
    from emergence.prompts import FewShot

    shots = [{"summary": e["summary"], "line": fmt.line(e)} for e in examples]
    return FewShot(name="extract", instruction=_literal(fmt.describe()) if instruction else None, examples=shots, k=k,
                   example_template="Summary: {summary}\n{line}", template="Summary: {summary}\n", separator="\n\n",
                   max_tokens=EXTRACT_MAX_TOKENS, stop=["\n"])


def extraction_stage(fmt: Format, examples: list[dict], k: int, instruction: bool):
    return zero_shot_stage(fmt, instruction) if k == 0 else few_shot_stage(fmt, examples, k, instruction)


def _literal(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def stage_prompt(stage, env: dict) -> str:
    """The prompt a stage sends for `env` (nothing is called: these stages do not use the backend)."""
    from emergence.prompts.program import Settings, StageTrace

    return stage.prompt(env, None, StageTrace(stage.name, stage.kind, "", ""), Settings())


def instruction_tune(base: Path, work: Path, p: dict, avoid: set[str]) -> tuple[Path, dict]:
    """Full fine-tuning of the base on zero-shot rows (ZeroShot prompt of a seen-family format -> its line)."""
    from emergence.finetune.run import FinetuneConfig, finetune
    from emergence.train.trainer import TrainConfig

    rng = random.Random(IT_SEED)
    rows = []
    for s in summaries(p["it_rows"], IT_SEED, avoid):
        fmt = corpus_format(rng)
        rows.append({"prompt": stage_prompt(zero_shot_stage(fmt), {"summary": s["summary"]}),
                     "completion": fmt.line(s)})
    data = work / "instruct.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = work / "extract-instruct"
    shutil.rmtree(out, ignore_errors=True)
    fc = FinetuneConfig(model=str(base), data=[str(data)], method="full", chat_template="chatml", val_fraction=0.02,
                        sample_rows=1)
    steps = p["it_steps"]
    tc = TrainConfig(data="", out=str(out), context=None, batch_size=p["it_batch"], max_steps=steps, lr=p["it_lr"],
                     min_lr=p["it_lr"] / 10, warmup_steps=max(1, steps // 10), weight_decay=0.0,
                     eval_every=max(1, steps // 4), eval_batches=2, checkpoint_every=0, log_every=max(1, steps // 10),
                     seed=TRAIN_SEED, device="cpu", progress=False, sample_tokens=16)
    t = time.perf_counter()
    result = finetune(fc, tc)
    seconds = time.perf_counter() - t
    return out / "model", {"rows": len(rows), "steps": steps, "batch": p["it_batch"], "lr": p["it_lr"],
                           "method": "full", "epochs": steps * p["it_batch"] / len(rows),
                           "final_train_loss": result.train_loss, "final_val_loss": result.val_loss,
                           "seconds": seconds, "example_row": rows[0]}


# ------------------------------------------------------------------ evaluation: extraction
def extraction_items(n: int, avoid: set[str]) -> dict[str, list[dict]]:
    """Per family: n held-out items, each a summary, a format of the family and 8 example summaries."""
    queries = summaries(2 * n, EVAL_SEED, avoid)
    pool = summaries(400, EXAMPLE_SEED, avoid | {q["summary"] for q in queries})
    out = {}
    for j, family in enumerate(FAMILIES):
        rng = random.Random(f"{EVAL_SEED}:{family}")
        out[family] = [{"row": q, "format": draw_format(rng, family), "examples": rng.sample(pool, max(KS))}
                       for q in queries[j * n:(j + 1) * n]]
    return out


def run_extraction(backend, items: list[dict], k: int, instruction: bool, keep: int = 0) -> dict:
    from emergence.prompts import Program, PromptError

    exact, shape, fields, values, too_long, tokens, shown = 0, 0, {f: 0 for f in FIELDS}, {f: 0 for f in FIELDS}, 0, 0, []
    for it in items:
        fmt, row = it["format"], it["row"]
        stage = extraction_stage(fmt, it["examples"], k, instruction)
        try:
            trace = Program([stage], inputs=["summary"]).run(backend, {"summary": row["summary"]})
        except PromptError:
            too_long += 1
            continue
        out = trace.stages[0].output
        first = out.strip().split("\n")[0] if out.strip() else ""
        exact += first == fmt.line(row)
        shape += fmt.shape_ok(first)
        ok = fmt.field_ok(first, row)
        for f in FIELDS:
            fields[f] += ok[f]
            values[f] += row[f] in first
        tokens += trace.prompt_tokens
        if len(shown) < keep:
            shown.append({"prompt": trace.stages[0].prompt, "output": out, "target": fmt.line(row),
                          "examples": trace.stages[0].examples or []})
    n = len(items)
    return {"n": n, "exact": exact / n, "exact_count": exact, "format": shape / n,
            "fields": {f: fields[f] / n for f in FIELDS},
            "field_mean": sum(fields.values()) / (3 * n), "values": {f: values[f] / n for f in FIELDS},
            "too_long": too_long, "mean_prompt_tokens": tokens / max(1, n - too_long), "shown": shown}


def local_backend(model: Path):
    import emergence
    from emergence.prompts import LocalBackend

    return LocalBackend(emergence.load(str(model), device="cpu"))


def evaluate_extraction(model: Path, items: dict[str, list[dict]], label: str) -> dict:
    backend = local_backend(model)
    cells = [(fam, instr, k) for fam in items for instr in (True, False) for k in KS]
    meter = progress(len(cells) * len(next(iter(items.values()))), f"extraction ({label})")
    out = {}
    for fam, instr, k in cells:
        res = run_extraction(backend, items[fam], k, instr, keep=1 if fam == "seen" else 0)
        meter.update(len(items[fam]))
        out[f"{fam}/{'instruction' if instr else 'no-instruction'}/k={k}"] = res
    meter.close()
    return out


# ------------------------------------------------------------------ evaluation: the cascade
CASCADE_TASKS = {
    # name: (the field read out of the summary, its key, the key of the converted value, the conversion)
    "iso-date": ("date", "Date", "ISO date", lambda row: row["iso"]),
    "revenue-in-words": ("revenue", "Revenue", "In words", lambda row: in_words(row["revenue"])),
}
PROGRAMS = ("single", "single-with-intermediate", "cascade", "second-stage-alone")


def cascade_programs(task: str, examples: list[dict], shots: int) -> dict:
    """The four programs of a two-stage task; the examples are shared (the same `shots` summaries)."""
    from emergence.prompts import FewShot, Program

    field, src, dst, convert = CASCADE_TASKS[task]
    ex = [{"summary": e["summary"], "value": e[field], "target": convert(e)} for e in examples[:shots]]
    settings = {"examples": ex, "k": shots, "max_tokens": 20, "stop": ["\n"]}
    single = Program([FewShot(name="answer", example_template=f"Summary: {{summary}}\n{dst}: {{target}}",
                              template=f"Summary: {{summary}}\n{dst}:", **settings)], inputs=["summary"], name="single")
    shown = Program([FewShot(name="answer", example_template=f"Summary: {{summary}}\n{src}: {{value}}\n{dst}: {{target}}",
                             template=f"Summary: {{summary}}\n{src}:", pattern=rf"{dst}:[ \t]*(.+)",
                             fields={"value": r"^[ \t]*(.+)"}, **{**settings, "max_tokens": 48,
                                                                   "stop": ["\n\n", "Summary:"]})],
                    inputs=["summary"], name="single-with-intermediate")
    cascade = Program([
        FewShot(name="extract", example_template=f"Summary: {{summary}}\n{src}: {{value}}",
                template=f"Summary: {{summary}}\n{src}:", **settings),
        FewShot(name="convert", example_template=f"{src}: {{value}}\n{dst}: {{target}}",
                template=f"{src}: {{extract}}\n{dst}:", **settings),
    ], inputs=["summary"], name="cascade")
    alone = Program([FewShot(name="convert", example_template=f"{src}: {{value}}\n{dst}: {{target}}",
                             template=f"{src}: {{value}}\n{dst}:", **settings)], inputs=["value"],
                    name="second-stage-alone")
    return {"single": single, "single-with-intermediate": shown, "cascade": cascade, "second-stage-alone": alone}


def evaluate_cascade(backend, rows: list[dict], examples: list[dict], shots: int, label: str) -> dict:
    """Every program of every two-stage task on `rows`, through `backend` (a LocalBackend)."""
    from emergence.prompts import PromptError

    meter = progress(len(CASCADE_TASKS) * len(PROGRAMS) * len(rows), f"cascade ({label})")
    out = {}
    for task, (field, _, _, convert) in CASCADE_TASKS.items():
        out[task] = {}
        for name, program in cascade_programs(task, examples, shots).items():
            right = first = second = second_n = tokens = calls = too_long = wrote_second = lucky = partial = 0
            shown = []
            for row in rows:
                target = convert(row)
                inputs = {"value": row[field]} if name == "second-stage-alone" else {"summary": row["summary"]}
                try:
                    trace = program.run(backend, inputs)
                except PromptError:
                    too_long += 1
                    meter.update()
                    continue
                final = trace.stages[-1]
                # a stage with a pattern answers what it found (None: nothing); without one, its output
                answer = ((final.answer or "") if final.pattern else final.output).strip()
                ok = answer == target
                right += ok
                if task == "iso-date":  # month and day right, whatever the year
                    partial += answer[4:] == target[4:] and len(answer) == len(target)
                value = None
                if name == "cascade":
                    value = trace["extract"].output.strip()
                elif name == "single-with-intermediate":
                    value = (final.fields.get("value") or "").strip()
                    wrote_second += final.answer is not None  # it went on to the second line
                if value is not None:
                    first += value == row[field]
                    lucky += ok and value != row[field]  # right in the end from a wrong first step
                    if value == row[field]:
                        second_n += 1
                        second += ok
                tokens += trace.prompt_tokens + trace.completion_tokens
                calls += sum(len(s.calls) for s in trace.stages)
                if not shown:
                    shown.append({"stages": [{"name": s.name, "prompt": s.prompt, "output": s.output}
                                             for s in trace.stages], "target": target})
                meter.update()
            n = len(rows)
            res = {"n": n, "accuracy": right / n, "right": right, "too_long": too_long,
                   "tokens_per_item": tokens / max(1, n - too_long), "calls_per_item": calls / max(1, n - too_long),
                   "shown": shown}
            if task == "iso-date":
                res["month_day_right"] = partial / n
            if name in ("cascade", "single-with-intermediate"):
                res.update(first_right=first / n, second_right_given_first=second / second_n if second_n else None,
                           first_right_n=second_n, right_from_wrong_first=lucky / n)
            if name == "single-with-intermediate":
                res["wrote_second_line"] = wrote_second / n
            out[task][name] = res
    meter.close()
    return out


# ------------------------------------------------------------------ evaluation: arithmetic
def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of k successes in n trials (the one `emergence search` reports)."""
    from emergence.search.flops import wilson_interval

    return wilson_interval(k, n)


def arithmetic_problems(per_difficulty: int, run_dir: Path | None) -> tuple[list[dict], list[dict], dict]:
    """Held-out problems (EVAL_PROBLEM_SEED; any question of the policies' run dropped), per_difficulty
    of each difficulty 1..8; and the worked-example pool (POOL_PROBLEM_SEED, 1-2 steps)."""
    from emergence.problems import generate_problems, load_problems

    seen: set[str] = set()
    if run_dir is not None and (run_dir / "problems").is_dir():
        for f in sorted((run_dir / "problems").glob("*.jsonl")):
            seen.update(r["question"] for r in load_problems(f))
    rows = generate_problems(per_difficulty * 8 * 2 + 64, (1, 8), seed=EVAL_PROBLEM_SEED)
    dropped = sum(r["question"] in seen for r in rows)
    by: dict[int, list[dict]] = {}
    for r in rows:
        if r["question"] not in seen and len(by.setdefault(r["difficulty"], [])) < per_difficulty:
            by[r["difficulty"]].append(r)
    picked = [r for d in sorted(by) for r in by[d]]
    assert all(len(v) == per_difficulty for v in by.values()) and len(by) == 8
    taken = {r["question"] for r in picked}
    pool = [r for r in generate_problems(200, (1, 2), seed=POOL_PROBLEM_SEED)
            if r["question"] not in seen and r["question"] not in taken]
    return picked, pool, {"run_questions": len(seen), "candidates_in_run": dropped}


def direct_program():
    """The answer right after the question: its first number is the answer."""
    from emergence.prompts import Program, Template

    return Program([Template(name="answer", template="Question: {question}\nAnswer:", max_tokens=12, stop=["\n"],
                             pattern=r"^\s*\$?(-?\d[\d,]*(?:\.\d+)?)")], inputs=["question"], name="direct")


def cot_program(max_tokens: int):
    """The policies' own training prompt: the question, then "Answer step by step." (search.prompt)."""
    from emergence.prompts import CoT, Program

    return Program([CoT(name="answer", template="Question: {question}", instruction="Answer step by step.\n",
                        separator="\n", max_tokens=max_tokens)], inputs=["question"], name="cot")


def few_shot_cot_program(examples: list[dict], k: int, max_tokens: int, separator: str):
    """k worked examples (question, steps, answer) in the training format, then the CoT prompt; k=0: CoT."""
    from emergence.prompts import FewShotCoT, Program

    if k == 0:
        return cot_program(max_tokens)
    return Program([FewShotCoT(name="answer", examples=examples, k=k,
                               example_template="Question: {question}\nAnswer step by step.\n{steps}\n"
                                                "Answer: {answer}",
                               template="Question: {question}\nAnswer step by step.\n", separator=separator,
                               max_tokens=max_tokens)], inputs=["question"], name="few-shot-cot")


METHODS = ("direct", "cot", "few-shot-cot", "few-shot-cot-eos")
MAX_SHOTS = 4


def evaluate_arithmetic(policies: Path, p: dict, names=("S", "M", "L")) -> dict:
    import emergence
    from emergence.problems import extract_answer, solution_text
    from emergence.prompts import LocalBackend, PromptError
    from emergence.search.prompt import trim_solution

    run_dir = policies.parent if (policies.parent / "problems").is_dir() else None
    rows, pool, overlap = arithmetic_problems(p["problems_per_difficulty"], run_dir)
    out = {"problems": len(rows), "per_difficulty": p["problems_per_difficulty"], "seed": EVAL_PROBLEM_SEED,
           "pool_seed": POOL_PROBLEM_SEED, "overlap": overlap, "cot_max_tokens": p["cot_tokens"],
           "max_shots": MAX_SHOTS, "policies": {}}
    for name in names:
        lm = emergence.load(str(policies / name / "model"), device="cpu")
        tok, block = lm.tokenizer, lm.config.block_size
        backend = LocalBackend(lm)
        count = lambda text: len(tok.encode(text))  # noqa: E731
        examples = sorted(({"question": r["question"], "steps": r["steps"], "answer": r["answer"]} for r in pool),
                          key=lambda e: count(e["question"] + solution_text(e)))[:8]
        # the solution budget of a difficulty: its longest canonical solution (among the eval rows) + 8 tokens
        reserve: dict[int, int] = {}
        for r in rows:
            reserve[r["difficulty"]] = max(reserve.get(r["difficulty"], 0), count(solution_text(r)) + 8)
        max_tokens = min(p["cot_tokens"], block - 1)
        seps = {"few-shot-cot": "\n\n", "few-shot-cot-eos": tok.eos_token}
        records: dict[str, list[dict]] = {m: [] for m in METHODS}
        shown: dict[str, str] = {}
        meter = progress(len(rows) * len(METHODS), f"arithmetic ({name})")
        for r in rows:
            q = {"question": r["question"]}
            runs = {"direct": (direct_program(), 0), "cot": (cot_program(max_tokens), 0)}
            for label, sep in seps.items():
                k = 0  # as many examples as fit before the reserved solution
                for cand in range(1, MAX_SHOTS + 1):
                    prog = few_shot_cot_program(examples, cand, max_tokens, sep)
                    if count(stage_prompt(prog.stages[0], q)) + reserve[r["difficulty"]] <= block:
                        k = cand
                runs[label] = (few_shot_cot_program(examples, k, max_tokens, sep), k)
            for m, (prog, k) in runs.items():
                prompt = stage_prompt(prog.stages[0], q)
                shown.setdefault(m, prompt)
                prompt_len = count(prompt)
                budget = max(1, min(prog.stages[0].max_tokens, block - prompt_len - 1))
                try:
                    trace = prog.run(backend, q, max_tokens=budget)
                    text, answer = trace.stages[0].output, trace.stages[0].answer
                except PromptError:
                    text, answer = "", None
                if m == "direct":
                    correct = answer is not None and extract_answer("Answer: " + answer) == r["answer"]
                else:
                    got = extract_answer(trim_solution(text))
                    correct = got is not None and got == r["answer"]
                records[m].append({"difficulty": r["difficulty"], "correct": bool(correct), "k": k,
                                   "answered": (answer is not None) if m == "direct" else
                                   extract_answer(trim_solution(text)) is not None,
                                   "prompt_tokens": prompt_len, "output": text[:300]})
                meter.update()
        meter.close()
        res = {"params": lm.config.num_parameters(), "block_size": block, "methods": {},
               "examples_pool": [e["question"] for e in examples]}
        for m in METHODS:
            recs = records[m]
            by = {}
            for d in sorted({x["difficulty"] for x in recs}):
                sub = [x for x in recs if x["difficulty"] == d]
                c = sum(x["correct"] for x in sub)
                by[str(d)] = {"n": len(sub), "correct": c, "accuracy": c / len(sub), "wilson": wilson(c, len(sub)),
                              "mean_k": sum(x["k"] for x in sub) / len(sub),
                              "mean_prompt_tokens": sum(x["prompt_tokens"] for x in sub) / len(sub)}
            c = sum(x["correct"] for x in recs)
            res["methods"][m] = {"n": len(recs), "correct": c, "accuracy": c / len(recs),
                                 "answered": sum(x["answered"] for x in recs) / len(recs),
                                 "wilson": wilson(c, len(recs)), "by_difficulty": by,
                                 "example": {"prompt": shown[m], "output": recs[0]["output"]}}
        out["policies"][name] = res
    return out


# ------------------------------------------------------------------ smoke policies
def quick_policies(work: Path) -> Path:
    """search-train's quick setting, only as far as the policies (problems, tokenizer, shards, S/M/L)."""
    from emergence.search.train import SETTINGS, Pipeline

    out = work / "search-quick"
    pipe = Pipeline(out, SETTINGS["quick"], device="cpu", log=lambda m: None, setting_name="quick")
    pipe.check_setting()
    pipe.stage("problems", pipe.problems)
    pipe.stage("tokenizer", pipe.tokenizer_stage)
    pipe.stage("shards", pipe.shards)
    for size in SETTINGS["quick"].policies:
        pipe.stage(f"policy-{size.name}", lambda size=size: pipe.train_policy(size))
    return out / "policies"


# ------------------------------------------------------------------ the run
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default=None, metavar="DIR",
                    help="the search policies: DIR/{S,M,L}/model (an `emergence search-train --out RUN` run's "
                         "RUN/policies); --smoke without it trains search-train's quick policies")
    ap.add_argument("--smoke", action="store_true", help="tiny models, a few items per cell (< 1 min)")
    ap.add_argument("--out-json", default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}; --smoke: "
                    "required)")
    ap.add_argument("--work", default=None, help="folder for the corpus and models (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only")
    ap.add_argument("--report-only", action="store_true", help="only docs/prompting.md and .png from the JSON")
    ap.add_argument("--only-arithmetic", action="store_true", help="redo part 2 only (with --policies), into the "
                    "existing results file, and the page")
    args = ap.parse_args(argv)
    if args.smoke and not args.out_json:
        ap.error("--smoke needs --out-json (it never replaces the committed results)")
    if args.report_only:
        result = json.loads(Path(args.out_json or RESULTS).read_text())
        plot(result, PLOT)
        DOC.write_text(render_doc(result))
        return 0
    if args.only_arithmetic:
        if args.policies is None:
            ap.error("--only-arithmetic needs --policies DIR")
        import torch

        torch.set_num_threads(args.threads)
        path = Path(args.out_json or RESULTS)
        result = json.loads(path.read_text())
        t = time.perf_counter()
        result["arithmetic"] = evaluate_arithmetic(Path(args.policies), result["settings"])
        result["arithmetic"]["policies_dir"] = args.policies
        result["timings"]["arithmetic_eval"] = time.perf_counter() - t
        result["total_seconds"] = sum(result["timings"].values())
        result["arithmetic_commit"] = commit()
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if not args.smoke and not args.no_docs:
            plot(result, PLOT)
            DOC.write_text(render_doc(result))
        return 0
    if not args.smoke and args.policies is None:
        ap.error("--policies DIR is needed for the full run (an `emergence search-train` run's policies folder)")
    p = dict(SMOKE if args.smoke else FULL)
    out_json = Path(args.out_json) if args.out_json else RESULTS
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="prompting-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    timings = {}
    try:
        t = time.perf_counter()
        base, facts = train_extraction_model(work, p)
        formats, corpus_summaries = facts.pop("_formats"), facts.pop("_summaries")
        timings["pretrain"] = time.perf_counter() - t
        log(f"pretrained in {facts['train_seconds']:.0f} s: val loss {facts['final_val_loss']}")

        items = extraction_items(p["extract_items"], corpus_summaries)
        held = {q["row"]["summary"] for v in items.values() for q in v}
        t = time.perf_counter()
        instruct, it_facts = instruction_tune(base, work, p, corpus_summaries | held)
        timings["instruction_tune"] = time.perf_counter() - t
        log(f"instruction-tuned in {it_facts['seconds']:.0f} s: val loss {it_facts['final_val_loss']}")
        seen_in_corpus = sum(it["format"] in formats for it in items["seen"])
        unseen_in_corpus = sum(it["format"] in formats for it in items["unseen"])
        assert unseen_in_corpus == 0

        t = time.perf_counter()
        extraction = {"base": evaluate_extraction(base, items, "base"),
                      "instruct": evaluate_extraction(instruct, items, "instruction-tuned")}
        timings["extraction_eval"] = time.perf_counter() - t

        avoid = corpus_summaries | held
        crow = summaries(p["cascade_items"] + 8, EVAL_SEED + 100, avoid)
        cex, crows = crow[:8], crow[8:]
        t = time.perf_counter()
        cascade = {name: evaluate_cascade(local_backend(model), crows, cex, p["shots"], label)
                   for name, model, label in (("base", base, "base"), ("instruct", instruct, "instruction-tuned"))}
        timings["cascade_eval"] = time.perf_counter() - t

        policies = Path(args.policies) if args.policies else quick_policies(work)
        t = time.perf_counter()
        arithmetic = evaluate_arithmetic(policies, p)
        arithmetic["policies_dir"] = str(args.policies) if args.policies else "search-train quick (smoke)"
        timings["arithmetic_eval"] = time.perf_counter() - t

        rng = random.Random(0)
        sample_rows = summaries(6, CORPUS_SEED + 1000)
        result = {
            "script": "bench/prompting.py", "smoke": args.smoke, "settings": p, "ks": list(KS),
            "commit": commit(), "machine": machine(), "threads": args.threads,
            "date": datetime.date.today().isoformat(),
            "data": {"summary_templates": len(SUMMARY_TEMPLATES), "short_templates": len(SHORT_TEMPLATES),
                     "short_share": SHORT_SHARE, "samples": sample_rows,
                     "families": {k: {"keys": v["keys"], "kv": v["kv"], "sep": v["sep"], "wrap": v["wrap"]}
                                  for k, v in FAMILIES.items()},
                     "format_examples": [{"family": fam, "format": f.to_json(), "line": f.line(sample_rows[0]),
                                          "instruction": f.describe()}
                                         for fam in FAMILIES for f in [draw_format(rng, fam)]],
                     "corpus_example": corpus(1, 99)[0][0],
                     "eval_items": {fam: len(v) for fam, v in items.items()},
                     "eval_formats_in_corpus": {"seen": seen_in_corpus, "unseen": unseen_in_corpus},
                     "eval_summaries_in_corpus": sum(q["row"]["summary"] in corpus_summaries
                                                     for v in items.values() for q in v)},
            "extraction_model": facts, "instruction_tuning": it_facts,
            "extraction": extraction, "cascade": {"shots": p["shots"], "items": len(crows), "results": cascade},
            "arithmetic": arithmetic, "timings": timings, "total_seconds": time.perf_counter() - started,
        }
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if not args.smoke and not args.no_docs:
            plot(result, PLOT)
            DOC.write_text(render_doc(result))
        log(f"wrote {out_json} in {result['total_seconds']:.0f} s")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


# ------------------------------------------------------------------ the report
COLORS = {("base", "seen"): "#1f77b4", ("base", "unseen"): "#9ecae1", ("instruct", "seen"): "#d62728",
          ("instruct", "unseen"): "#fc9272"}
MODEL_NAMES = {"base": "base", "instruct": "instruction-tuned"}


def plot(r: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ks = r["ks"]
    for ax, instr in zip(axes[0], ("instruction", "no-instruction")):
        for model in ("base", "instruct"):
            for fam in ("seen", "unseen"):
                cells = [r["extraction"][model][f"{fam}/{instr}/k={k}"] for k in ks]
                ax.plot(range(len(ks)), [100 * c["exact"] for c in cells], "o-", color=COLORS[(model, fam)],
                        label=f"{MODEL_NAMES[model]}, {fam} formats")
                ax.plot(range(len(ks)), [100 * c["field_mean"] for c in cells], ":", color=COLORS[(model, fam)],
                        lw=1)
                ax.plot(range(len(ks)), [100 * c["format"] for c in cells], "--", color=COLORS[(model, fam)],
                        lw=1)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("examples in the prompt (k)")
        ax.set_ylabel("held-out items (%)")
        ax.set_ylim(-2, 102)
        n = r["extraction"]["base"][f"seen/{instr}/k=0"]["n"]
        ax.set_title(f"extraction, {'with' if instr == 'instruction' else 'without'} the instruction "
                     f"({n} items per point)\nsolid: line exact; dashed: format right (any values); dotted: fields right",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[1][0]
    a = r["arithmetic"]
    names = list(a["policies"])
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        xs = [i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(names))]
        acc = [100 * a["policies"][n]["methods"][m]["accuracy"] for n in names]
        lo = [100 * a["policies"][n]["methods"][m]["wilson"][0] for n in names]
        hi = [100 * a["policies"][n]["methods"][m]["wilson"][1] for n in names]
        ax.bar(xs, acc, width, label=m, yerr=[[x - y for x, y in zip(acc, lo)], [y - x for x, y in zip(acc, hi)]],
               capsize=3)
    ax.set_xticks(range(len(names)), [f"policy {n}" for n in names])
    ax.set_ylabel("held-out problems right (%)")
    ax.set_title(f"arithmetic word problems, difficulties 1-8 ({a['problems']} problems, Wilson 95%)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1][1]
    c = r["cascade"]["results"]
    groups = [(task, model) for task in c["base"] for model in ("base", "instruct")]
    width = 0.8 / len(PROGRAMS)
    for j, prog in enumerate(PROGRAMS):
        xs = [i + (j - (len(PROGRAMS) - 1) / 2) * width for i in range(len(groups))]
        cells = [c[model][task][prog] for task, model in groups]
        vals = [x["accuracy"] for x in cells]
        ci = [wilson(x["right"], x["n"]) for x in cells]
        ax.bar(xs, [100 * v for v in vals], width, label=prog,
               yerr=[[100 * (v - lo) for v, (lo, _) in zip(vals, ci)], [100 * (hi - v) for v, (_, hi) in zip(vals, ci)]],
               capsize=2)
    ax.set_xticks(range(len(groups)), [f"{task}\n{MODEL_NAMES[model]}" for task, model in groups], fontsize=8)
    ax.set_ylabel("items right (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"two-stage tasks: cascade against single prompts ({r['cascade']['items']} items, "
                 f"{r['cascade']['shots']} examples per prompt)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _ci(c: dict) -> str:
    lo, hi = c["wilson"]
    return f"{_pct(c['accuracy'], 1)} [{_pct(lo)}, {_pct(hi)}]"


def _code(text: str, limit: int = 2400) -> list[str]:
    text = text if len(text) <= limit else text[:limit] + "\n[...]"
    return ["```text", text.rstrip("\n"), "```"]


def extraction_table(r: dict, key: str, fmt) -> list[str]:
    ks = r["ks"]
    lines = ["| model | formats | prompt | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    for model in ("base", "instruct"):
        for fam in ("seen", "unseen"):
            for instr in ("instruction", "no-instruction"):
                cells = [r["extraction"][model][f"{fam}/{instr}/k={k}"] for k in ks]
                what = "instruction + k examples" if instr == "instruction" else "k examples only"
                lines.append(f"| {MODEL_NAMES[model]} | {fam} | {what} | " + " | ".join(fmt(c[key] if key else c)
                                                                                        for c in cells) + " |")
    return lines




def _cell(r: dict, model: str, fam: str, instr: str, k: int) -> dict:
    return r["extraction"][model][f"{fam}/{'instruction' if instr else 'no-instruction'}/k={k}"]


def reading(r: dict, part: str) -> list[str]:
    """What the figures say, in words (every number from the JSON)."""
    ks = r["ks"]
    cell = lambda *a: _cell(r, *a)  # noqa: E731
    best_exact = max(c["exact"] for m in r["extraction"].values() for c in m.values())
    fmt_curve = lambda model, fam, instr: " -> ".join(_pct(cell(model, fam, instr, k)["format"]) for k in ks)  # noqa: E731
    rev_curve = lambda model, fam, instr: " -> ".join(  # noqa: E731
        _pct(cell(model, fam, instr, k)["fields"]["revenue"]) for k in ks)
    pol = r["arithmetic"]["policies"]
    cr = r["cascade"]["results"]
    if part == "summary":
        out = [
            f"- **Few-shot (part 1).** On the base model, examples in the prompt take the share of answers in the "
            f"asked-for format (seen family, with the instruction; k = {', '.join(map(str, ks))}) "
            f"{fmt_curve('base', 'seen', True)}, and the revenue field {rev_curve('base', 'seen', True)}; "
            f"on the unseen family, format {fmt_curve('base', 'unseen', True)}. "
            + ("No prompt gets a whole line right (company and date are never copied from the summary): "
               "exact match is 0% in every cell." if best_exact == 0 else
               f"The best whole-line exact match of any cell is {_pct(best_exact, 1)}."),
            f"- **Instruction tuning (part 1).** Zero-shot (k=0) on seen formats: format "
            f"{_pct(cell('base', 'seen', True, 0)['format'])} -> {_pct(cell('instruct', 'seen', True, 0)['format'])}, "
            f"fields {_pct(cell('base', 'seen', True, 0)['field_mean'])} -> "
            f"{_pct(cell('instruct', 'seen', True, 0)['field_mean'])} (base -> instruction-tuned); unseen formats: "
            f"format {_pct(cell('base', 'unseen', True, 0)['format'])} -> "
            f"{_pct(cell('instruct', 'unseen', True, 0)['format'])}.",
            "- **Chain of thought (part 2).** " + "; ".join(
                f"policy {n}: direct {_pct(v['methods']['direct']['accuracy'], 1)}, CoT "
                f"{_pct(v['methods']['cot']['accuracy'], 1)}, few-shot CoT {_pct(v['methods']['few-shot-cot']['accuracy'], 1)}"
                f" / {_pct(v['methods']['few-shot-cot-eos']['accuracy'], 1)} (blank line / EOS)" for n, v in pol.items())
            + f" of {r['arithmetic']['problems']} held-out problems.",
            "- **Cascades (part 3).** " + "; ".join(
                f"{task} (base): single {_pct(cr['base'][task]['single']['accuracy'])}, single with the intermediate "
                f"{_pct(cr['base'][task]['single-with-intermediate']['accuracy'])}, cascade "
                f"{_pct(cr['base'][task]['cascade']['accuracy'])} (second stage alone, given the right value: "
                f"{_pct(cr['base'][task]['second-stage-alone']['accuracy'])})" for task in cr["base"]) + ".",
        ]
        return out
    if part == "extraction":
        e = r["extraction_model"]
        fields = lambda model, fam, k: cell(model, fam, True, k)["fields"]  # noqa: E731
        top = max(ks)
        b1, b8 = fields("base", "seen", 1), fields("base", "seen", top)
        out = [
            "What the figures say:",
            "",
            f"- **The examples teach the format, not the extraction.** Zero-shot, the base model writes the asked "
            f"format in {_pct(cell('base', 'seen', True, 0)['format'])} of the seen-family items (it was never "
            f"trained on an instruction; it mostly writes nothing or a format of its own). With one example it "
            f"writes the example's format in {_pct(cell('base', 'seen', True, 1)['format'])}, and more examples "
            f"change nothing ({', '.join(_pct(cell('base', 'seen', True, k)['format']) for k in ks[1:])} for k = "
            f"{', '.join(map(str, ks[1:]))}). The values are another matter: with one example the revenue is right "
            f"in {_pct(b1['revenue'])} of the items, the date in {_pct(b1['date'])}, the company in "
            f"{_pct(b1['company'])} ({_pct(b8['revenue'])}, {_pct(b8['date'])}, {_pct(b8['company'])} with {top}), "
            f"so no line is right as a whole. The revenue follows a `$` both in the summary and in the line, and a "
            f"head that matches the token after the same `$` copies it; the company and the date have to be found "
            f"by what they are, with nothing in the line that also stands before them in the summary. At "
            f"{e['params'] / 1e6:.2f}M parameters and {e['tokens_seen'] / 1e6:.1f}M training tokens the model "
            f"learned the first kind of copying and not the second (in shorter trial runs the revenue was the first "
            f"value to be copied, then the day after the month; the company never).",
            f"- **Unseen formats: nothing.** With key names, separators and brackets that never occur in the corpus, "
            f"the format is right in {_pct(max(cell('base', 'unseen', i, k)['format'] for i in (True, False) for k in ks))}"
            f" of the items at best, at any k, with or without the instruction: the model writes a format of the "
            f"family it was trained on instead of copying the new one from the examples. Its few-shot learning is "
            f"recognising which known format a document uses, not reading a new format from the context.",
            f"- **The instruction** changes little for the base model (with / without it at k=1: format "
            f"{_pct(cell('base', 'seen', True, 1)['format'])} / {_pct(cell('base', 'seen', False, 1)['format'])}, "
            f"fields {_pct(cell('base', 'seen', True, 1)['field_mean'])} / "
            f"{_pct(cell('base', 'seen', False, 1)['field_mean'])}): text it was never trained on, which it ignores.",
            f"- **Instruction tuning** raises zero-shot (k=0, seen formats) from format "
            f"{_pct(cell('base', 'seen', True, 0)['format'])} and fields "
            f"{_pct(cell('base', 'seen', True, 0)['field_mean'], 1)} to "
            f"{_pct(cell('instruct', 'seen', True, 0)['format'])} and "
            f"{_pct(cell('instruct', 'seen', True, 0)['field_mean'], 1)}: the tuned model writes the fields in the "
            f"asked order with the asked separators, but mostly with key names of its own (the instruction's quoted "
            f"names have to be copied, the same lookup the base lacks), and the revenue right in "
            f"{_pct(fields('instruct', 'seen', 0)['revenue'])}. It costs few-shot format-following: with examples "
            f"the format is right in {', '.join(_pct(cell('instruct', 'seen', True, k)['format']) for k in ks[1:])} "
            f"(k = {', '.join(map(str, ks[1:]))}) against the base's "
            f"{', '.join(_pct(cell('base', 'seen', True, k)['format']) for k in ks[1:])}. Unseen formats stay at "
            f"{_pct(max(cell('instruct', 'unseen', i, k)['format'] for i in (True, False) for k in ks))}.",
        ]
        return out
    if part == "arithmetic":
        out = ["What the figures say:", ""]
        for n, v in pol.items():
            m = v["methods"]
            best = max(METHODS, key=lambda x: m[x]["accuracy"])
            lo_best = m[best]["wilson"][0]
            apart = [x for x in METHODS if x != best and m[x]["wilson"][1] < lo_best]
            out.append(f"- Policy {n}: best {best} ({_ci(m[best])}); "
                       + (f"its interval lies above those of {', '.join(apart)}." if apart else
                          "its interval overlaps every other method's: at this accuracy the prompts cannot be told "
                          "apart."))
        direct = max(v["methods"]["direct"]["accuracy"] for v in pol.values())
        cot = {n: v["methods"]["cot"]["accuracy"] for n, v in pol.items()}
        fs = {n: max(v["methods"][m]["accuracy"] for m in ("few-shot-cot", "few-shot-cot-eos")) for n, v in pol.items()}
        helped = [n for n in pol if fs[n] > cot[n]]
        best_fs = lambda n: max((pol[n]["methods"][m] for m in ("few-shot-cot", "few-shot-cot-eos")),  # noqa: E731
                                key=lambda x: x["accuracy"])
        hurt = [n for n in pol if fs[n] < cot[n]]
        leak = [(n, v["methods"]["few-shot-cot-eos"]["example"]["output"].split("\n")[0]) for n, v in pol.items()
                if v["methods"]["few-shot-cot-eos"]["example"]["output"].split("\n")[0]
                != v["methods"]["cot"]["example"]["output"].split("\n")[0]]
        out += [
            "",
            f"**Chain of thought is what makes these problems solvable here:** asked for the answer alone, no "
            f"policy is right on more than {_pct(direct, 1)} of the problems (they do write a number, "
            + ", ".join(f"{n} {_pct(v['methods']['direct']['answered'])}" for n, v in pol.items())
            + " of the time, although no training document has `Answer:` right after the question), while their "
            "own step-by-step prompt gets " + ", ".join(f"{n} {_pct(a, 1)}" for n, a in cot.items()) + ". "
            + (f"**Worked examples before the question do not add to it** for {', '.join(hurt)}: the better of the "
               f"two few-shot variants is below zero-shot CoT ("
               + "; ".join(f"{n} {_pct(fs[n], 1)} against {_pct(cot[n], 1)}" for n in hurt) + ")" if hurt else "")
            + (f"; for {', '.join(helped)} it is above (" + "; ".join(f"{n} {_pct(fs[n], 1)} against "
                                                                        f"{_pct(cot[n], 1)}" for n in helped) + ")"
               if helped else "")
            + ". The policies learnt one problem per document, taking a step's operands from the text before it; "
            "with examples in front, numbers of the examples leak into the steps"
            + (" (the first item, whose zero-shot first step is `"
               + pol[leak[0][0]]["methods"]["cot"]["example"]["output"].split("\n")[0] + "`: policy "
               + leak[0][0] + " writes `" + leak[0][1] + "` after the examples, an operand taken from the example "
               "before it)" if leak else "")
            + ". The survey's few-shot CoT gain is a property of models that learn in context from varied "
            "documents; these learnt one format"
            + "".join(f"; {n}'s gain from the examples (" + _ci(best_fs(n)) + " against " + _ci(pol[n]["methods"]["cot"])
                      + ("): the intervals overlap" if best_fs(n)["wilson"][0] <= pol[n]["methods"]["cot"]["wilson"][1]
                         else "): the intervals do not overlap") for n in helped) + ".",
        ]
        return out
    if part == "cascade":
        out = ["What the figures say:", ""]
        for task in cr["base"]:
            for model in ("base", "instruct"):
                v = cr[model][task]
                c, w = v["cascade"], v["single-with-intermediate"]
                md = (lambda x: f" (month and day right: {_pct(x['month_day_right'])})") if task == "iso-date" else (
                    lambda x: "")
                out.append(
                    f"- {task}, {MODEL_NAMES[model]}: single prompt {_pct(v['single']['accuracy'], 1)}"
                    f"{md(v['single'])}; cascade {_pct(c['accuracy'], 1)}{md(c)}, its first stage right in "
                    f"{_pct(c['first_right'])} of the items ({c['first_right_n']}), the final answer right from a wrong "
                    f"first step in {_pct(c['right_from_wrong_first'])}; the second stage alone, on the right value: "
                    f"{_pct(v['second-stage-alone']['accuracy'], 1)}{md(v['second-stage-alone'])}. With the "
                    f"intermediate written in one prompt: {_pct(w['accuracy'], 1)}; the model stops after the first "
                    f"line in {_pct(1 - w['wrote_second_line'])} of the items.")
        b = cr["base"]
        rw, iso = b["revenue-in-words"], b["iso-date"]
        out += [
            "",
            f"The revenue task shows the claim: no single prompt answers it ({_pct(rw['single']['accuracy'])} right), "
            f"while the cascade does in {_pct(rw['cascade']['accuracy'])} of the items, bounded by its stages: the "
            f"extraction is right in {_pct(rw['cascade']['first_right'])}, the conversion of a right value in "
            f"{_pct(rw['cascade']['second_right_given_first'])} of those. The corpus taught each stage and never "
            f"their composition, and the model cannot compose them within one answer. Writing the intermediate into "
            f"one prompt does not work either: the model ends the pair after the first line in "
            f"{_pct(1 - rw['single-with-intermediate']['wrote_second_line'])} of the items, as every extraction pair "
            f"of its corpus ends, although the four examples show a second line. The date task shows the limit: its "
            f"first stage finds the whole date in {_pct(iso['cascade']['first_right'])} of the summaries, and the "
            f"conversion, even of the right date, gets the month and day right "
            f"({_pct(iso['second-stage-alone']['month_day_right'])}) but not the year, which it writes from its own "
            f"prior (right in {_pct(iso['second-stage-alone']['accuracy'])} of the items; the summaries' years are "
            f"2015-2025, one in eleven): the cascade's {_pct(iso['cascade']['accuracy'])} is the conversion's "
            f"guess of the year, right from a wrong first stage in {_pct(iso['cascade']['right_from_wrong_first'])} "
            f"of the items. A cascade cannot do a stage the model cannot. The instruction-tuned model is worse here "
            f"than the base: tuned on zero-shot extraction lines, its first stage is right in "
            f"{_pct(cr['instruct']['revenue-in-words']['cascade']['first_right'])} of the revenue items.",
        ]
        return out
    return []


def render_doc(r: dict) -> str:
    e, it, a, c = r["extraction_model"], r["instruction_tuning"], r["arithmetic"], r["cascade"]
    ex = r["extraction"]
    n_items = ex["base"]["seen/instruction/k=0"]["n"]
    g = lambda model, fam, instr, k: ex[model][f"{fam}/{instr}/k={k}"]  # noqa: E731
    lines = [
        "# Prompting techniques, measured on models trained here",
        "",
        "The prompting survey behind issue 18 claims that examples in the prompt (few-shot), "
        "reasoning steps (chain of thought) and chains of prompts (cascades) make a language model do tasks it "
        "does not do from a bare instruction. One script, `bench/prompting.py`, measures those claims on models "
        "trained in this repository, with the prompt programs of `emergence.prompts` (`ZeroShot`, `FewShot`, "
        "`CoT`, `FewShotCoT`, `Template`, a two-stage `Program`) over `LocalBackend`, greedy decoding. Every "
        "figure below comes from `bench/results/prompting.json`, written by that script.",
        "",
        *reading(r, "summary"),
        "",
        "![few-shot curves, arithmetic by method, cascade against single prompt](prompting.png)",
        "",
        "## 1. Zero-shot against few-shot: extracting a financial summary in a given format",
        "",
        "### A corpus in which documents repeat one format",
        "",
        "The packaged `emergence-6m` was trained on children's stories only and scores nothing on financial "
        "extraction with any prompt; that would test its data, not in-context learning. GPT-3's few-shot ability "
        "is usually traced to web text that repeats one format several times in a document (tables, lists, Q&A "
        "pages), so the script writes such a corpus by program and pretrains a small model on it:",
        "",
        f"- **Summaries** (`make_summary`): a company (30 x 18 x 7 name parts), a date (`May 3, 2023`), a "
        f"revenue (`$120 million`, `$45.2 million`, `$3.5 billion`), and distractors (a profit in dollars, a "
        f"percentage, a staff count, a founding year), in {r['data']['summary_templates']} sentence patterns "
        f"(30% with one more sentence), or, for {_pct(r['data']['short_share'])} of the summaries, in "
        f"{r['data']['short_templates']} short patterns with the three answers only. The answers come from the same draw; each is asserted to occur in its "
        f"text exactly once.",
        f"- **Extraction documents** ({_pct(e['documents']['extraction'] / sum(e['documents'].values()))} of the "
        f"documents): 2-10 pairs (summary, extraction line), all in **one format drawn per document** from a "
        f"family (`Format`): which fields (all three in 75% of the documents, else one or two), their order, a key "
        f"name per field, the key-value separator, the pair separator and brackets around the line; the input "
        f"line starts with `Summary: `, `Text: ` or `Report: `.",
        f"- **Date documents** ({_pct(e['documents']['date'] / sum(e['documents'].values()))}): pairs "
        f"`Date: May 3, 2023` / `ISO date: 2023-05-03` (key names varying per document), for task 3.",
        f"- **Words documents** ({_pct(e['documents']['words'] / sum(e['documents'].values()))}): pairs "
        f"`Revenue: $3.5 billion` / `In words: 3.5 billion dollars` (key names varying per document), for task 3.",
        f"- **Plain documents** ({_pct(e['documents']['plain'] / sum(e['documents'].values()))}): summaries run "
        f"together.",
        "",
        "The two format families (a format draws each component at random from its family's lists; the unseen "
        "family's key names, separators and brackets occur nowhere in the corpus):",
        "",
        "| | seen family (pretraining and evaluation) | unseen family (evaluation only) |",
        "|---|---|---|",
    ]
    fams = r["data"]["families"]
    for f in FIELDS:
        lines.append(f"| {f} keys | " + " | ".join(", ".join(f"`{k}`" for k in fams[x]["keys"][f])
                                                  for x in ("seen", "unseen")) + " |")
    for comp, name in (("kv", "key-value separator"), ("sep", "pair separator")):
        lines.append(f"| {name} | " + " | ".join(", ".join(f"`{v!s}`".replace("|", "\\|") for v in fams[x][comp])
                                                 for x in ("seen", "unseen")) + " |")
    lines.append("| brackets | " + " | ".join(", ".join(("`" + o + "...` " + "`" + cl + "`") if o else "none"
                                                       for o, cl in fams[x]["wrap"]) for x in ("seen", "unseen"))
                 + " |")
    fe = {x["family"]: x for x in r["data"]["format_examples"]}
    lines += [
        "",
        f"A seen-family line: `{fe['seen']['line']}`; an unseen one: `{fe['unseen']['line']}`. The zero-shot "
        f"instruction names the format in words (`Format.describe`), e.g.:",
        "",
        *_code(fe["unseen"]["instruction"]),
        "",
        "The beginning of a pretraining document:",
        "",
        *_code(r["data"]["corpus_example"][:700]),
        "",
        "### The models",
        "",
        f"**Base**: LLaMA shapes as the search policies (`search.train.policy_config`: RMSNorm, SwiGLU, RoPE, "
        f"tied embeddings), {e['n_layer']} layers x {e['n_embd']} wide, {e['n_head']} heads, context "
        f"{e['context']}: **{e['params']:,} parameters**. Byte-level BPE of {e['vocab_size']} tokens trained on the "
        f"corpus (`search.train.train_tokenizer`, digits not split), shards by `write_token_shards`, trained by "
        f"`train.trainer.train`: {sum(e['documents'].values()):,} "
        f"documents ({e['extraction_pairs']:,} extraction pairs in {e['distinct_formats']:,} distinct formats), "
        f"{e['train_tokens'] / 1e6:.2f}M tokens. Trained in {len(e['phases'])} phases (the second starts from "
        f"the first's weights, `TrainConfig.init`): "
        + "; ".join(f"{ph['steps']:,} steps of {ph['batch']} x {ph['context']} tokens at lr {ph['lr']:g} (cosine to "
                    f"lr/10), validation loss {ph['final_val_loss']:.3f} nats/token, {ph['seconds'] / 60:.1f} min"
                    for ph in e["phases"])
        + f". Short windows first: copying a value from the summary above it is learnt sooner when the window "
        f"holds fewer other tokens to attend to; the long phase teaches the positions the 8-example prompts reach. "
        f"In all {e['tokens_seen'] / 1e6:.2f}M tokens ({e['epochs']:.2f} epochs), AdamW, "
        f"{e['train_seconds'] / 60:.1f} min.",
        "",
        f"**Instruction-tuned**: the base, fully fine-tuned by `emergence.finetune` on {it['rows']:,} zero-shot "
        f"rows (`completion` rows: the ZeroShot prompt of a seen-family format, instruction and summary, -> its "
        f"line; loss on the line and EOS), {it['steps']} steps of {it['batch']} rows ({it['epochs']:.2f} epochs), "
        f"lr {it['lr']:g}; final held-out-row loss {it['final_val_loss']:.3f}, {it['seconds']:.0f} s. Its "
        f"summaries are not the evaluation's.",
        "",
        "### Evaluation",
        "",
        f"{n_items} held-out items per family (summaries of their own seed, none in the corpus or the tuning "
        f"rows; {r['data']['eval_formats_in_corpus']['seen']} of the {n_items} seen-family formats occur as such "
        f"in some pretraining document, the others are new combinations of seen components; no unseen-family "
        f"format does), each with its own format and 8 example summaries (another seed) rendered in it. Each cell "
        f"runs the same items: k=0 is `ZeroShot` (the instruction, then `Summary: ...`), k >= 1 is `FewShot` with "
        f"the first k of the item's examples (so the k=2 examples include the k=1 example), after the same "
        f"instruction or with no instruction at all (then k=0 is the bare `Summary: ...` line). Stop at a newline, "
        f"up to {EXTRACT_MAX_TOKENS} tokens. Scored: the whole line exactly right, and per field (its key, "
        f"separator and value as one pair of the line).",
        "",
        "**Whole line exactly right** (share of the items):",
        "",
        *extraction_table(r, "exact", lambda v: _pct(v)),
        "",
        "**Format right** (the line has the format's keys in order, its separators and brackets; any values):",
        "",
        *extraction_table(r, "format", lambda v: _pct(v)),
        "",
        "**Fields right** (mean over company, date, revenue):",
        "",
        *extraction_table(r, "field_mean", lambda v: _pct(v)),
        "",
        "An item of the seen family, base model, instruction + 1 example:",
        "",
    ]
    shown = g("base", "seen", "instruction", 1)["shown"]
    if shown:
        lines += [*_code(shown[0]["prompt"] + shown[0]["output"]), "", f"target: `{shown[0]['target']}`", ""]
    lines += [*reading(r, "extraction"), ""]
    # arithmetic
    pol = a["policies"]
    lines += [
        "## 2. Direct answer against chain of thought and few-shot CoT: arithmetic word problems",
        "",
        f"The policies S, M, L of the test-time-compute issue (`{a['policies_dir']}` of `emergence search-train "
        f"--setting long --out RUN`; see "
        f"`docs/test_time_compute.md`), pretrained on `Question: ...` / `Answer step by step.` / `Step k: a op b = "
        f"c` / `Answer: n` documents. {a['problems']} held-out problems, {a['per_difficulty']} per difficulty "
        f"(steps) 1-8, from `generate_problems(seed={a['seed']})` (search-train uses seed 0; "
        f"{a['overlap']['candidates_in_run']} generated question(s) that also occur in the run's "
        f"{a['overlap']['run_questions']:,} problems were dropped). Four prompt programs:",
        "",
        "- **direct** (`Template`): `Question: ...` then `Answer:`; the first number of the reply (up to 12 tokens, "
        "one line) is the answer.",
        f"- **CoT** (`CoT`): the question, then `Answer step by step.`: the policies' own training prompt; up to "
        f"{a['cot_max_tokens']} tokens; the answer as `emergence search` reads it (`extract_answer` after the first "
        f"`Answer:` line).",
        f"- **few-shot CoT** (`FewShotCoT`): up to {a['max_shots']} worked examples (canonical solutions of 1-2 step "
        f"problems of another seed, the shortest first) before the CoT prompt, separated by a blank line. The "
        f"policies' context is 320 tokens, so an item gets as many examples as fit after reserving the longest "
        f"canonical solution of its difficulty + 8 tokens (k=0 falls back to CoT); mean k per difficulty below.",
        "- **few-shot CoT, EOS** : the same, the examples separated by the EOS token, as consecutive documents were "
        "in pretraining.",
        "",
        "Accuracy with its Wilson 95% interval:",
        "",
        "| policy | parameters | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for name, pr in pol.items():
        lines.append(f"| {name} | {pr['params']:,} | " + " | ".join(_ci(pr["methods"][m]) for m in METHODS) + " |")
    diffs = list(next(iter(pol.values()))["methods"]["cot"]["by_difficulty"])
    lines += ["", f"Per difficulty ({a['per_difficulty']} problems each; accuracy, Wilson 95% in brackets):", "",
              "| policy | method | " + " | ".join(f"d{d}" for d in diffs) + " |",
              "|---|---|" + "---|" * len(diffs)]
    for name, pr in pol.items():
        for m in METHODS:
            by = pr["methods"][m]["by_difficulty"]
            lines.append(f"| {name} | {m} | " + " | ".join(
                f"{_pct(by[d]['accuracy'])} [{_pct(by[d]['wilson'][0])}, {_pct(by[d]['wilson'][1])}]" for d in diffs)
                + " |")
    first = next(iter(pol.values()))["methods"]
    lines += ["", "Mean number of examples that fit (few-shot CoT, blank-line / EOS separator), per difficulty: "
              + ", ".join(f"d{d} {first['few-shot-cot']['by_difficulty'][d]['mean_k']:.1f} / "
                          f"{first['few-shot-cot-eos']['by_difficulty'][d]['mean_k']:.1f}" for d in diffs) + ".", ""]
    lpol = pol[list(pol)[-1]]["methods"]
    lines += ["The prompts of the first problem (difficulty 1) and the largest policy's replies:", ""]
    for m in METHODS:
        lines += [f"**{m}**", "", *_code(lpol[m]["example"]["prompt"] + lpol[m]["example"]["output"]), ""]
    lines += [*reading(r, "arithmetic"), ""]
    # cascade
    cr = c["results"]
    lines += [
        "## 3. A cascade against a single prompt: two-stage tasks",
        "",
        f"Two tasks for the extraction models, each a value read out of a summary and then converted: "
        f"**iso-date** (the date, as ISO `YYYY-MM-DD`) and **revenue-in-words** (the revenue `$3.5 billion` as "
        f"`3.5 billion dollars`). The corpus has each stage (extraction documents with that field; date and words "
        f"documents for the conversion), never the two together. {c['items']} held-out summaries; every prompt "
        f"has the same {c['shots']} worked examples (`FewShot`):",
        "",
        "- **single**: one call, examples `Summary: ...` / `ISO date: 2023-05-03`.",
        "- **single-with-intermediate**: one call whose examples show `Summary: ...` / `Date: May 3, 2023` / "
        "`ISO date: 2023-05-03`; the model writes both lines.",
        "- **cascade**: a `Program` of two stages, `extract` (`Summary: ...` / `Date: ...`), then `convert` "
        "(`Date: {extract}` / `ISO date:`), which reads the first stage's output.",
        "- **second-stage-alone**: `convert` given the right value (what the cascade's second call can do at best).",
        "",
        "| task | model | program | right | first step right | second step right when the first was | calls | "
        "tokens per item |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in cr["base"]:
        for model in ("base", "instruct"):
            for prog, v in cr[model][task].items():
                ci = wilson(v["right"], v["n"])
                lines.append(f"| {task} | {MODEL_NAMES[model]} | {prog} | {_pct(v['accuracy'], 1)} [{_pct(ci[0])}, "
                             f"{_pct(ci[1])}] | {_pct(v.get('first_right'))} | "
                             f"{_pct(v.get('second_right_given_first'))}"
                             f"{' (of ' + str(v['first_right_n']) + ')' if v.get('first_right_n') is not None else ''}"
                             f" | {v['calls_per_item']:.0f} | {v['tokens_per_item']:.0f} |")
    for task in cr["base"]:
        casc = cr["base"][task]["cascade"]["shown"]
        if casc:
            lines += ["", f"The cascade on the first item of {task} (base model):", ""]
            for st in casc[0]["stages"]:
                lines += [f"stage `{st['name']}`:", "", *_code(st["prompt"] + st["output"]), ""]
    lines += [*reading(r, "cascade"), ""]
    t = r["timings"]
    lines += [
        "## Reproduce",
        "",
        "```sh",
        "emergence search-train --setting long --out RUN --threads 1   # the policies (docs/test_time_compute.md)",
        ".venv/bin/pip install matplotlib                  # for docs/prompting.png only",
        f"OMP_NUM_THREADS=1 .venv/bin/python bench/prompting.py --policies {a['policies_dir']}",
        ".venv/bin/python bench/prompting.py --smoke --out-json /tmp/smoke.json   # < 1 min, what the test runs",
        "```",
        "",
        f"Time of this run: {r['total_seconds'] / 60:.1f} min on {r['threads']} torch thread(s) "
        f"({r['machine']['cpu']}, {r['machine']['cores']} cores shared with other jobs): pretraining (corpus, "
        f"tokenizer, shards, training) {t['pretrain'] / 60:.1f} min, instruction tuning "
        f"{t['instruction_tune'] / 60:.1f} min, extraction evaluation {t['extraction_eval'] / 60:.1f} min, "
        f"cascade {t['cascade_eval'] / 60:.1f} min, arithmetic {t['arithmetic_eval'] / 60:.1f} min.",
        "",
        f"Results: `bench/results/prompting.json` (commit {r['commit']}, {r['date']}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
