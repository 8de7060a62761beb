"""InstructGPT at small scale: SFT, a reward model from preferences with a hidden rule, PPO against
it at several KL coefficients, and DPO on the same pairs (docs/alignment.md, from this script).

    instruction rows (bench/instruction_tune.py's, from the TinyStories sample)
      -> SFT: emergence-6m fine-tuned in full (the instruction_tune "full" run)    work/sft/model
      -> prompts: "Write a story about a {animal} that uses the words {w1}, {w2} and {w3}."
      -> 4 SFT samples per training prompt; the pair (best, worst) by the HIDDEN RULE, when they differ
      -> reward model on those pairs (emergence reward-model's code)                 work/rm/model
      -> PPO (emergence ppo's code) against the reward model, at each KL coefficient, evaluated
         every few steps on held-out prompts: reward-model score, hidden-rule win rate against the
         SFT model, KL to the SFT model
      -> DPO (emergence dpo's code) on the same pairs, evaluated the same way

The hidden rule (never shown to a model; `hidden_score`): a story scores the number of the four
asked-for words (the animal and the three) it uses, and 0 when it does not end within the token
cap or runs past MAX_SENTENCES sentences. The preferences follow it; the reward model only sees
the pairs. A policy's win rate against SFT on a held-out prompt: 1 when its story scores higher
than the SFT model's story for the prompt, 0.5 on a tie, 0 below (a fresh sample of each).

Preference rows are text rows (`{"prompt": chat-rendered prompt, "chosen": story + "<|im_end|>"}`)
so the reward model is trained to score the same last token it reads in PPO's rollouts (a
completion ends at the template's "<|im_end|>"; chat rows would end one token later, on the
newline after it).

    .venv/bin/python bench/instructgpt.py                 # the full run (~1 h on one core); the doc page
    .venv/bin/python bench/instructgpt.py --smoke --out-json /tmp/igpt.json   # tests: < 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import instruction_tune as it  # noqa: E402  (the instruction rows, the stories and their word tests)

RESULTS = ROOT / "bench" / "results" / "instructgpt.json"
PLOT = ROOT / "docs" / "alignment.png"
TEMPLATE = "chatml"
STOP = "<|im_end|>"
MAX_SENTENCES = 6
SAMPLE_CHUNK = 32  # prompts per decode batch

FULL = {"sft_steps": 140, "sft_batch": 8, "prompt_variants": 2, "samples": 4, "max_new": 160, "rm_epochs": 1.0,
        "rm_batch": 8, "rm_lr": 3e-5, "held_prompts": 120, "ppo_steps": 60, "ppo_prompts": 16, "ppo_lr": 1e-5,
        "ppo_epochs": 2, "kl_coefs": [0.0, 0.05, 0.2], "eval_every": 10, "dpo_epochs": 3.0, "dpo_batch": 8,
        "dpo_lr": 3e-5, "dpo_beta": 0.1, "long_steps": 180, "long_every": 20, "hot_lr": 1e-4, "hot_steps": 120,
        "hot_every": 20}
SMOKE = {"sft_steps": 2, "sft_batch": 2, "prompt_variants": 1, "samples": 2, "max_new": 12, "rm_epochs": 1.0,
         "rm_batch": 2, "rm_lr": 3e-5, "held_prompts": 4, "ppo_steps": 2, "ppo_prompts": 2, "ppo_lr": 1e-5,
         "ppo_epochs": 1, "kl_coefs": [0.0, 0.2], "eval_every": 1, "dpo_epochs": 1.0, "dpo_batch": 2,
         "dpo_lr": 3e-6, "dpo_beta": 0.1, "train_rows": 24, "max_prompts": 12}
SEED = 1337


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the hidden rule
REQUIRE_END = True  # --smoke's stories are cut at a few tokens: there it does not ask for an end


def hidden_score(text: str, check: dict, finished: bool) -> int:
    """The preferences' rule: how many of the 4 asked-for words the story uses; 0 when it does not
    end within the cap or has more than MAX_SENTENCES sentences."""
    if (REQUIRE_END and not finished) or len(it.sentences(text)) > MAX_SENTENCES:
        return 0
    return sum(it._has_word(text, w) for w in [check["animal"], *check["words"]])


def win_rate(policy: list[int], reference: list[int]) -> float:
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy, reference)) / len(policy)


# ---------------------------------------------------------------------------- data
def word_prompts(stories: list[str], count_tokens, variants: int, seed: int, limit: int | None = None) -> list[dict]:
    """"words" instructions from the stories' excerpts: up to `variants` draws of the words per story."""
    lex = it.Lexicon(stories)
    rows = []
    for i, story in enumerate(stories):
        text = it.excerpt(story, count_tokens, it.MAX_STORY_TOKENS)
        if text is None:
            continue
        seen = []
        for v in range(variants):
            row = it.make_row("words", text, lex, random.Random(f"{seed}:{i}:{v}"))
            if row is None or row["check"] in seen:
                continue
            seen.append(row["check"])
            rows.append({"prompt": row["messages"][:1], "check": row["check"], "story": i})
        if limit and len(rows) >= limit:
            break
    return rows[:limit] if limit else rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- SFT
