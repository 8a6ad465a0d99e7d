"""The benchmark harness every script in bench/ uses.

A script keeps what is its own (the variants it compares and its setting) and takes the rest
from here: the common flags (`flags`), running variants x seeds in resumable run folders or
several runs at once (`runs`), reading run folders back (`folders`), the one row schema
(`rows`) and the writer of JSON, Markdown and figures with the rerun command (`writer`).
"""

from p2pmoe.harness.flags import RESULTS, add_flags, bench_parser, chosen, method_defaults, parse_flags, seed_list
from p2pmoe.harness.folders import client_traffic, finished_summary, partial_summary
from p2pmoe.harness.rows import failed_row, honest_view, result_row, upgraded
from p2pmoe.harness.runs import RunResult, Variant, by_label, fine_tuned_final, run_parallel, run_seeds, slug, timed_run
from p2pmoe.harness.writer import markdown, rerun_command, write_results, write_seed_tables

__all__ = [
    "RESULTS",
    "RunResult",
    "Variant",
    "add_flags",
    "bench_parser",
    "by_label",
    "chosen",
    "client_traffic",
    "failed_row",
    "finished_summary",
    "fine_tuned_final",
    "honest_view",
    "markdown",
    "method_defaults",
    "parse_flags",
    "partial_summary",
    "result_row",
    "rerun_command",
    "run_parallel",
    "run_seeds",
    "seed_list",
    "slug",
    "timed_run",
    "upgraded",
    "write_results",
    "write_seed_tables",
]
