"""Instruction-tune emergence-6m on graded instructions made from TinyStories; report before/after.

    .venv/bin/python bench/instruction_tune.py               # the full run (~20-25 min on 2 busy cores)
    .venv/bin/python bench/instruction_tune.py --smoke --out-json /tmp/smoke.json   # 48 rows, 3 steps,
                                                  # LoRA r=8 and the base on 8 held-out rows (< 60 s)
    .venv/bin/python bench/instruction_tune.py --lr-check    # the learning-rate and --pack check (~12 min)
    .venv/bin/python bench/instruction_tune.py --report-only # docs/finetune.{md,png} from the JSON

**Data.** Stories: the TinyStories sample in ../shared/data/tinystories. Training rows are made
only from train/TinyStories-train.head2MiB.txt (stories separated by <|endoftext|>), held-out
rows only from valid/hf_TinyStories_validation.head.txt (no separator: paragraphs are separated
by blank lines, and a story starts at a paragraph beginning "Once upon a time" / "Once there
was" / "Once, there was"; the partial story the file starts with is skipped). Each story is cut
to its longest start of whole sentences of at most MAX_STORY_TOKENS tokens (`excerpt`). Four
instruction kinds, each with a deterministic grader (`grade`), and a target answer built from
the story that must pass its own grader (asserted):

- words: "Write a story about a {animal} that uses the words {w1}, {w2} and {w3}." The story's
  most frequent animal (ANIMALS) and three of its words (lower-case, 3+ letters, no stop words,
  among the split's COMMON_WORDS most frequent words); target: the story itself. Check: the
  answer has the animal and the three words as whole words (case-insensitive).
- title: "Give this story a title." + story. Target: "{Name} and the {Thing}" when the story
  has a main character name, else "The {Adjective} {Thing}" / "The {Thing}"; Thing = the word
  most often after a/an/the/his/her/their/my (an adjective of ADJECTIVES skipped, and kept for
  the second form). Check: one line, 2-6 words of letters (and '), no final period, title case
  (each word capitalised except TITLE_MINOR words after the first).
- retell: "Retell this story in {n} sentences." + story, n in 1..3. Target: the story's first n
  sentences that have no quotation marks. Check: `sentences(answer)` has exactly n parts and each
  ends with . ! or ? (a closing quote allowed): an unfinished last sentence fails.
- character: "Who is the main character of this story?" + story. Target: "The main character is
  {Name}." with Name the story's most frequent name (a capitalised word whose lower-case form is
  rare in the split's text, NAME_RATIO; strictly more frequent than the runner-up). Check: at
  most 12 words and the name as a whole word (case-sensitive).

Rows are chat rows {"messages": [user, assistant]}, rendered with a built-in chat template
(emergence-6m has none): chatml or vicuna, whichever gives fewer tokens over the training rows
with this tokenizer (both counts are recorded).

**Runs.** Every configuration (CONFIGS) is trained by `emergence.finetune.run.finetune` in a
process of its own (the peak RSS, ru_maxrss of that child, covers imports, loading and
training), on the same rows, steps, batch, context, packing and seed. Before (the base model)
and after, every held-out row is answered greedily: `emergence.load(model, adapter=...)`, the
prompt rendered with the template and its generation prompt, new tokens capped per kind
(MAX_NEW), stopping at EOS or the template's stop string; an answer passes when it stopped
before its cap and its grader accepts it.
tokens/s is the median of the run's metrics.jsonl windows (the loop counts batch x positions per
step, the positions being the longest training row's without --pack: an upper bound on the real
tokens). Wall time is that of the `finetune` call in the child: loading, training, its held-out
loss evaluations and saving.

Writes bench/results/instruction_tune.json, docs/finetune.md and docs/finetune.png (--smoke:
only the JSON, into --out-json). The full run also checks the commands that put the best model
(and one of the other route: full fine-tune or adapter) into a temporary local store
(EMERGENCE_HOME) and chat with it (--no-keep skips that). torch runs on --threads threads
(default 1: on the shared 2-core machine a second thread mostly waited: 2 threads trained at a
third of the speed of 1 while other jobs ran).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import commit, machine  # noqa: E402
SHARED = ROOT.parent / "shared" / "data" / "tinystories"
TRAIN_TEXT = SHARED / "train" / "TinyStories-train.head2MiB.txt"
VALID_TEXT = SHARED / "valid" / "hf_TinyStories_validation.head.txt"
RESULTS = ROOT / "bench" / "results" / "instruction_tune.json"
DOC, PLOT = ROOT / "docs" / "finetune.md", ROOT / "docs" / "finetune.png"
MODEL = "emergence-6m"
STORY_END = "<|endoftext|>"
STORY_STARTS = ("Once upon a time", "Once there was", "Once, there was")

KINDS = ("words", "title", "retell", "character")
MAX_NEW = {"words": 192, "title": 32, "retell": 128, "character": 32}
MAX_STORY_TOKENS = 128
COMMON_WORDS = 800  # story_words picks among the split's this many most frequent content words
NAME_RATIO = 0.1  # a name: lower-case occurrences at most this share of capitalised ones

ANIMALS = ("cat", "dog", "bird", "fish", "bunny", "rabbit", "bear", "frog", "lion", "duck", "mouse", "owl", "fox",
           "horse", "cow", "pig", "monkey", "elephant", "squirrel", "turtle", "puppy", "kitten", "bee", "butterfly",
           "ant", "tiger", "sheep", "giraffe", "snake", "deer", "wolf", "chicken", "hen", "goat", "dinosaur",
           "penguin", "ladybug", "worm", "spider", "whale", "shark", "dolphin", "zebra", "kangaroo", "bug", "lamb",
           "pony", "donkey", "crab", "snail", "dragon", "unicorn", "parrot", "seal", "hippo", "crocodile")
STOP = set("""a about after again all also always am an and any are around as asked at away back be because been
before being but by came can could day did do does doing don't down each even every for from get getting go going
got had has have having he her here hers him his how i if in into is it it's its just know let let's like looked
made make many me more mom dad mommy daddy much must my never new no not now of off oh on once one only or other
our out over said saw say see she should so some still than that that's the their them then there they this those
time to too told took up upon us very want wanted was wasn't we went were what when where which while who why
will with would yes you your felt feel thought think things thing something anything everything""".split())
ADJECTIVES = set("""little big small old young happy sad kind shiny pretty red blue green yellow pink purple orange
black white brown tiny huge tall long short soft hard funny silly brave smart nice good bad new special magic
beautiful colorful fluffy friendly scary dark bright strong lazy curious gentle wise proud angry grumpy sleepy
hungry lonely fancy clean dirty wet dry warm cold hot quiet loud fast slow""".split())
DETERMINERS = {"a", "an", "the", "his", "her", "their", "my"}
TITLE_MINOR = {"a", "an", "the", "and", "of", "in", "on", "with", "to", "for", "at", "by", "or"}
NOT_NAMES = {"I", "Mom", "Dad", "Mommy", "Daddy", "Mama", "Papa", "Grandma", "Grandpa", "God", "Mum", "Sir",
             "Mr", "Mrs", "Miss", "Ms", "Granny", "Nana", "Santa", "Christmas", "Sunday", "Saturday", "Monday",
             "OK", "Okay", "Hello", "Hi", "Bye", "Wow", "Yay", "Ouch", "Oops", "Please", "Thank", "Thanks", "Sorry"}

# The configurations: same rows, steps, batch, context, packing and seed; lr chosen per method by
# the --lr-check run (the "lr_check" key of the results): full 3e-4, LoRA/QLoRA 3e-3. No --pack: on
# these rows (183 tokens on average, 2.2 to a packed row of 512) it was slower per row (lr_check "pack").
CONFIGS = [
    {"name": "full", "method": "full", "lr": 3e-4},
    {"name": "lora-r4", "method": "lora", "r": 4, "lr": 3e-3},
    {"name": "lora-r8", "method": "lora", "r": 8, "lr": 3e-3},
    {"name": "lora-r16", "method": "lora", "r": 16, "lr": 3e-3},
    {"name": "qlora-nf4-r8", "method": "lora", "r": 8, "quantize": "nf4", "lr": 3e-3},
]
FULL = {"train_rows": 4000, "held_out_per_kind": 60, "steps": 140, "batch": 8, "context": 512, "pack": False,
        "val_fraction": 0.02, "eval_batches": 4, "evals": 7, "log_every": 5}
SMOKE = {"train_rows": 48, "held_out_per_kind": 2, "steps": 3, "batch": 2, "context": 512, "pack": False,
         "val_fraction": 0.1, "eval_batches": 1, "evals": 1, "log_every": 1}
SEED = 1337


# ------------------------------------------------------------------ stories
def train_stories(path: Path = TRAIN_TEXT) -> list[str]:
    """The train sample's stories (separated by <|endoftext|>), whitespace-normalised per line."""
    return [_clean(s) for s in path.read_text(encoding="utf-8").split(STORY_END) if s.strip()]