def sft(p: dict, work: Path) -> tuple[Path, dict]:
    """emergence-6m instruction-tuned in full on bench/instruction_tune.py's rows (its "full" run)."""
    from emergence.finetune.run import FinetuneConfig, finetune
    from emergence.train.trainer import TrainConfig

    out = work / "sft"
    model = out / "model"
    info_path = out / "sft.json"
    if info_path.exists():
        return model, json.loads(info_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    import emergence

    tokenizer = emergence.load(it.MODEL, device="cpu").tokenizer
    q = dict(it.FULL)
    if "train_rows" in p:
        q["train_rows"] = p["train_rows"]
    train, _, data, info = it.make_data(q, work, tokenizer)
    fc = FinetuneConfig(model=it.MODEL, data=[str(data)], method="full", chat_template=TEMPLATE, val_fraction=0.02,
                        sample_rows=1)
    steps = p["sft_steps"]
    tc = TrainConfig(data="", out=str(out), context=512, batch_size=p["sft_batch"], max_steps=steps, lr=3e-4,
                     min_lr=3e-5, warmup_steps=max(1, steps // 10), weight_decay=0.0, eval_every=steps,
                     eval_batches=2, checkpoint_every=0, log_every=max(1, steps // 10), seed=SEED, device="cpu",
                     progress=False, sample_tokens=16)
    t = time.perf_counter()
    result = finetune(fc, tc)
    info = {"rows": len(train), "steps": steps, "batch": p["sft_batch"], "lr": 3e-4, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "seconds": time.perf_counter() - t}
    info_path.write_text(json.dumps(info, indent=1))
    return model, info


# ---------------------------------------------------------------------------- sampling and scoring
class Judge:
    """Samples a model's stories for prompts and measures them: the hidden rule, the reward
    model's score and (against the SFT model) the KL, through the code PPO's rollouts use."""

    def __init__(self, sft_model: Path, max_new: int) -> None:
        import emergence
        from emergence.chat import ChatTemplate

        self.lm = emergence.load(str(sft_model), device="cpu", dtype="fp32")
        self.ref = self.lm.model.eval()
        self.tokenizer = self.lm.tokenizer
        self.template = ChatTemplate.builtin(TEMPLATE)
        self.max_new = max_new
        self.rewards = None

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        from emergence.chat import encode_prompt, template_variables

        variables = template_variables(self.tokenizer)
        return [encode_prompt(self.tokenizer, self.template.render(r["prompt"], add_generation_prompt=True,
                                                                   **variables)) for r in rows]

    def prompt_text(self, row: dict) -> str:
        from emergence.chat import template_variables

        return self.template.render(row["prompt"], add_generation_prompt=True, **template_variables(self.tokenizer))

    def sample(self, model, rows: list[dict], group: int, seed: int):
        from emergence.align.rl import merged_for_decoding, sample_groups
        from emergence.sampling import SamplingParams

        import torch

        model.eval()
        params = SamplingParams(temperature=1.0, max_new_tokens=self.max_new)
        ids, out = self.prompt_ids(rows), []
        with torch.no_grad(), merged_for_decoding(model):
            for i in range(0, len(ids), SAMPLE_CHUNK):  # (one KV cache per chunk: its rows x the context)
                out += sample_groups(model, self.tokenizer, ids[i:i + SAMPLE_CHUNK], group, params, seed + i,
                                     stop_strings=[STOP])
        return out

    def measure(self, model, rows: list[dict], seed: int, reference: list[int] | None = None) -> dict:
        """One story per prompt from `model`: hidden scores, reward-model score, KL to SFT, length."""
        import torch

        from emergence.align.rl import collate, completion_logps

        samples = self.sample(model, rows, 1, seed)
        scores = [hidden_score(s.text, r["check"], s.finish_reason == "stop") for s, r in zip(samples, rows)]
        prompts = self.prompt_ids(rows)
        ids, cmask, start = collate(prompts, samples, self.tokenizer.eos_id)
        with torch.no_grad():
            lp = completion_logps(model, ids, cmask, start, 1.0, 16)
            lr = completion_logps(self.ref, ids, cmask, start, 1.0, 16)
        kl = float((lp - lr).sum(1).mean())  # k1, summed over a story's tokens, averaged over stories
        out = {"hidden": sum(scores) / len(scores), "rule_words": scores,
               "ended": sum(s.finish_reason == "stop" for s in samples) / len(samples),
               "length": sum(len(s.token_ids) for s in samples) / len(samples), "kl": kl,
               "example": samples[0].text}
        if self.rewards is not None:
            rm = self.rewards([p + s.token_ids for p, s in zip(prompts, samples)], [s.text for s in samples])
            out["rm"] = float(rm.mean())
        if reference is not None:
            out["win_rate"] = win_rate(scores, reference)
        return out


# ---------------------------------------------------------------------------- preferences
def preference_pairs(judge: Judge, rows: list[dict], samples_per_prompt: int, seed: int) -> tuple[list[dict], dict]:
    """SFT samples per prompt; the pair (highest, lowest hidden score) when they differ, as text rows."""
    samples = judge.sample(judge.ref, rows, samples_per_prompt, seed)
    pairs, ties = [], 0
    dist = [0] * 5
    for i, r in enumerate(rows):
        group = samples[i * samples_per_prompt:(i + 1) * samples_per_prompt]
        scored = [(hidden_score(s.text, r["check"], s.finish_reason == "stop"), k, s) for k, s in enumerate(group)]
        for sc, _, _ in scored:
            dist[sc] += 1
        best, worst = max(scored, key=lambda x: (x[0], -x[1])), min(scored, key=lambda x: (x[0], x[1]))
        if best[0] == worst[0]:
            ties += 1
            continue
        prompt = judge.prompt_text(r)
        pairs.append({"prompt": prompt, "chosen": best[2].text + STOP, "rejected": worst[2].text + STOP,
                      "score_chosen": best[0], "score_rejected": worst[0], "check": r["check"]})
    return pairs, {"prompts": len(rows), "pairs": len(pairs), "all_tied": ties, "score_counts": dist}


def train_reward_model(p: dict, work: Path, sft_model: Path, pairs_file: Path, pairs: int) -> tuple[Path, dict]:
    from emergence.align.train import PreferenceConfig, train_preferences
    from emergence.train.trainer import TrainConfig

    out = work / "rm"
    if (out / "rm.json").exists():
        return out / "model", json.loads((out / "rm.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    steps = max(1, math.ceil(p["rm_epochs"] * pairs / p["rm_batch"]))
    pc = PreferenceConfig(model=str(sft_model), data=[str(pairs_file)], method="full", val_fraction=0.0)
    tc = TrainConfig(data="", out=str(out), context=512, batch_size=p["rm_batch"], max_steps=steps, lr=p["rm_lr"],
                     min_lr=p["rm_lr"] / 10, warmup_steps=max(1, steps // 10), weight_decay=0.0, eval_every=0,
                     checkpoint_every=0, log_every=max(1, steps // 10), seed=SEED, device="cpu", progress=False)
    t = time.perf_counter()
    result = train_preferences("reward-model", pc, tc)
    info = {"steps": steps, "batch": p["rm_batch"], "lr": p["rm_lr"], "train_loss": result.train_loss,
            "seconds": time.perf_counter() - t}
    (out / "rm.json").write_text(json.dumps(info, indent=1))
    return out / "model", info


def pair_accuracy(judge: Judge, pairs: list[dict]) -> float | None:
    """The reward model ranks chosen above rejected (text rows re-encoded as the RM was trained)."""
    if not pairs:
        return None
    tok = judge.tokenizer
    right = 0
    for pr in pairs:
        ids = [tok.encode(pr["prompt"] + pr[k]) for k in ("chosen", "rejected")]
        c, r = judge.rewards(ids, [pr["chosen"], pr["rejected"]]).tolist()
        right += c > r
    return right / len(pairs)


# ---------------------------------------------------------------------------- PPO and DPO
def ppo(p: dict, work: Path, sft_model: Path, rm_model: Path, prompts_file: Path, kl_coef: float, judge: Judge,
        held: list[dict], reference: list[int], *, steps: int | None = None, every: int | None = None,
        name: str = "", lr: float | None = None) -> dict:
    """One PPO run at `kl_coef` (p["ppo_steps"] steps, or `steps`), measured on the held-out
    prompts before it and every p["eval_every"] (or `every`) steps."""
    from emergence.align.rl import RLConfig, RLRun

    steps, every, lr = steps or p["ppo_steps"], every or p["eval_every"], lr or p["ppo_lr"]
    out = work / f"ppo-kl{kl_coef:g}{name}"
    done = out / "curve.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    cfg = RLConfig(method="ppo", model=str(sft_model), prompts=str(prompts_file), out=str(out),
                   reward_model=str(rm_model), chat_template=TEMPLATE, group=1, prompts_per_step=p["ppo_prompts"],
                   max_new_tokens=p["max_new"], temperature=1.0, max_steps=steps, lr=lr,
                   kl_coef=kl_coef, ppo_epochs=p["ppo_epochs"], checkpoint_every=10 ** 6, seed=SEED, progress=False)
    run = RLRun(cfg)
    curve, t = [], time.perf_counter()
    point = {"step": 0, **judge.measure(run.model, held, SEED + 7, reference)}
    curve.append(point)
    for step in range(1, steps + 1):
        row = run.step()
        if step % every == 0 or step == steps:
            point = {"step": step, "train_score": row["reward"], "train_kl": row.get("kl"),
                     **judge.measure(run.model, held, SEED + 7, reference)}
            curve.append(point)
            rate = step / (time.perf_counter() - t)
            log(f"  ppo kl={kl_coef:g} step {step}/{steps}: rm {point['rm']:+.3f}, win {point['win_rate']:.3f}"
                f", hidden {point['hidden']:.2f}, kl {point['kl']:.2f} ({rate * 60:.1f} steps/min, "
                f"ETA {(steps - step) / rate:.0f} s)")
    result = {"kl_coef": kl_coef, "lr": lr, "curve": curve, "seconds": time.perf_counter() - t}
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=1))
    return result


def dpo(p: dict, work: Path, sft_model: Path, pairs_file: Path, pairs: int, judge: Judge, held: list[dict],
        reference: list[int]) -> dict:
    import emergence
    from emergence.align.train import PreferenceConfig, train_preferences
    from emergence.train.trainer import TrainConfig

    out = work / "dpo"
    if (out / "dpo.json").exists():
        return json.loads((out / "dpo.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    steps = max(1, math.ceil(p["dpo_epochs"] * pairs / p["dpo_batch"]))
    pc = PreferenceConfig(model=str(sft_model), data=[str(pairs_file)], method="full", val_fraction=0.0,
                          beta=p["dpo_beta"])
    tc = TrainConfig(data="", out=str(out), context=512, batch_size=p["dpo_batch"], max_steps=steps, lr=p["dpo_lr"],
                     min_lr=p["dpo_lr"] / 10, warmup_steps=max(1, steps // 10), weight_decay=0.0, eval_every=0,
                     checkpoint_every=0, log_every=max(1, steps // 10), seed=SEED, device="cpu", progress=False)
    t = time.perf_counter()
    result = train_preferences("dpo", pc, tc)
    model = emergence.load(str(out / "model"), device="cpu", dtype="fp32").model
    info = {"steps": steps, "batch": p["dpo_batch"], "lr": p["dpo_lr"], "beta": p["dpo_beta"],
            "first_loss": result.losses[0], "train_loss": result.train_loss, "seconds": time.perf_counter() - t,
            **judge.measure(model, held, SEED + 7, reference)}
    (out / "dpo.json").write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------------------- the run
def run(p: dict, work: Path) -> dict:
    import emergence
    from emergence.align.rewards import ModelRewards

    started = time.perf_counter()
    sft_model, sft_info = sft(p, work)
    log(f"sft: {sft_info}")
    judge = Judge(sft_model, p["max_new"])
    count = lambda text: len(judge.tokenizer.encode(text, add_bos=False))  # noqa: E731
    train_rows = word_prompts(it.train_stories(), count, p["prompt_variants"], SEED, p.get("max_prompts"))
    valid = [s for s, _ in it.valid_stories()]
    held = word_prompts(valid, count, 1, SEED + 1, p["held_prompts"])
    held_pairs_rows = word_prompts(valid, count, 2, SEED + 2, p.get("max_prompts"))
    prompts_file = write_jsonl([{"prompt": r["prompt"], "check": r["check"]} for r in train_rows],
                               work / "prompts.jsonl")
    pairs_file, cached = work / "pairs.jsonl", work / "pairs.json"
    if cached.exists():  # a rerun keeps the pairs (and so the reward model and PPO runs made from them)
        pair_info, held_pairs, held_pair_info = json.loads(cached.read_text())
        pairs = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines()]
    else:
        t = time.perf_counter()
        pairs, pair_info = preference_pairs(judge, train_rows, p["samples"], SEED + 3)
        held_pairs, held_pair_info = preference_pairs(judge, held_pairs_rows, p["samples"], SEED + 4)
        pair_info["seconds"] = time.perf_counter() - t
        write_jsonl(pairs, pairs_file)
        cached.write_text(json.dumps([pair_info, held_pairs, held_pair_info]))
    log(f"pairs: {pair_info}; held-out pairs: {held_pair_info}")
    rm_model, rm_info = train_reward_model(p, work, sft_model, pairs_file, len(pairs))
    judge.rewards = ModelRewards.load(str(rm_model), judge.tokenizer, judge.lm.config.vocab_size)
    rm_info["train_pair_accuracy"] = pair_accuracy(judge, pairs[:max(len(held_pairs), 100)])
    rm_info["held_out_pair_accuracy"] = pair_accuracy(judge, held_pairs)
    log(f"reward model: {rm_info}")
    reference = judge.measure(judge.ref, held, SEED + 5)  # the SFT model's stories the policies play against
    sft_row = judge.measure(judge.ref, held, SEED + 7, reference["rule_words"])  # SFT against itself
    runs = [ppo(p, work, sft_model, rm_model, prompts_file, k, judge, held, reference["rule_words"])
            for k in p["kl_coefs"]]
    long_run = None
    if p.get("long_steps"):  # over-optimisation takes longer than the runs above to show
        long_run = ppo(p, work, sft_model, rm_model, prompts_file, 0.0, judge, held, reference["rule_words"],
                       steps=p["long_steps"], every=p["long_every"], name="-long")
    hot_run = None
    if p.get("hot_steps"):  # no KL and a 10x learning rate: the policy moves far from SFT fast
        hot_run = ppo(p, work, sft_model, rm_model, prompts_file, 0.0, judge, held, reference["rule_words"],
                      steps=p["hot_steps"], every=p["hot_every"], name="-hot", lr=p["hot_lr"])
    dpo_row = dpo(p, work, sft_model, pairs_file, len(pairs), judge, held, reference["rule_words"])
    del emergence
    return {"settings": p, "max_sentences": MAX_SENTENCES, "require_end": REQUIRE_END, "template": TEMPLATE, "sft": sft_info,
            "prompts": {"train": len(train_rows), "held_out": len(held), "held_out_pair_prompts": len(held_pairs_rows)},
            "pairs": pair_info, "held_out_pairs": held_pair_info, "reward_model": rm_info, "sft_eval": sft_row,
            "sft_reference": {k: reference[k] for k in ("hidden", "ended", "length")}, "ppo": runs,
            "ppo_long": long_run, "ppo_hot": hot_run, "dpo": dpo_row,
            "total_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------- the report
def rows_of(result: dict) -> list[tuple[str, dict]]:
    """(label, measurement on the held-out prompts) for SFT, each PPO run's end, and DPO."""
    out = [("SFT", result["sft_eval"])]
    out += [(f"PPO, KL coef {r['kl_coef']:g}", r["curve"][-1]) for r in result["ppo"]]
    for label, r in extra_runs(result):
        out.append((f"PPO, KL coef {r['kl_coef']:g}, {label}", r["curve"][-1]))
    return out + [("DPO (beta %g)" % result["dpo"]["beta"], result["dpo"])]


def extra_runs(result: dict) -> list[tuple[str, dict]]:
    """The runs beyond the KL sweep, with their label: the longer run, the high-learning-rate one."""
    out = []
    if result.get("ppo_long"):
        out.append((f"{result['ppo_long']['curve'][-1]['step']} steps", result["ppo_long"]))
    if result.get("ppo_hot"):
        r = result["ppo_hot"]
        out.append((f"lr {r['lr']:g}, {r['curve'][-1]['step']} steps", r))
    return out


def table(result: dict) -> str:
    """The results table of docs/alignment.md (markdown)."""
    lines = ["| policy | reward-model score | hidden-rule win rate vs SFT | hidden-rule score (0-4) | stories that end "
             "| mean length (tokens) | KL to SFT (nats/story) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, m in rows_of(result):
        lines.append(f"| {label} | {m['rm']:+.2f} | {m['win_rate']:.3f} | {m['hidden']:.3f} | {m['ended']:.0%} | "
                     f"{m['length']:.0f} | {m['kl']:.2f} |")
    return "\n".join(lines)


def curves_table(result: dict) -> str:
    lines = ["| KL coef | step | reward-model score | win rate vs SFT | hidden score | length (tokens) | KL to SFT |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["ppo"] + [r for _, r in extra_runs(result)]:
        for pt in r["curve"]:
            lines.append(f"| {r['kl_coef']:g}{'' if r.get('lr', result['settings']['ppo_lr']) == result['settings']['ppo_lr'] else ', lr %g' % r['lr']} | {pt['step']} | {pt['rm']:+.2f} | {pt['win_rate']:.3f} | "
                         f"{pt['hidden']:.3f} | {pt['length']:.0f} | {pt['kl']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd"]
    panels = [("rm", "reward-model score (held-out prompts)"), ("win_rate", "hidden-rule win rate vs SFT"),
              ("kl", "KL to SFT (nats per story)")]
    for ax, (key, title) in zip(axes, panels):
        for color, r in zip(colors, result["ppo"]):
            ax.plot([pt["step"] for pt in r["curve"]], [pt[key] for pt in r["curve"]], "o-", color=color,
                    label=f"PPO, KL coef {r['kl_coef']:g}")
        for (label, r), style, color in zip(extra_runs(result), ("--", ":"), ("#d62728", "#9467bd")):
            ax.plot([pt["step"] for pt in r["curve"]], [pt[key] for pt in r["curve"]], style, color=color,
                    alpha=0.8, marker=".", label=f"PPO, KL coef {r['kl_coef']:g}, {label}")
        if key == "kl":  # the high-learning-rate run reaches hundreds of nats: a log scale above 1
            ax.set_yscale("symlog", linthresh=1.0)
        last = result["ppo"][0]["curve"][-1]["step"]
        ax.scatter([last], [result["dpo"][key]], marker="*", s=160, color="black", zorder=5, label="DPO (end)")
        if key == "win_rate":
            ax.axhline(0.5, color="#999999", lw=0.8, ls="--")
        ax.set(title=title, xlabel="PPO step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--out-json", default=None, help="results file (default bench/results/instructgpt.json; "
                    "--smoke: required)")
    ap.add_argument("--work", default=None, help="folder for the runs (a rerun reuses finished stages; default: a "
                    "temporary folder, removed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="only draw docs/alignment.png and print the tables of docs/alignment.md from the JSON")
    args = ap.parse_args(argv)
    if args.smoke and not args.out_json:
        ap.error("--smoke needs --out-json (it never replaces the committed results)")
    out_json = Path(args.out_json) if args.out_json else RESULTS
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="instructgpt-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            global REQUIRE_END
            REQUIRE_END = not args.smoke
            result = run(dict(SMOKE if args.smoke else FULL), work)
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
        from provenance import write_result

        write_result(out_json, result, "bench/instructgpt.py", sys.argv[1:], args.threads)
        log(f"wrote {out_json}")
    if not args.smoke:
        result = json.loads(out_json.read_text())
        plot(result, PLOT)
        print(table(result) + "\n\n" + curves_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
