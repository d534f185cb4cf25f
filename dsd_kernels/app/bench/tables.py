"""Markdown tables of committed bench results, so that the figures on the docs pages come from
the results JSON and nowhere else. A page holds each generated table between the markers
`<!-- table:NAME -->` and `<!-- /table:NAME -->`; tests/test_docs.py checks that what is there is
what this module writes from the committed file.

    python -m dsd_kernels.app.bench.tables training benchmarks/results/training-cpu-2core-x86_64-avx2.json
    python -m dsd_kernels.app.bench.tables training RESULTS.json --write docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from .training import PRUNE, SPARSIFIER, TWO_PASSES

_UNSTRUCTURED = re.compile(r"^(?P<model>.+?), (?P<opt>SGD\(momentum=0\.9\)|AdamW): (?P<ours>Masked\w+), 50% "
                           r"unstructured, batch (?P<batch>.+?), one thread$")
_ONE_PASS = re.compile(r"^(?P<model>.+?), (?P<opt>SGD\(momentum=0\.9\)|AdamW) \+ DSDScheduler masks")
_BLOCK = re.compile(r"^(?P<model>.+?), (?P<ours>Masked\w+) \+ DSDScheduler\(block=\(64, 64\)\), (?P<s>\d+)% of "
                    r"tiles, batch (?P<batch>.+?), one thread$")


def _ratio(result: dict, key: str) -> float:
    return result["time_vs_dense_step"][key]


def _memory(result: dict, key: str) -> float:
    sizes = result["state_bytes"]
    return sizes[key] / sizes["dense step"]


def training_rows(results: list[dict]) -> list[tuple[str, dict, dict]]:
    """(row label, {optimizer: time / dense}, {optimizer: memory / dense}) per row, in the models'
    order; optimizer "sgd" or "adamw"."""
    rows: dict[str, tuple[dict, dict]] = {}

    def put(label, opt, ratio, memory):
        times, mems = rows.setdefault(label, ({}, {}))
        times[opt], mems[opt] = ratio, memory

    for r in results:
        name = r["case"]
        if m := _UNSTRUCTURED.match(name):
            opt = "sgd" if m["opt"].startswith("SGD") else "adamw"
            model = m["model"]
            put(f"{model}: MaskedSGD / MaskedAdamW, 50% unstructured, batch {m['batch']}", opt,
                _ratio(r, "ours [auto]"), _memory(r, "ours"))
            for peer, label in ((PRUNE, "`torch.nn.utils.prune.l1_unstructured`, 50%"),
                                (SPARSIFIER, "`torch.ao.pruning.WeightNormSparsifier` (1x1 blocks), 50%")):
                if peer in r["time_vs_dense_step"]:
                    put(f"{model}: {label}", opt, _ratio(r, peer), _memory(r, peer))
        elif m := _ONE_PASS.match(name):
            opt = "sgd" if m["opt"].startswith("SGD") else "adamw"
            model = m["model"]
            put(f"{model}: torch optimizer + DSDScheduler masks (OptimizerMasks, one pass), 50%", opt,
                _ratio(r, "ours [auto]"), _memory(r, "ours"))
            put(f"{model}: the same with two passes (`elementwise=False`), in the same run", opt,
                _ratio(r, TWO_PASSES), _memory(r, "ours"))
        elif m := _BLOCK.match(name):
            opt = "sgd" if m["ours"] == "MaskedSGD" else "adamw"
            put(f"{m['model']}: block DSD, `DSDScheduler(block=(64, 64))`, {m['s']}% of tiles, batch {m['batch']}",
                opt, _ratio(r, "ours [auto]"), _memory(r, "ours"))
    return [(label, times, mems) for label, (times, mems) in rows.items()]


def training_table(results: list[dict]) -> str:
    def cell(values, key, fmt):
        return fmt.format(values[key]) if key in values else "-"
    lines = ["| sparse phase | SGD(momentum=0.9): time / dense | AdamW: time / dense | memory / dense (SGD / AdamW) |",
             "|---|---|---|---|"]
    for label, times, mems in training_rows(results):
        lines.append(f"| {label} | {cell(times, 'sgd', '{:.3f}x')} | {cell(times, 'adamw', '{:.3f}x')} | "
                     f"{cell(mems, 'sgd', '{:.3f}x')} / {cell(mems, 'adamw', '{:.3f}x')} |")
    return "\n".join(lines)


TABLES = {"training": training_table}


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
    parser.add_argument("results", help="a bench results JSON")
    parser.add_argument("--write", metavar="PAGE", help="replace the table between the page's markers")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        table = TABLES[args.table](json.load(f)["results"])
    if args.write:
        with open(args.write) as f:
            page = f.read()
        with open(args.write, "w") as f:
            f.write(replace_table(page, args.table, table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
