"""Test-time search (issue 19): strategies that spend inference compute for accuracy.

    prompt.py      the prompt template (PROMPT_TEMPLATE) and the step / revision formats
    policy.py      Policy: LocalPolicy (emergence's decode batch, n samples forked from one
                   prompt's KV blocks) and HTTPPolicy (OpenAI-compatible /v1/completions)
    verifier.py    ORM and PRM verifiers over a RewardModel; aggregation last / min / prod
    strategies.py  majority, best_of_n, weighted_best_of_n, beam_search, dvts, revisions,
                   self_correct (a PRM-checked reasoning loop), compute_optimal
    flops.py       FLOPs per token (2 N + attention), Wilson intervals
    run.py         a strategy over a problem file; `emergence search`
    train.py       `emergence search-train`: the policies, the ORM and PRM, the revision models
    revise.py      the revision models' training rows (wrong attempts, then the right solution)
"""

from .flops import FlopsModel, wilson_interval
from .policy import Generation, HTTPPolicy, LocalPolicy, Policy, Sample, Usage
from .prompt import PROMPT_TEMPLATE, REVISION_TEMPLATE, format_prompt, revision_prompt, training_text
from .run import run_search, solve_problem
from .strategies import STRATEGIES, Candidate, Outcome, SearchConfig, Table
from .verifier import RewardVerifier, Verifier, aggregate, load_verifier

__all__ = ["Candidate", "FlopsModel", "Generation", "HTTPPolicy", "LocalPolicy", "Outcome", "PROMPT_TEMPLATE",
           "Policy", "REVISION_TEMPLATE", "RewardVerifier", "STRATEGIES", "Sample", "SearchConfig", "Table", "Usage",
           "Verifier", "aggregate", "format_prompt", "load_verifier", "revision_prompt", "run_search",
           "solve_problem", "training_text", "wilson_interval"]