def valid_stories(path: Path = VALID_TEXT) -> list[tuple[str, float]]:
    """(story, where in the file as a fraction of its characters): paragraphs joined until the
    next paragraph that starts a story; the partial story before the first start is skipped."""
    text = path.read_text(encoding="utf-8")
    stories, current, start, offset = [], None, 0.0, 0
    for para in text.split("\n\n"):
        p = para.strip()
        here = offset / max(len(text), 1)
        offset += len(para) + 2
        if not p:
            continue
        if p.startswith(STORY_STARTS):
            if current:
                stories.append(("\n".join(current), start))
            current, start = [p], here
        elif current is not None:
            current.append(p)
    if current:
        stories.append(("\n".join(current), start))
    return [(_clean(s), w) for s, w in stories]


def _clean(story: str) -> str:
    return "\n".join(" ".join(line.split()) for line in story.strip().splitlines() if line.strip())


WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def words_of(text: str) -> list[str]:
    return WORD.findall(text)


def sentences(text: str) -> list[str]:
    """Split after . ! or ? (a closing quote may follow) and whitespace; empty parts dropped."""
    text = " ".join(text.split())
    return [p for p in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+", text) if p]


def excerpt(story: str, count_tokens, limit: int) -> str | None:
    """The story's longest start of whole sentences (paragraph breaks kept, quotation marks
    balanced) of at most `limit` tokens; None when that is fewer than 3 sentences."""
    units = []  # (sentence, separator after it)
    for line in story.splitlines():
        parts = sentences(line)
        units += [(u, " ") for u in parts[:-1]] + ([(parts[-1], "\n")] if parts else [])
    best, text, n = None, "", 0
    for u, sep in units:
        text += u
        n += 1
        if count_tokens(text) > limit:
            break
        if n >= 3 and text.count('"') % 2 == 0:
            best = text
        text += sep
    return best


class Lexicon:
    """Per-split word statistics: which capitalised words are names, which words are common."""

    def __init__(self, stories: list[str]) -> None:
        cap, low, docs = collections.Counter(), collections.Counter(), collections.Counter()
        for s in stories:
            ws = words_of(s)
            for w in ws:
                (cap if w[0].isupper() else low)[w] += 1
            docs.update({w.lower() for w in ws if w.islower()})
        self.names = {w for w, n in cap.items() if w not in NOT_NAMES and len(w) >= 2 and w[1:].islower()
                      and low[w.lower()] <= NAME_RATIO * n and w.lower() not in STOP and n >= 2}
        content = [(w, n) for w, n in docs.most_common() if len(w) >= 3 and w not in STOP and "'" not in w
                   and w not in ANIMALS]
        self.common = {w for w, _ in content[:COMMON_WORDS]}

    def main_character(self, story: str) -> str | None:
        """The most frequent name, when strictly more frequent than the runner-up."""
        counts = collections.Counter(w for w in words_of(story) if w in self.names)
        top = counts.most_common(2)
        if not top or top[0][1] < 2 or (len(top) > 1 and top[1][1] == top[0][1]):
            return None
        return top[0][0]


# ------------------------------------------------------------------ graders
def _has_word(text: str, word: str, case: bool = False) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, 0 if case else re.IGNORECASE) is not None


def grade(kind: str, check: dict, answer: str) -> bool:
    """Whether `answer` follows the instruction of kind `kind` (its parameters in `check`)."""
    answer = answer.strip()
    if not answer:
        return False
    if kind == "words":
        return all(_has_word(answer, w) for w in [check["animal"], *check["words"]])
    if kind == "title":
        if "\n" in answer or answer.endswith("."):
            return False
        parts = answer.split()
        if not 2 <= len(parts) <= 6 or not all(re.fullmatch(r"[A-Za-z]+(?:'[A-Za-z]+)?", p) for p in parts):
            return False
        return parts[0][0].isupper() and all(p[0].isupper() or p in TITLE_MINOR for p in parts[1:])
    if kind == "retell":
        parts = sentences(answer)
        return len(parts) == check["n"] and all(re.search(r"[.!?][\"']?$", p) for p in parts)
    if kind == "character":
        return len(answer.split()) <= 12 and _has_word(answer, check["name"], case=True)
    raise ValueError(f"unknown kind {kind!r}")


