"""Markdown tables of committed bench results, so that the figures on the docs pages come from
the results JSON and nowhere else. A page holds each generated table between the markers
`<!-- table:NAME -->` and `<!-- /table:NAME -->`; tests/test_docs.py checks that what is there is
what this module writes from the committed file.

    python -m dsd_kernels.app.bench.tables training benchmarks/results/training-cpu-2core-x86_64-avx2.json
    python -m dsd_kernels.app.bench.tables training RESULTS.json --write docs/benchmarks.md
    python -m dsd_kernels.app.bench.tables default-run docs/default-run/report.json --write docs/train.md
    python -m dsd_kernels.app.bench.tables sparse-run docs/sparse-run/report.json --write docs/dynamic-sparsity.md
    python -m dsd_kernels.app.bench.tables headline benchmarks/results --write README.md
    python -m dsd_kernels.app.bench.tables capabilities benchmarks/results --write docs/benchmarks.md
    python -m dsd_kernels.app.bench.tables cases benchmarks/results/cpu-x86_64-avx2.json --write docs/benchmarks.md \
        --marker cases@cpu-x86_64-avx2
"""
from __future__ import annotations

import argparse
import json
import sys

from ..._files import atomic_write_text
from .case_tables import adamw_cpu_table, cases_table, gpu_cases_table, masked_linear_table, training_table
from .headline_tables import capabilities_table, headline_table


def _study_table(study: dict) -> str:
    from ..study import cells_table
    return cells_table(study)


def _run_tables(report: dict) -> str:
    from ..report import summary_tables
    return summary_tables(report)


# name -> (what it is made from: "results", a bench file's results list, or "report", a train
# job's report.json; the table)
TABLES = {"training": ("results", training_table), "default-run": ("report", _run_tables),
          "sparse-run": ("report", _run_tables), "headline": ("folder", headline_table),
          "adamw-cpu": ("results", adamw_cpu_table), "capabilities": ("folder", capabilities_table),
          "cases": ("results", cases_table), "masked-linear": ("results", masked_linear_table),
          "study": ("report", _study_table), "gpu-cases": ("results", gpu_cases_table)}


def table_from_file(name: str, path: str) -> str:
    """The table `name` written from the file at `path`."""
    source, make = TABLES[name]
    if source == "folder":  # every results JSON of the folder, by file name
        import glob
        import os
        files = {}
        for file in sorted(glob.glob(os.path.join(path, "*.json"))):
            with open(file) as f:
                files[os.path.basename(file)] = json.load(f)
        return make(files)
    with open(path) as f:
        data = json.load(f)
    return make(data["results"] if source == "results" else data)


def replace_table(page: str, name: str, table: str) -> str:
    """`page` with the text between its markers for `name` replaced by `table`."""
    start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    if start not in page or end not in page:
        raise ValueError(f"the page has no {start} ... {end} markers")
    head, rest = page.split(start, 1)
    return f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}"


def table_on_page(page: str, name: str) -> str:
    """The text between the page's markers for `name`."""
    return page.split(f"<!-- table:{name} -->", 1)[1].split(f"<!-- /table:{name} -->", 1)[0].strip("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("results", help="a bench results JSON, a train job's report.json, or (headline) the "
                                        "folder of results JSON")
    parser.add_argument("--write", metavar="PAGE", help="replace the table between the page's markers")
    parser.add_argument("--marker", help="the markers' name (default: the table's; a page holding one kind of "
                                         "table from two files names each, e.g. cases@cpu-x86_64-avx2)")
    args = parser.parse_args(argv)
    table = table_from_file(args.table, args.results)
    if args.write:
        with open(args.write) as f:
            page = f.read()
        try:
            text = replace_table(page, args.marker or args.table, table)
        except ValueError as err:  # the page is left as it was
            parser.error(f"--write {args.write}: {err} (--marker names them, e.g. {args.table}@<results stem>)")
        atomic_write_text(args.write, text)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
