"""The text a policy sees and writes during search: the prompt template, steps, revisions.

A problem (problems.py) is put to a policy as

    Question: {question}
    Answer step by step.

and the policy continues with the canonical solution format (problems.solution_text): one
"Step k: a op b = c" line per step, then "Answer: N". The policies to be trained for search
are trained on exactly `training_text(row)` (this template, then the canonical solution), so
the template is a module constant that training and search share.

A step is one line: step-wise search (beam search, DVTS, lookahead) continues a partial
solution with stop="\\n", so each call of the policy writes one line; the newline is added back
when the step is kept. A solution is complete once a line holds "Answer:" (or the policy
ends the text, or runs out of tokens).

Sequential revisions put previous attempts in the prompt (REVISION_TEMPLATE, at most
`window` of them, oldest first); the revision model is trained (by another task) to write a
better attempt after them:

    Question: {question}
    Attempt 1:
    {attempt}
    Attempt 2:
    {attempt}
    Revise: answer step by step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PROMPT_TEMPLATE = "Question: {question}\nAnswer step by step.\n"
ATTEMPT_TEMPLATE = "Attempt {k}:\n{attempt}\n"
REVISION_TEMPLATE = "Question: {question}\n{attempts}Revise: answer step by step.\n"
STEP_STOP = "\n"  # the string that ends a step

_ANSWER_LINE = re.compile(r"^\s*Answer\s*:", re.IGNORECASE)


def format_prompt(question: str) -> str:
    """The prompt for a problem's question (PROMPT_TEMPLATE)."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def training_text(row: dict) -> str:
    """What a search policy is trained on: the prompt, then the canonical solution."""
    from ..problems import solution_text

    return format_prompt(row["question"]) + solution_text(row)


def revision_prompt(question: str, attempts: Sequence[str], window: int = 4) -> str:
    """The prompt asking for a revision of the last `window` attempts (REVISION_TEMPLATE)."""
    kept = list(attempts)[-window:] if window > 0 else []
    first = len(attempts) - len(kept) + 1
    body = "".join(ATTEMPT_TEMPLATE.format(k=first + i, attempt=a.strip("\n")) for i, a in enumerate(kept))
    return REVISION_TEMPLATE.format(question=question.strip(), attempts=body)


def is_answer_line(line: str) -> bool:
    return _ANSWER_LINE.match(line) is not None


def steps_of(solution: str) -> list[str]:
    """The non-blank lines of a solution (its steps; the "Answer:" line is the last one)."""
    return [line for line in solution.split("\n") if line.strip()]


def trim_solution(text: str) -> str:
    """A completion up to and including its first "Answer:" line (what a policy writes after
    answering is not part of the solution); a completion without one is kept whole."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if is_answer_line(line):
            return "\n".join(lines[:i + 1])
    return text