# ------------------------------------------------------------------ rows
def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_row(kind: str, story: str, lex: Lexicon, rng: random.Random) -> dict | None:
    """One instruction row of `kind` from `story` (None when the story does not allow it):
    {"kind", "check", "messages"}; the target passes its grader (asserted)."""
    if kind == "words":
        ws = [w.lower() for w in words_of(story)]
        animals = collections.Counter(w for w in ws if w in ANIMALS).most_common(1)
        if not animals or animals[0][1] < 2:  # "a story about" it: it comes up more than once
            return None
        animal = animals[0][0]
        pool = sorted({w for w in ws if w in lex.common and w in words_of(story)})
        if len(pool) < 3:
            return None
        chosen = rng.sample(pool, 3)
        check = {"animal": animal, "words": chosen}
        user = (f"Write a story about {article(animal)} {animal} that uses the words "
                f"{chosen[0]}, {chosen[1]} and {chosen[2]}.")
        target = story
    elif kind == "title":
        check = {}
        target = _title(story, lex)
        if target is None:
            return None
        user = f"Give this story a title.\n\n{story}"
    elif kind == "retell":
        n = rng.randint(1, 3)
        plain = [s for s in sentences(story) if '"' not in s and len(s.split()) <= 30]
        if len(plain) < n:
            return None
        target = " ".join(plain[:n])
        check = {"n": n}
        word = {1: "one sentence", 2: "two sentences", 3: "three sentences"}[n]
        user = f"Retell this story in {word}.\n\n{story}"
    elif kind == "character":
        name = lex.main_character(story)
        if name is None:
            return None
        check = {"name": name}
        target = f"The main character is {name}."
        user = f"Who is the main character of this story?\n\n{story}"
    else:
        raise ValueError(kind)
    assert grade(kind, check, target), (kind, check, target)
    return {"kind": kind, "check": check,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": target}]}


def _title(story: str, lex: Lexicon) -> str | None:
    ws = words_of(story)
    things, adjs = collections.Counter(), collections.defaultdict(collections.Counter)
    for i, w in enumerate(ws[:-1]):
        if w.lower() not in DETERMINERS:
            continue
        nxt, adj = ws[i + 1], None
        if nxt.lower() in ADJECTIVES and i + 2 < len(ws):
            adj, nxt = nxt.lower(), ws[i + 2]
        if (nxt.islower() and len(nxt) >= 3 and "'" not in nxt and nxt not in STOP and nxt not in ADJECTIVES):
            things[nxt] += 1
            if adj:
                adjs[nxt][adj] += 1
    if not things:
        return None
    thing = things.most_common(1)[0][0].capitalize()
    name = lex.main_character(story)
    if name is not None:
        return f"{name} and the {thing}"
    adj = adjs[thing.lower()].most_common(1)
    return f"The {adj[0][0].capitalize()} {thing}" if adj else f"The {thing}"


def build_rows(stories: list[str], lex: Lexicon, count: int, count_tokens, seed: int, *,
               per_kind: bool) -> list[dict]:
    """Rows from the stories' excerpts of at most MAX_STORY_TOKENS tokens, taken in a seeded
    order: `count` rows of each kind (per_kind: held-out rows) or `count` in all (training rows),
    the kinds as even as the stories allow. A story gives at most one row of each kind, but two
    "words" rows for training (two draws of its words)."""
    rng = random.Random(seed)
    order = list(range(len(stories)))
    rng.shuffle(order)
    rows: dict[str, list[dict]] = {k: [] for k in KINDS}
    want = count if per_kind else math.ceil(count / len(KINDS))
    spare: list[dict] = []  # rows past a kind's share: they fill up the total when another kind runs short
    for i in order:
        story = excerpt(stories[i], count_tokens, MAX_STORY_TOKENS)
        if story is None:
            continue
        for kind in KINDS:
            # training: two "words" rows per story (two draws of the words): stories with an animal are scarce
            checks = []
            for variant in range(2 if kind == "words" and not per_kind else 1):
                rng_row = random.Random(f"{seed}:{i}:{kind}" + (f":{variant}" if variant else ""))
                row = make_row(kind, story, lex, rng_row)
                if row is None or row["check"] in checks:
                    continue
                checks.append(row["check"])
                row["story"] = i
                (rows[kind] if len(rows[kind]) < want else spare).append(row)
        if all(len(r) >= want for r in rows.values()):
            break
    out = [r for k in KINDS for r in rows[k]]
    if not per_kind:
        out += spare[:max(0, count - len(out))]
        rng.shuffle(out)
    return out


def write_jsonl(rows: list[dict], path: Path, keys: tuple[str, ...] = ()) -> None:
    """Chat rows {"messages": [...]} (with `keys` of each row before them)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({**{k: r[k] for k in keys}, "messages": r["messages"]}) + "\n")


# ------------------------------------------------------------------ templates, prompts
def row_tokens(rows: list[dict], template_name: str, tokenizer) -> int:
    from emergence.chat import ChatTemplate, template_variables

    tpl, variables = ChatTemplate.builtin(template_name), template_variables(tokenizer)
    return sum(len(tokenizer.encode(tpl.render(r["messages"], **variables), add_bos=False)) for r in rows)


def answer_rows(lm, template_name: str, rows: list[dict], max_new: dict, batch: int = 16) -> list[tuple[str, bool]]:
    """Greedy (answer, finished) for the user turns of `rows`, grouped by kind (each its own
    token cap); finished: it ended with EOS or the template's stop string, not at the cap."""
    from emergence.chat import ChatTemplate, template_variables

    tpl = ChatTemplate.builtin(template_name)
    variables = template_variables(lm.tokenizer)
    answers: list[tuple[str, bool]] = [("", False)] * len(rows)
    for kind in KINDS:
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        for j in range(0, len(idx), batch):
            part = idx[j:j + batch]
            prompts = [tpl.render(rows[i]["messages"][:1], add_generation_prompt=True, **variables) for i in part]
            outs = lm.generate_batch(prompts, temperature=0, max_new_tokens=max_new[kind], stop=list(tpl.stop))
            for i, o in zip(part, outs):
                answers[i] = (o.text, o.finish_reason != "length")
    return answers


def score(rows: list[dict], answers: list[tuple[str, bool]]) -> dict:
    """Pass = the answer finished before its token cap and its grader accepts it."""
    ok = [finished and grade(r["kind"], r["check"], a) for r, (a, finished) in zip(rows, answers)]
    by_kind = {k: [o for o, r in zip(ok, rows) if r["kind"] == k] for k in KINDS}
    graded_only = [grade(r["kind"], r["check"], a) for r, (a, _) in zip(rows, answers)]
    # partial credit for "words": the share of its 4 asked-for words (animal + 3) the answer has
    coverage = [sum(_has_word(a, w) for w in [r["check"]["animal"], *r["check"]["words"]]) / 4
                for r, (a, _) in zip(rows, answers) if r["kind"] == "words"]
    return {"overall": sum(ok) / len(ok), "passed": sum(ok), "rows": len(ok),
            "by_kind": {k: (sum(v) / len(v) if v else None) for k, v in by_kind.items()},
            "finished": sum(f for _, f in answers) / len(answers),
            "grader_only": sum(graded_only) / len(graded_only),
            "words_coverage": sum(coverage) / len(coverage) if coverage else None, "ok": ok}


def evaluate(model: str, adapter: str | None, template_name: str, rows: list[dict],
             max_new: dict = MAX_NEW) -> tuple[dict, list[str], float]:
    """Greedy answers of `model` (with `adapter`) to the held-out rows, graded; and the seconds taken."""
    import emergence

    t = time.perf_counter()
    lm = emergence.load(model, adapter=adapter, device="cpu", dtype="fp32")
    answers = answer_rows(lm, template_name, rows, max_new)
    return score(rows, answers), answers, time.perf_counter() - t


# ------------------------------------------------------------------ one configuration, in a child process
def child(spec: dict) -> None:
    """Train one configuration in this process; print one JSON line of what it measured."""
    import torch

    torch.set_num_threads(spec["threads"])
    from emergence.finetune.run import FinetuneConfig, finetune
    from emergence.train.trainer import TrainConfig

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after importing torch and emergence
    c = spec["config"]
    r = c.get("r", 8)
    fc = FinetuneConfig(model=MODEL, data=[spec["data"]], method=c["method"], quantize=c.get("quantize"), r=r,
                        alpha=2.0 * r, dropout=0.0, chat_template=spec["template"], pack=spec["pack"],
                        val_fraction=spec["val_fraction"], sample_rows=1)
    steps = spec["steps"]
    tc = TrainConfig(data="", out=spec["out"], context=spec["context"], batch_size=spec["batch"],
                     max_steps=steps, lr=c["lr"], min_lr=c["lr"] / 10, warmup_steps=max(1, steps // 10),
                     weight_decay=0.0, eval_every=max(1, steps // spec["evals"]), eval_batches=spec["eval_batches"],
                     checkpoint_every=0, log_every=spec["log_every"], seed=SEED, device="cpu", progress=False,
                     sample_tokens=16)
    t = time.perf_counter()
    result = finetune(fc, tc)
    wall = time.perf_counter() - t
    print("RESULT " + json.dumps({"wall_s": wall, "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                  "rss_after_imports_kib": baseline, "final_train_loss": result.train_loss,
                                  "final_val_loss": result.val_loss, "steps": result.step, "tokens": result.tokens,
                                  "loop_elapsed_s": result.elapsed_s}), flush=True)


def run_config(config: dict, work: Path, data: Path, template: str, p: dict, threads: int) -> dict:
    """Train `config` in a child process; its measurements, metrics and trainable count."""
    out = work / config["name"]
    shutil.rmtree(out, ignore_errors=True)
    spec = {"config": config, "out": str(out), "data": str(data), "template": template, "pack": p["pack"],
            "context": p["context"], "batch": p["batch"], "steps": p["steps"], "val_fraction": p["val_fraction"],
            "eval_batches": p["eval_batches"], "evals": p["evals"], "log_every": p["log_every"], "threads": threads}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{config['name']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    measured = json.loads(next(x for x in lines if x.startswith("RESULT "))[7:])
    described = next(x for x in lines if x.startswith("finetune: "))
    m = re.search(r"([\d,]+) of ([\d,]+) parameters trainable", described)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [m_["tokens_per_s"] for m_ in metrics if "tokens_per_s" in m_]
    return {**measured, "process_wall_s": wall, "describe": described.split(", fp32")[0],
            "trainable": int(m.group(1).replace(",", "")), "counted_parameters": int(m.group(2).replace(",", "")),
            "tokens_per_s": statistics.median(rates) if rates else None,
            "train_loss": [(m_["step"], m_["train_loss"]) for m_ in metrics],
            "val_loss": [(m_["step"], m_["val_loss"]) for m_ in metrics if "val_loss" in m_],
            "result_dir": str(out / ("model" if config["method"] == "full" else "adapter"))}


# ------------------------------------------------------------------ keeping the best model
def verify_keep(entries: list[tuple[str, dict]], held: list[dict], template: str, answers: dict, work: Path) -> dict:
    """Put fine-tuned models into a temporary local store (EMERGENCE_HOME) with the documented
    commands and chat with them; `entries` = [(store name, config result)].

    Each entry: import (a full fine-tune's OUT/model) or merge + import (an adapter); then
    `emergence chat --model NAME` as it is, with `--chat-template TEMPLATE`, and after
    `emergence create NAME -f Modelfile` (FROM the same folder, TEMPLATE TEMPLATE). Each chat is
    asked two held-out instructions, one per process (the chat reads one line per message):
    the first "character" row with its story joined into one line, and the first "words" row
    (one line already, so its reply can be compared with the evaluation's answer). Recorded:
    which template each chat used (its banner) and whether its reply follows the instruction."""
    home = Path(tempfile.mkdtemp(prefix="emergence-home-"))
    env = {**os.environ, "EMERGENCE_HOME": str(home)}
    exe = Path(sys.executable).parent / "emergence"
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "emergence"]
    probes = []
    for kind in ("character", "words"):
        i = next(j for j, r in enumerate(held) if r["kind"] == kind)
        probes.append({"kind": kind, "row": i, "check": held[i]["check"],
                       "line": " ".join(held[i]["messages"][0]["content"].split())})
    report = {"EMERGENCE_HOME": "a temporary folder", "probes": probes, "models": []}
    merged = work / "merged"
    try:
        for name, res in entries:
            folder = Path(res["result_dir"])
            model_dir = folder if res["config"]["method"] == "full" else merged
            modelfile = work / "Modelfile"
            modelfile.write_text(f"FROM {model_dir}\nTEMPLATE {template}\n")
            shown = {str(folder): f"OUT/{folder.name}", str(merged): "DIR", str(modelfile): "Modelfile"}
            chat = ["chat", "--model", name, "-t", "0", "-n", str(MAX_NEW["words"])]
            commands = [["import", str(folder), name]] if model_dir == folder else [
                ["merge", MODEL, "--adapter", str(folder), "--out", str(merged), "--force"],
                ["import", str(merged), name]]
            commands += [chat, [*chat, "--chat-template", template], ["create", name, "-f", str(modelfile)], chat]
            steps = []
            for cmd in commands:
                step = {"command": " ".join(shown.get(c, c) for c in ["emergence", *cmd])}
                for probe in probes if cmd[0] == "chat" else [None]:
                    proc = subprocess.run(cli + cmd, input=probe["line"] + "\n/bye\n" if probe else None,
                                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
                    step["rc"] = max(step.get("rc", 0), proc.returncode)
                    if proc.returncode:
                        step["stderr"] = proc.stderr.strip()[-400:]
                        break
                    if probe is None:
                        step["stdout"] = _short(proc.stdout, 300)
                        continue
                    # input()'s "> " prompts go to stdout too: one before the reply, one after it
                    out = re.sub(r"\n>\s*$", "", proc.stdout.removeprefix("> ")).strip()
                    banner = re.search(r"\((\S+) template", proc.stderr)
                    used = banner.group(1) if banner else None  # a built-in's name, or the file's path
                    step["template"] = f"the entry's {Path(used).name}" if used and "/" in used else used
                    reply = {"kind": probe["kind"], "reply": _short(out, 400),
                             "follows": grade(probe["kind"], probe["check"], out)}
                    if probe["kind"] == "words":
                        reply["same_as_evaluation"] = out == answers[res["config"]["name"]][probe["row"]][0].strip()
                    step.setdefault("replies", []).append(reply)
                steps.append(step)
                if step["rc"]:
                    break
            report["models"].append({"name": name, "from": res["config"]["name"], "steps": steps,
                                     "ok": len(steps) == len(commands) and all(st["rc"] == 0 for st in steps)})
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(merged, ignore_errors=True)
    return report


# ------------------------------------------------------------------ the run
def make_data(p: dict, work: Path, tokenizer) -> tuple[list[dict], list[dict], Path, dict]:
    count = lambda text: len(tokenizer.encode(text, add_bos=False))  # noqa: E731
    stories = train_stories()
    train = build_rows(stories, Lexicon(stories), p["train_rows"], count, SEED, per_kind=False)
    valid = valid_stories()
    vstories = [s for s, _ in valid]
    held = build_rows(vstories, Lexicon(vstories), p["held_out_per_kind"], count, SEED + 1, per_kind=True)
    for r in held:
        r["in_pretraining_text"] = valid[r["story"]][1] < 0.95  # emergence-6m pretrained on 95% of this file
    data = work / "train.jsonl"
    write_jsonl(train, data)
    write_jsonl(held, work / "held_out.jsonl", ("kind", "check"))
    tokens = {name: row_tokens(train, name, tokenizer) for name in ("chatml", "vicuna")}
    template = min(tokens, key=tokens.get)
    info = {"train_rows": len(train), "held_out_rows": len(held),
            "train_by_kind": dict(collections.Counter(r["kind"] for r in train)),
            "held_out_by_kind": dict(collections.Counter(r["kind"] for r in held)),
            "train_stories_used": len({r["story"] for r in train}),
            "held_out_stories_used": len({r["story"] for r in held}),
            "held_out_rows_from_pretraining_text": sum(r["in_pretraining_text"] for r in held),
            "max_story_tokens": MAX_STORY_TOKENS, "template_tokens": tokens, "template": template,
            "train_tokens": tokens[template], "mean_row_tokens": tokens[template] / len(train)}
    return train, held, data, info


def lr_check(p: dict, work: Path, threads: int) -> dict:
    """Short runs at a few learning rates per method; the final loss on fine-tuning's own held-out rows."""
    import emergence

    _, _, data, info = make_data(p, work, emergence.load(MODEL, device="cpu").tokenizer)
    steps = max(2, p["steps"] // 2)
    q = {**p, "steps": steps, "evals": 1}
    runs = []
    for method, lrs in (("full", (3e-4, 1e-3, 3e-3)), ("lora", (1e-3, 3e-3, 1e-2))):
        for lr in lrs:
            cfg = {"name": f"{method}-lr{lr:g}", "method": method, "r": 8, "lr": lr}
            res = run_config(cfg, work, data, info["template"], q, threads)
            runs.append({"method": method, "r": 8 if method == "lora" else None, "lr": lr, "steps": steps,
                         "val_loss": res["final_val_loss"], "train_loss": res["final_train_loss"]})
            print(f"lr check: {method} lr={lr:g}: val loss {res['final_val_loss']:.4f}", file=sys.stderr)
    best = {m: min((r for r in runs if r["method"] == m), key=lambda r: r["val_loss"])["lr"] for m in ("full", "lora")}
    # --pack or not: the same rows per step either way (a packed row holds several), timed alike
    pack_runs = []
    per_packed = None
    for pack in (False, True):
        q = {**p, "steps": 8, "evals": 1, "pack": pack}
        cfg = {"name": f"pack-{pack}", "method": "lora", "r": 8, "lr": best["lora"]}
        res = run_config(cfg, work, data, info["template"], q, threads)
        if pack:
            m = re.search(r"packed into (\d+) rows", res["describe"])
            per_packed = (info["train_rows"] * (1 - p["val_fraction"])) / int(m.group(1))
        rows_per_step = p["batch"] * (per_packed if pack else 1)
        steps_per_s = res["tokens_per_s"] / (res["tokens"] / res["steps"])  # metrics count positions per step
        pack_runs.append({"pack": pack, "positions_per_s": res["tokens_per_s"],
                          "rows_per_s": rows_per_step * steps_per_s,
                          "row_tokens_per_s": rows_per_step * steps_per_s * info["mean_row_tokens"]})
    return {"steps": steps, "batch": p["batch"], "runs": runs, "best": best, "pack": pack_runs,
            "rows_per_packed_row": per_packed, "date": datetime.date.today().isoformat(), "commit": commit()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny: ~50 rows, a few steps, 1 config + base")
    ap.add_argument("--lr-check", action="store_true", help="the short learning-rate check; writes its key only")
    ap.add_argument("--out-json", default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}; "
                    "--smoke: required)")
    ap.add_argument("--work", default=None, help="folder for the rows and runs (default: a temporary one, removed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a second one mostly waits "
                    "on a shared 2-core machine)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only")
    ap.add_argument("--no-keep", action="store_true", help="skip checking the store commands")
    ap.add_argument("--report-only", action="store_true", help="only write docs/finetune.md and .png from the "
                    "results file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.smoke and not args.out_json:
        ap.error("--smoke needs --out-json (it never replaces the committed results)")
    if args.report_only:
        result = json.loads(Path(args.out_json or RESULTS).read_text())
        plot(result, PLOT)
        DOC.write_text(render_doc(result))
        return 0
    p = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        p["steps"] = args.steps
    out_json = Path(args.out_json) if args.out_json else RESULTS
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="instruction-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    import emergence

    try:
        if args.lr_check:
            previous = json.loads(out_json.read_text()) if out_json.exists() else {}
            previous["lr_check"] = lr_check(p, work, args.threads)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(previous, indent=1) + "\n")
            print(json.dumps(previous["lr_check"]["best"]))
            return 0
        tokenizer = emergence.load(MODEL, device="cpu").tokenizer
        train, held, data, info = make_data(p, work, tokenizer)
        template = info["template"]
        max_new = {k: min(v, 24) for k, v in MAX_NEW.items()} if args.smoke else MAX_NEW
        print(f"data: {info['train_rows']} training rows, {info['held_out_rows']} held out; template {template} "
              f"({info['template_tokens']})", file=sys.stderr)
        base, base_answers, base_s = evaluate(MODEL, None, template, held, max_new)
        print(f"base: {base['overall']:.3f} ({base_s:.0f} s)", file=sys.stderr)
        answers = {"base": base_answers}
        configs = CONFIGS[2:3] if args.smoke else CONFIGS
        rows = []
        for cfg in configs:
            res = run_config(cfg, work, data, template, p, args.threads)
            adapter = None if cfg["method"] == "full" else res["result_dir"]
            after, answers[cfg["name"]], eval_s = evaluate(MODEL if adapter else res["result_dir"], adapter, template,
                                                           held, max_new)
            res.update(config=cfg, after=after, eval_s=eval_s)
            rows.append(res)
            print(f"{cfg['name']}: {after['overall']:.3f}, {res['wall_s']:.0f} s training, "
                  f"{res['tokens_per_s']:.0f} tok/s, peak {res['ru_maxrss_kib'] / 1024:.0f} MiB", file=sys.stderr)
        keep = None
        if not args.smoke and not args.no_keep:
            best = max(rows, key=lambda r: r["after"]["overall"])
            entries = [("emergence-6m-instruct", best)]
            other = max((r for r in rows if (r["config"]["method"] == "full") != (best["config"]["method"] == "full")),
                        key=lambda r: r["after"]["overall"])  # the best of the other route (adapter / full)
            entries.append((f"emergence-6m-instruct-{other['config']['name']}", other))
            keep = verify_keep(entries, held, template, answers, work)
        result = assemble(args, p, info, base, base_s, rows, held, answers, keep, time.perf_counter() - started)
        previous = json.loads(out_json.read_text()) if out_json.exists() else {}
        if "lr_check" in previous and not args.smoke:
            result["lr_check"] = previous["lr_check"]
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1) + "\n")
        if not args.smoke and not args.no_docs:
            plot(result, PLOT)
            DOC.write_text(render_doc(result))
        print(f"wrote {out_json} in {result['total_wall_s']:.0f} s", file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


# ------------------------------------------------------------------ the report
def _short(text: str, n: int) -> str:
    text = text.strip()
    return text if len(text) <= n else text[:n].rstrip() + " ..."


def assemble(args, p: dict, info: dict, base: dict, base_s: float, rows: list[dict], held: list[dict],
             answers: dict, keep: dict | None, total_s: float) -> dict:
    import emergence

    n_params = sum(t.numel() for t in emergence.load(MODEL, device="cpu").model.parameters())
    configs = []
    for r in rows:
        c = r["config"]
        configs.append({
            "name": c["name"], "method": c["method"], "quantize": c.get("quantize"),
            "r": c.get("r") if c["method"] != "full" else None,
            "alpha": 2.0 * c["r"] if c["method"] != "full" else None, "lr": c["lr"],
            "trainable": r["trainable"], "trainable_fraction": r["trainable"] / n_params,
            "peak_rss_mib": r["ru_maxrss_kib"] / 1024, "rss_after_imports_mib": r["rss_after_imports_kib"] / 1024,
            "tokens_per_s": r["tokens_per_s"], "train_wall_s": r["wall_s"], "loop_s": r["loop_elapsed_s"],
            "process_wall_s": r["process_wall_s"],
            "eval_s": r["eval_s"], "final_train_loss": r["final_train_loss"], "final_val_loss": r["final_val_loss"],
            "before": {k: base[k] for k in ("overall", "by_kind")},
            "after": {k: r["after"][k] for k in ("overall", "by_kind", "passed", "rows", "finished", "grader_only",
                                                 "words_coverage")},
            "positions_per_row": r["tokens"] // (r["steps"] * p["batch"]),
            "describe": r["describe"], "train_loss": r["train_loss"], "val_loss": r["val_loss"]})
    examples = []
    for kind in KINDS:
        i = next(j for j, h in enumerate(held) if h["kind"] == kind)
        examples.append({"kind": kind, "check": held[i]["check"],
                         "instruction": _short(held[i]["messages"][0]["content"], 240),
                         "target": _short(held[i]["messages"][1]["content"], 400),
                         "answers": {name: {"text": _short(a[i][0], 400), "finished": a[i][1],
                                            "passes": a[i][1] and grade(kind, held[i]["check"], a[i][0])}
                                     for name, a in answers.items()}})
    argv = " ".join(a for a in sys.argv[1:])
    return {
        "command": f"python bench/instruction_tune.py {argv}".strip(), "commit": commit(),
        "date": datetime.date.today().isoformat(), "machine": {**machine(), "torch_threads": args.threads},
        "model": MODEL, "model_parameters": n_params, "seed": SEED,
        "settings": {**p, "max_new_tokens": MAX_NEW, "schedule": "cosine, warmup steps/10, min lr = lr/10",
                     "weight_decay": 0.0, "lora_dropout": 0.0, "lora_alpha": "2r",
                     "lora_targets": "q,k,v,o,gate,up,down", "decoding": "greedy"},
        "data": info,
        "base": {**{k: base[k] for k in ("overall", "by_kind", "passed", "rows", "finished", "grader_only",
                                         "words_coverage")},
                 "eval_s": base_s},
        "configs": configs, "examples": examples, "keep": keep, "total_wall_s": total_s}


COLORS = {"base": "#999999", "full": "#d62728", "lora-r4": "#9ecae1", "lora-r8": "#4292c6", "lora-r16": "#08519c",
          "qlora-nf4-r8": "#31a354"}


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    configs = result["configs"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.35, 1]})
    groups = [*KINDS, "overall"]
    series = [("base", result["base"])] + [(c["name"], c["after"]) for c in configs]
    width = 0.8 / len(series)
    for j, (name, s) in enumerate(series):
        values = [100 * (s["by_kind"][g] if g in KINDS else s["overall"]) for g in groups]
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=name if name != "base" else "base (before)", color=COLORS.get(name))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("held-out instructions followed (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result['model']}: before and after instruction tuning ({result['base']['rows']} held-out rows)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    for c in configs:
        steps, losses = zip(*c["train_loss"])
        k = 5  # a moving mean over 5 steps: one step is only 8 rows
        smooth = [statistics.fmean(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        bx.plot(steps, smooth, color=COLORS.get(c["name"]), lw=1.2, alpha=0.9, label=c["name"])
        if c["val_loss"]:
            vs, vl = zip(*c["val_loss"])
            bx.plot(vs, vl, "o--", color=COLORS.get(c["name"]), ms=3, lw=0.8)
    bx.set_xlabel("step")
    bx.set_ylabel("loss (answer tokens)")
    bx.set_title("training loss (5-step mean, lines), loss on finetune's held-out rows (dots)", fontsize=10)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def render_doc(r: dict) -> str:
    d, s, base, configs = r["data"], r["settings"], r["base"], r["configs"]
    best = max(configs, key=lambda c: c["after"]["overall"])
    lines = [
        f"# Instruction tuning {r['model']}: full, LoRA and QLoRA on graded instructions",
        "",
        f"One script, `bench/instruction_tune.py`, makes an instruction set from the TinyStories sample, "
        f"instruction-tunes the packaged `{r['model']}` ({r['model_parameters']:,} parameters, LLaMA-style, "
        f"context 512) with the project's own fine-tuning (`emergence.finetune.run.finetune`, the code behind "
        f"`emergence finetune`) five ways, and grades the answers to {base['rows']} held-out instructions "
        f"automatically, before and after. Best: **{best['name']}**, {_pct(base['overall'])} -> "
        f"**{_pct(best['after']['overall'])}** of held-out instructions followed.",
        "",
        *_summary(r),
        "",
        "## The data",
        "",
        f"Training rows are made only from the train sample (`../shared/data/tinystories/train/"
        f"TinyStories-train.head2MiB.txt`, stories separated by `<|endoftext|>`), held-out rows only from the "
        f"validation sample (`valid/hf_TinyStories_validation.head.txt`: no separator, so a story starts at a "
        f'paragraph beginning "Once upon a time", "Once there was" or "Once, there was"). Each story is cut '
        f"to its longest start of whole sentences of at most {d['max_story_tokens']} tokens (quotes balanced, at "
        f"least 3 sentences), so that rows stay short on a 2-core CPU. Four kinds of instruction, each with a "
        f"deterministic grader (of the answer's form, and for *words* and *character* of its content too: a "
        f"title need not fit its story, nor a retelling retell it); every training target is built from its "
        f"story and asserted to pass its own grader:",
        "",
        "| kind | instruction | target (training) | graded as followed when |",
        "| --- | --- | --- | --- |",
        "| words | Write a story about a {animal} that uses the words {w1}, {w2} and {w3}. | the story itself: "
        "its most frequent animal (named at least twice) and 3 of its words among the split's 800 most "
        "frequent content words | the answer has the animal and all three words as whole words "
        "(case-insensitive) |",
        '| title | Give this story a title. + story | "{Name} and the {Thing}" (main character), else "The '
        '{Adjective} {Thing}" / "The {Thing}"; Thing = the word most often after a/the/his/her... | one '
        "line, 2-6 words of letters, no final period, title case (small words like *and*, *the* may stay "
        "lower-case after the first) |",
        "| retell | Retell this story in {one/two/three} sentences. + story | the story's first n "
        "sentences without quotation marks | exactly n sentences, each ending in . ! or ? |",
        '| character | Who is the main character of this story? + story | "The main character is {Name}." '
        "with Name the story's most frequent name (a capitalised word rarely seen lower-case in the split; "
        "a tie skips the story) | at most 12 words, naming Name |",
        "",
        f"On top of its grader, an answer must **end** (EOS or the template's stop string) within its token "
        f"cap ({', '.join(f'{k} {v}' for k, v in s['max_new_tokens'].items())}): an answer cut at the cap "
        f"fails.",
        "",
        f"{d['train_rows']:,} training rows from {d['train_stories_used']:,} stories "
        f"({', '.join(f'{k} {v}' for k, v in d['train_by_kind'].items())}; stories with a repeated animal are "
        f"the scarce ones, so each gives two *words* rows, two draws of its words), {d['held_out_rows']} "
        f"held-out rows from {d['held_out_stories_used']} validation "
        f"stories ({', '.join(f'{k} {v}' for k, v in d['held_out_by_kind'].items())}). Rows are chat rows "
        f"`{{\"messages\": [user, assistant]}}`; the loss covers the assistant turn only. `{r['model']}` has no "
        f"chat template: the two candidates cost {d['template_tokens']['chatml']:,} (chatml) and "
        f"{d['template_tokens']['vicuna']:,} (vicuna) tokens over the training rows with its tokenizer, so "
        f"**{d['template']}** is used (vicuna's fixed system sentence costs more than chatml's markers, which "
        f"this 4,096-token vocabulary splits into 8 tokens each). Caveat: `{r['model']}` was pretrained on 95% of "
        f"the validation sample too ({d['held_out_rows_from_pretraining_text']} of the {d['held_out_rows']} "
        f"held-out rows come from that part), so *held out* means the instruction rows, not the stories' text.",
        "",
        "## How it was trained",
        "",
        f"Every configuration: the same rows, {s['steps']} steps of {s['batch']} rows "
        f"({'packed into rows of ' + str(s['context']) + ' tokens' if s['pack'] else 'not packed'}; "
        f"{d['mean_row_tokens']:.0f} tokens per row on average; {s['steps'] * s['batch']:,} rows seen, "
        f"{s['steps'] * s['batch'] / (d['train_rows'] * (1 - s['val_fraction'])):.0%} of an epoch), "
        f"cosine schedule with warm-up "
        f"(steps/10) down to lr/10, AdamW without weight decay, seed {r['seed']}, "
        f"{s['val_fraction']:.0%} of the training rows held out by `finetune` for its loss curve. LoRA: "
        f"alpha = 2r on q, k, v, o, gate, up and down, no dropout; QLoRA: the same at r=8 over an nf4 base "
        f'(`quantize="nf4"`).',
    ]
    lc = r.get("lr_check")
    if lc:
        lines += ["", f"Learning rates were picked by a quick check (`--lr-check`, at commit {lc['commit'][:7]}: "
                  f"{lc['steps']} steps of the same batch, the final loss on `finetune`'s held-out rows, lower is "
                  f"better; LoRA at r=8):", "",
                  "| method | learning rate: loss | | |", "| --- | --- | --- | --- |"]
        for m in ("full", "lora"):
            cells = [f"{x['lr']:g}: {x['val_loss']:.3f}" for x in lc["runs"] if x["method"] == m]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", f"Chosen: full {lc['best']['full']:g}, LoRA/QLoRA {lc['best']['lora']:g}."]
        pk = {x["pack"]: x for x in lc.get("pack", [])}
        if pk:
            lines += ["", f"`--pack` was timed the same way (LoRA r=8, 8 steps of {lc['batch']} rows): packed, "
                      f"{lc['rows_per_packed_row']:.1f} rows share a row of {s['context'] + 1} tokens and the "
                      f"run went through {pk[True]['rows_per_s']:.1f} rows/s; unpacked (each batch padded to its "
                      f"longest row) {pk[False]['rows_per_s']:.1f} rows/s. Packing does not help rows this short "
                      f"(the packed rows pay attention over 512 positions with a block mask), so the runs do not "
                      f"pack." if pk[True]["rows_per_s"] < pk[False]["rows_per_s"] else
                      f"{pk[False]['rows_per_s']:.1f} rows/s unpacked, {pk[True]['rows_per_s']:.1f} packed."]
    lines += [
        "",
        "## Results",
        "",
        "Held-out instruction-following rate (greedy decoding), per kind and overall; before = the base "
        "model with the same template and prompts.",
        "",
        "| configuration | lr | trainable | words (coverage) | title | retell | character | overall (before -> after) "
        "| final loss (train / held-out rows) | peak RSS | tokens/s | wall (loop) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| base (before) | - | - | {_words_cell(base)} | {' | '.join(_pct(base['by_kind'][k]) for k in KINDS[1:])} | "
        f"{_pct(base['overall'])} | - | - | - | - |",
    ]
    for c in configs:
        wall = f"{c['train_wall_s']:.0f} s" + (f" ({c['loop_s']:.0f} s)" if "loop_s" in c else "")
        lines.append(
            f"| {c['name']} | {c['lr']:g} | {c['trainable']:,} ({100 * c['trainable_fraction']:.2f}%) | "
            f"{_words_cell(c['after'])} | {' | '.join(_pct(c['after']['by_kind'][k]) for k in KINDS[1:])} | "
            f"{_pct(base['overall'])} -> "
            f"**{_pct(c['after']['overall'])}** | {c['final_train_loss']:.3f} / {c['final_val_loss']:.3f} | "
            f"{c['peak_rss_mib']:.0f} MiB | {c['tokens_per_s']:.0f} | {wall} |")
    m = r["machine"]
    lines += [
        "",
        f"words (coverage): the rate, and in brackets the share of the 4 asked-for words (the animal and the "
        f"three) that the answers contain on average. trainable: parameters trained, as a share of the model's "
        f"{r['model_parameters']:,}. peak RSS: "
        f"`ru_maxrss` of the process that trained that configuration alone (imports, loading and training; "
        f"{configs[0]['rss_after_imports_mib']:.0f} MiB of it is the interpreter with torch and emergence "
        f"imported): on a model this small the frozen weights are a few MiB, so LoRA, QLoRA and full differ "
        f"little; QLoRA's base is loaded in fp32 and then quantized, so it does not lower the peak here. "
        f"tokens/s: the median of the run's `metrics.jsonl` throughput windows; the loop counts batch x "
        f"{configs[0]['positions_per_row']} positions per step (the longest training row: batches are padded "
        f"to their own longest row, so this is an upper bound; rows average {d['mean_row_tokens']:.0f} tokens). "
        f"wall: the `finetune` call (loading, training, its evaluations, saving), in brackets its training loop "
        f"alone (with its {s['evals']} held-out-row loss evaluations); the held-out evaluation "
        f"afterwards is not in it (adapters decode eagerly: slower than the full model's native decoding). "
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs while this ran (timings are noisy), "
        f"torch {m['torch']} on {m['torch_threads']} thread(s); the whole script took "
        f"{r['total_wall_s'] / 60:.1f} min.",
        "",
        "![instruction-following rate before/after per configuration, and loss curves](finetune.png)",
        "",
        "## Example answers",
        "",
        "The first held-out row of each kind (greedy; a mark: followed or not).",
    ]
    for ex in r["examples"]:
        lines += ["", f"**{ex['kind']}**: `{_md(ex['instruction'])}`", "",
                  f"- target: {_md(ex['target'])}"]
        for name, a in ex["answers"].items():
            lines.append(f"- {name} {'✅' if a['passes'] else '❌'}: {_md(a['text']) or '(empty)'}"
                         f"{'' if a['finished'] else ' *(cut at the cap)*'}")
    t, keep = r["data"]["template"], r.get("keep")
    chats = [st for mdl in (keep or {}).get("models", []) for st in mdl["steps"] if "template" in st]
    lost = any(st["template"] == "plain" for st in chats[:1])  # the first chat, right after import: the fallback?
    lines += [
        "",
        "## Keeping the best model",
        "",
        "A fine-tuned model cannot ship inside the package (its models must stay under 50 MB in all, and "
        f"`{r['model']}` is already shipped); put it into the local model store (`$EMERGENCE_HOME`, default "
        "`~/.emergence`) instead, where every command finds it by name. With OUT the `--out` of the "
        "fine-tuning run:",
        "",
        "```sh",
        "# a full fine-tune writes a whole model: import it",
        f"emergence import OUT/model {r['model']}-instruct",
        "# an adapter (LoRA, QLoRA) is merged into its base first, then imported",
        f"emergence merge {r['model']} --adapter OUT/adapter --out DIR",
        f"emergence import DIR {r['model']}-instruct",
        f"emergence chat --model {r['model']}-instruct -t 0" + (f" --chat-template {t}" if lost else ""),
        "```",
        "",
    ]
    if lost:
        lines += [
            f"**Pass `--chat-template {t}`**: OUT/model and DIR hold the template the rows were rendered with "
            f"(`chat_template.jinja`), but `emergence import` does not copy that file into the store, so "
            f"`emergence chat --model {r['model']}-instruct` alone falls back to the plain `User:/Assistant:` "
            f"transcript the model was never tuned on, and its replies do not follow the instruction (checked "
            f"below). To keep the template with the name, so that every command using it (chat, run, serve) "
            f"gets it, create the entry from a Modelfile instead of importing it:",
            "",
            "```sh",
            f"printf 'FROM DIR\\nTEMPLATE {t}\\n' > Modelfile      # FROM OUT/model for a full fine-tune",
            f"emergence create {r['model']}-instruct -f Modelfile",
            f"emergence chat --model {r['model']}-instruct -t 0",
            "```",
            "",
        ]
    else:
        lines += [
            "OUT/model and DIR carry the chat template the rows were rendered with (`chat_template.jinja`); "
            "`emergence import` copies it into the store entry, so every command that takes the name (chat, run, "
            f"serve) renders prompts as in training without `--chat-template`. A Modelfile says the same "
            f"explicitly: `FROM DIR` and `TEMPLATE {t}`, then `emergence create {r['model']}-instruct -f "
            f"Modelfile`.",
            "",
        ]
    lines += [
        "(For a QLoRA adapter, `emergence merge` above merges into the float base, which differs from the nf4 "
        "base it was trained on by the quantization error; `--requantize nf4 --eval TEXT` merges into an nf4 "
        "base and measures the perplexity change.)",
    ]
    if keep and "probes" in keep:
        lines += ["", "Checked by the script in a temporary `EMERGENCE_HOME`; each `emergence chat` was asked, in "
                  "two runs, the first held-out *character* instruction (its story joined into one line: the chat "
                  "reads a line per message) and the first *words* one:", ""]
        for mdl in keep["models"]:
            lines.append(f"- **{mdl['name']}** (from {mdl['from']}):")
            for st in mdl["steps"]:
                note = f"exit {st['rc']}"
                if "template" in st:
                    parts = []
                    for rep in st.get("replies", []):
                        same = ", the same text as the evaluation's answer" if rep.get("same_as_evaluation") else ""
                        parts.append(f"{rep['kind']} {'✅' if rep['follows'] else '❌'} "
                                     f"\"{_md(_short(rep['reply'], 70))}\"{same}")
                    note += f", {st['template']} template: " + "; ".join(parts)
                lines.append(f"  - `{st['command']}`: {note}")
    lines += [
        "",
        "## Reproduce",
        "",
        "```sh",
        ".venv/bin/pip install matplotlib              # for docs/finetune.png only",
        ".venv/bin/python bench/instruction_tune.py    # rows, 5 runs, evaluations, the store check; this page",
        ".venv/bin/python bench/instruction_tune.py --lr-check   # the learning-rate check (its own JSON key)",
        ".venv/bin/python bench/instruction_tune.py --smoke --out-json /tmp/smoke.json   # < 1 min",
        "```",
        "",
        "The same training from the command line, for one configuration (the script makes the rows; `--work "
        "DIR` keeps them in DIR/train.jsonl):",
        "",
        "```sh",
        f"emergence finetune {r['model']} --data DIR/train.jsonl --out OUT --lora --r 8 --alpha 16 "
        f"--lora-dropout 0 --chat-template {d['template']}{' --pack' if s['pack'] else ''} --batch-size "
        f"{s['batch']} --max-steps {s['steps']} --lr {configs[min(2, len(configs) - 1)]['lr']:g} --min-lr "
        f"{configs[min(2, len(configs) - 1)]['lr'] / 10:g} --warmup-steps {max(1, s['steps'] // 10)} "
        f"--weight-decay 0 --val-fraction {s['val_fraction']} --seed {r['seed']}",
        "```",
        "",
        f"Results: `bench/results/instruction_tune.json` (commit {r['commit']}, {r['date']}).",
        "",
    ]
    return "\n".join(lines)


def _summary(r: dict) -> list[str]:
    """The table's main numbers in words (nothing here that the numbers do not say)."""
    by = {c["name"]: c for c in r["configs"]}
    rate = lambda n: _pct(by[n]["after"]["overall"])  # noqa: E731
    out = []
    if all(n in by for n in ("lora-r4", "lora-r8", "lora-r16", "full")):
        out.append(f"- LoRA r=4 / 8 / 16: {rate('lora-r4')} / {rate('lora-r8')} / {rate('lora-r16')} overall, "
                   f"training {_pct(by['lora-r4']['trainable_fraction'])} / {_pct(by['lora-r8']['trainable_fraction'])}"
                   f" / {_pct(by['lora-r16']['trainable_fraction'])} of the parameters; full fine-tuning "
                   f"{rate('full')}.")
    if "qlora-nf4-r8" in by and "lora-r8" in by:
        out.append(f"- QLoRA (nf4 base) at r=8: {rate('qlora-nf4-r8')}, against {rate('lora-r8')} for LoRA r=8 "
                   f"over the fp32 base.")
    kinds = {k: max(c["after"]["by_kind"][k] for c in r["configs"]) for k in KINDS}
    easiest, hardest = max(kinds, key=kinds.get), min(kinds, key=kinds.get)
    out.append(f"- Per kind, the best of the five reaches {_pct(kinds[easiest])} on *{easiest}* and "
               f"{_pct(kinds[hardest])} on *{hardest}*"
               + (f" (where the answers hold {_pct(max(c['after']['words_coverage'] for c in r['configs']))} "
                  f"of the asked-for words at best, {_pct(r['base']['words_coverage'])} before)."
                  if hardest == "words" and r["base"].get("words_coverage") is not None else "."))
    peaks = {n: c["peak_rss_mib"] for n, c in by.items()}
    out.append(f"- Peak RSS: {', '.join(f'{n} {v:.0f} MiB' for n, v in peaks.items())}: the fp32 weights are "
               f"{4 * r['model_parameters'] / 2**20:.0f} MiB, the rest is the interpreter with torch and the "
               f"training step's activations, so a quantized base saves nothing visible here.")
    return out


def _words_cell(s: dict) -> str:
    return f"{_pct(s['by_kind']['words'])} ({_pct(s.get('words_coverage'))})"


def _md(text: str) -> str:
    return " ".join(text.replace("|", "\\|").replace("`", "'").split())

if __name__ == "__main__":
    sys.exit(main())
