"""The docs: README.md is short and every relative link in it resolves; the docs site builds with
`mkdocs build --strict` (every page in the nav, every relative link and API reference resolved)."""
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short_and_its_relative_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300 and len(text.encode()) <= 25 * 1024
    first_100 = "\n".join(text.splitlines()[:100])
    assert first_100.count("```python") >= 3  # the three examples come early
    missing = [target for target in LINK.findall(text)
               if not target.startswith(("http://", "https://")) and not (ROOT / target).exists()]
    assert missing == []


def test_every_doc_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").glob("*.md")]
    assert pages and [p for p in pages if p not in nav] == []


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (pathlib.Path(sys.executable).parent / "mkdocs").exists(),
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_the_docs_site_builds_strictly(tmp_path):
    mkdocs = pathlib.Path(sys.executable).parent / "mkdocs"
    out = subprocess.run([str(mkdocs) if mkdocs.exists() else "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # the optimizers' inherited mask methods and the scheduler's constructor arguments are rendered
    for name in ("MaskedSGD", "MaskedAdamW"):
        section = api[api.index(f'id="dsd_kernels.optim.{name.lower().replace("masked", "masked_")}.{name}"'):]
        for method in ("prune", "set_masks", "clear_masks", "masks"):
            assert f'{name}.{method}"' in section, (name, method)
    assert "dense_epochs" in api and "redense_lr_scale" in api and "sparse_lr_scale" in api


def test_every_public_name_has_a_docstring():
    """What the API reference renders: every public name of the package's modules, and every public
    method and property our classes define, says what it is."""
    import inspect

    import dsd_kernels as dk
    from dsd_kernels import dsd, nn, optim
    missing = []
    for module in (dk, optim, dsd, nn):
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.getdoc(obj):
                missing.append(f"{module.__name__}.{name}")
            if not inspect.isclass(obj):
                continue
            for member, value in inspect.getmembers(obj):
                code = value.fget if isinstance(value, property) else value
                if member.startswith("_") or not inspect.isfunction(code) or \
                        not code.__module__.startswith("dsd_kernels"):
                    continue
                if not inspect.getdoc(value):
                    missing.append(f"{module.__name__}.{name}.{member}")
    assert not missing, missing


def test_the_training_table_is_the_committed_results():
    """docs/benchmarks.md's whole-step table is what dsd_kernels.app.bench.tables writes from the
    committed results file: a figure that differs from the JSON fails here."""
    import json

    from dsd_kernels.app.bench.tables import table_on_page, training_table
    with open(ROOT / "benchmarks" / "results" / "training-cpu-2core-x86_64-avx2.json") as f:
        results = json.load(f)["results"]
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert table_on_page(page, "training") == training_table(results)


@pytest.mark.parametrize("name,source,page", [
    ("default-run", "docs/default-run/report.json", "docs/train.md"),
    ("sparse-run", "docs/sparse-run/report.json", "docs/dynamic-sparsity.md"),
    ("study", "docs/study/study.json", "docs/train.md"),
    ("gpu-cases", "benchmarks/results/NVIDIA-H200.json", "docs/benchmarks.md"),
    ("adamw-cpu", "benchmarks/results/cpu-2core-x86_64.json", "docs/optimizers.md"),
    *[(f"{table}@{stem}", f"benchmarks/results/{stem}.json", "docs/benchmarks.md")
      for table in ("cases", "masked-linear") for stem in ("cpu-2core-x86_64", "cpu-x86_64-avx2")]])
def test_the_committed_runs_tables_are_their_reports(name, source, page):
    """The train job's and the bench's figures on the docs pages are what the generator writes from
    the committed report.json or results file: a figure that differs from it fails here."""
    from dsd_kernels.app.bench.tables import table_from_file, table_on_page
    assert table_on_page((ROOT / page).read_text(), name) == table_from_file(name.split("@")[0], str(ROOT / source))


@pytest.mark.parametrize("name,page", [("headline", "README.md"), ("capabilities", "docs/benchmarks.md")])
def test_the_tables_of_every_results_file_are_the_committed_results(name, page):
    """Every figure of README's headline table and of the benchmarks page's per-capability table is
    what the generator reads from benchmarks/results/*.json."""
    from dsd_kernels.app.bench.tables import table_from_file, table_on_page
    text = (ROOT / page).read_text()
    assert table_on_page(text, name) == table_from_file(name, str(ROOT / "benchmarks" / "results"))


def test_writing_a_table_to_a_page_without_its_markers_leaves_the_page_whole(tmp_path, capsys):
    """--write onto a page that lacks the table's markers is a usage error naming the page and the
    markers (--marker), and the page keeps every byte it had (it was once truncated to nothing)."""
    from dsd_kernels.app.bench.tables import main
    page = tmp_path / "page.md"
    text = "# a page\n\n<!-- table:cases@cpu-x86_64-avx2 -->\nthe previous table\n<!-- /table:cases@cpu-x86_64-avx2 -->\n"
    page.write_text(text)
    results = str(ROOT / "benchmarks" / "results" / "cpu-x86_64-avx2.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["cases", results, "--write", str(page)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "<!-- table:cases -->" in err and "--marker" in err and str(page) in err
    assert page.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["page.md"]
    assert main(["cases", results, "--write", str(page), "--marker", "cases@cpu-x86_64-avx2"]) == 0
    assert page.read_text().startswith("# a page\n") and "the previous table" not in page.read_text()


# a number with a unit of time, bandwidth or throughput, or a speed ratio ("1.5x"): a measured
# figure, unless it is a shape ("64x64": a digit follows the x)
MEASURED_FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:\s?(?:ns|µs|us|ms|s|sec|seconds?|min|minutes?|hours?"
                             r"|[GT]B/s|GiB/s|[GT]FLOP/s)\b|x(?!\w))")


def prose_lines(text: str):
    """(line number, line) of a page outside fenced code blocks and generated tables."""
    fenced = generated = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        elif re.fullmatch(r"<!-- table:\S+ -->", stripped):
            generated = True
        elif re.fullmatch(r"<!-- /table:\S+ -->", stripped):
            generated = False
        elif not fenced and not generated:
            yield number, line


def test_prose_holds_no_measured_figures():
    """Times, bandwidths and speed ratios in README.md and docs/ live only in the generated tables
    (tied to the results JSON by the tests above) and in code blocks; prose and hand-written tables
    point at those instead of repeating them, so that no page can disagree with the JSON."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = [f"{page.relative_to(ROOT)}:{number}: {line.strip()}" for page in pages
             for number, line in prose_lines(page.read_text()) if MEASURED_FIGURE.search(line)]
    assert not found, "measured figures outside the generated tables:\n" + "\n".join(found)


@pytest.mark.parametrize("line", ["at 90% of tiles it ran 1.46x faster", "took 45 s", "12.5 GB/s here",
                                  "a step of 3.2ms", "about 25 minutes", "| 0.93x |"])
def test_the_figure_pattern_finds_measured_figures(line):
    assert MEASURED_FIGURE.search(line)


@pytest.mark.parametrize("line", ["64x64 tiles", "2 x 128 tokens", "fp32, 2:4 masks at 50%", "sm_90, cuda 13.0",
                                  "<!-- table:cases@cpu-x86_64-avx2 -->"])
def test_the_figure_pattern_leaves_shapes_and_settings(line):
    assert not MEASURED_FIGURE.search(line)


def test_generated_tables_are_left_out_of_the_prose_scan():
    page = "a\n<!-- table:x -->\n| 1.5x |\n<!-- /table:x -->\n```\n3 ms\n```\nb 2x\n"
    assert [n for n, _ in prose_lines(page)] == [1, 8]
