"""Evaluation: GLUE / generation / GSM8K metrics and a HumanEval execution sandbox.

``metrics`` has no heavy imports (sacrebleu and rouge-score load on first use); ``sandbox`` runs
untrusted code only in a separate, contained process and scores HumanEval from a judge process
the code cannot reach — its module docstring lists which fences hold, measured.
"""

from .metrics import (
    accuracy,
    bleu4,
    extract_final_number,
    f1_binary,
    glue_metrics,
    gsm8k_exact_match,
    matthews_corrcoef,
    rouge1,
)
from .sandbox import (
    ExecutionResult,
    humaneval_pass_at_1,
    humaneval_program,
    read_humaneval,
    run_humaneval,
    run_program,
)

__all__ = [
    "ExecutionResult",
    "accuracy",
    "bleu4",
    "extract_final_number",
    "f1_binary",
    "glue_metrics",
    "gsm8k_exact_match",
    "humaneval_pass_at_1",
    "humaneval_program",
    "matthews_corrcoef",
    "read_humaneval",
    "rouge1",
    "run_humaneval",
    "run_program",
]
