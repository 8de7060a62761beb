"""Prompt programs: zero-shot, few-shot (fixed, seeded random or nearest examples), chain of
thought, few-shot CoT, reframing, cascades of named stages (a DAG) and self-consistency, as
composable Python objects or the same programs in YAML (`emergence prompt run PROGRAM.yaml`).

    from emergence.prompts import CoT, LocalBackend, Program, load_program
    program = Program([CoT(name="solve", template="Q: {question}")], inputs=["question"])
    trace = program.run(LocalBackend(emergence.load("emergence-6m")), {"question": "2 + 3?"})
    print(trace.format())
"""

from .backends import Backend, HTTPBackend, LocalBackend, Sample
from .program import (STAGE_TYPES, CoT, FewShot, FewShotCoT, Program, PromptError, Reframe, SelfConsistency, Stage,
                      StageTrace, Template, Trace, Value, ZeroShot, extract, majority, nearest, render, variables)
from .yaml_io import load_program, loads_program

__all__ = ["STAGE_TYPES", "Backend", "CoT", "FewShot", "FewShotCoT", "HTTPBackend", "LocalBackend", "Program",
           "PromptError", "Reframe", "Sample", "SelfConsistency", "Stage", "StageTrace", "Template", "Trace", "Value",
           "ZeroShot", "extract", "load_program", "loads_program", "majority", "nearest", "render", "variables"]
