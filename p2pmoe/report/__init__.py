"""Reports on run folders: tables for terminals and benchmark files, figures and index.html.

`format_table`, `summary_row`, `bench_row` and `rerun_command` (bench/ scripts and the command
line) import without matplotlib; `write_report` draws figures only when called.
"""

from p2pmoe.report.build import Report, write_report
from p2pmoe.report.folders import RunData, load_run
from p2pmoe.report.tables import bench_row, format_table, rerun_command, summary_row

__all__ = ["Report", "RunData", "bench_row", "format_table", "load_run", "rerun_command", "summary_row", "write_report"]
