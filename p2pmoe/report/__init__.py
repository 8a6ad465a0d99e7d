"""Reports on run folders: tables for terminals and benchmark files, figures and index.html.

`format_table`, `summary_row` and `rerun_command` (the benchmark harness and the command
line) import without matplotlib; `write_report` draws figures only when called.
"""

from p2pmoe.report.build import Report, write_report
from p2pmoe.report.folders import RunData, load_run
from p2pmoe.report.tables import format_table, rerun_command, summary_row

__all__ = ["Report", "RunData", "format_table", "load_run", "rerun_command", "summary_row", "write_report"]
