"""The backend registry, use_backend, `dsd-kernels info`, and the C++ extension's presence."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import _backend
from dsd_kernels.app import cli


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.set_backend("cuda-magic")
    dk.set_backend("torch")
    assert dk.get_backend() == "torch"
    dk.set_backend(None)
    assert dk.get_backend() in _backend.BACKENDS


def test_env_variable_validated(monkeypatch):
    monkeypatch.setenv("DSD_KERNELS_BACKEND", "fortran")
    with pytest.raises(ValueError, match="DSD_KERNELS_BACKEND"):
        dk.get_backend()


def test_use_backend_restores_the_previous_choice_even_on_error():
    with dk.use_backend("torch"):
        assert dk.get_backend() == "torch"
        with dk.use_backend("auto"):
            assert dk.get_backend() == "auto"
        assert dk.get_backend() == "torch"
    assert dk.get_backend() == "auto"
    with pytest.raises(ZeroDivisionError):
        with dk.use_backend("torch"):
            1 / 0
    assert dk.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        with dk.use_backend("fortran"):
            pass


def test_use_backend_selects_the_implementation_that_runs():
    with dk.use_backend("torch"):
        row = _backend.resolve("masked_sgd", torch.device("cpu"), (torch.float32,))
    assert (row.backend, row.module) == ("torch", ".backends.torch.masked_sgd")
    if "cpp" in dk.available_backends():
        with dk.use_backend("cpp"):
            row = _backend.resolve("masked_sgd", torch.device("cpu"), (torch.float32,))
        assert (row.backend, row.module) == ("cpp", ".backends.cpp.masked_sgd")


def test_auto_on_cpu_takes_cpp_when_built_else_torch():
    want = "cpp" if "cpp" in dk.available_backends() else "torch"
    # re-masking: the C++ AVX-512 or AVX2 pass for fp32 alone, else the composite (and for mixed lists)
    vectorised = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and \
        os.environ.get("DSD_KERNELS_CPU_CAPABILITY", "").lower() != "default"
    for dtypes, backend in [((torch.float32,), want if vectorised else "torch"), ((torch.float16,), "torch"),
                            ((torch.float64,), "torch"), ((torch.float32, torch.bfloat16), "torch")]:
        assert _backend.resolve("apply_masks", torch.device("cpu"), dtypes).backend == backend, dtypes
    if "cpp" in dk.available_backends():
        with dk.use_backend("cpp"):  # forced, it serves every dtype
            assert _backend.resolve("apply_masks", torch.device("cpu"), (torch.float16,)).backend == "cpp"
    for op in ("magnitude_select", "magnitude_select_sharded", "masked_sgd", "masked_linear"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert _backend.resolve(op, torch.device("cpu"), (dtype,)).backend == want


def test_every_op_has_a_row_for_every_float_dtype_and_variant_on_any_device():
    for op in _backend.OPS:
        for device in ("cpu", "cuda", "mps"):
            rows = _backend.rows_for(op, device)
            for variant in rows[0].variants:
                for dtype in _backend.FLOATS:
                    assert any(r.auto and r.serves(device, (dtype,), variant) for r in rows), \
                        (op, device, dtype, variant)


def test_sgd_with_torch_fused_arithmetic_runs_where_it_is_reproduced():
    # on CPU both rows call torch's own fused kernel for "fused" (then mask): auto takes the C++
    # row where it is built (one masking call), with no warning, as for the foreach arithmetic
    want = "cpp" if "cpp" in dk.available_backends() else "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = _backend.resolve("masked_sgd", torch.device("cpu"), (torch.float32,), "fused")
    assert row.backend == want and not row.fallback
    assert _backend.resolve("masked_sgd", torch.device("cpu"), (torch.float32,)).backend == want


def test_registry_declares_where_kernels_are_missing():
    # csrc/cuda has no masked_linear and no sharded-selection kernels; tl.dot has no general fp64
    cuda = {(r.op, r.backend): r for r in _backend.REGISTRY if r.device == "cuda"}
    assert ("masked_linear", "cpp") not in cuda and ("magnitude_select_sharded", "cpp") not in cuda
    assert torch.float64 not in cuda[("masked_linear", "triton")].dtypes
    assert torch.float64 in cuda[("masked_sgd", "triton")].dtypes


@pytest.mark.skipif("triton" not in dk.available_backends(), reason="triton backend unavailable")
def test_fp64_masked_linear_on_cuda_takes_the_declared_fallback_and_says_so_once():
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match=r"masked_linear on cuda float64 uses the torch backend "
                                            r"\(fallback; triton does not serve float64\)"):
        row = _backend.resolve("masked_linear", torch.device("cuda"), (torch.float64,))
    assert (row.backend, row.fallback) == ("torch", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        _backend.resolve("masked_linear", torch.device("cuda"), (torch.float64,))
        # fp32 on CUDA: Triton, no warning
        assert _backend.resolve("masked_linear", torch.device("cuda"), (torch.float32,)).backend == "triton"


def test_forced_backend_without_a_row_warns_and_chooses_automatically():
    _backend._warned.clear()
    with dk.use_backend("cpp"):
        with pytest.warns(RuntimeWarning, match="masked_linear has no 'cpp' backend for float32 on cuda"):
            row = _backend.resolve("masked_linear", torch.device("cuda"), (torch.float32,))
    assert row.backend == ("triton" if "triton" in dk.available_backends() else "torch")


def test_forced_backend_that_cannot_run_here_is_a_clear_error():
    if "cpp" in dk.available_backends() and not _backend.cpp_has_cuda_kernel("masked_sgd"):
        with dk.use_backend("cpp"):
            with pytest.raises(RuntimeError, match="masked_sgd: backend 'cpp' requested but "
                                                   "unavailable: dsd_kernels._C has no cuda kernel"):
                _backend.resolve("masked_sgd", torch.device("cuda"), (torch.float32,))
    with dk.use_backend("cpp"), pytest.raises(KeyError, match="unknown op"):
        _backend.resolve("masked_adam", torch.device("cpu"), (torch.float32,))


def test_cpp_reason_says_whether_cuda_kernels_were_built():
    ok, why = _backend.cpp_status()
    if not ok:
        pytest.skip(why)
    assert ("CUDA kernels for magnitude_select, masked_sgd" in why) == \
        _backend.cpp_has_cuda_kernel("masked_sgd"), why
    if torch.version.cuda is None:
        assert "no CUDA kernels: torch is a CPU-only build" in why


def test_extension_is_built_where_a_compiler_is_present():
    # the install builds dsd_kernels._C whenever a C++ compiler is found: a failed build must
    # show here, not as skipped cpp tests
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the package runs on its torch backend")
    assert "cpp" in dk.available_backends(), _backend.reasons()["cpp"]


def test_no_module_outside_the_registry_imports_a_backend_package():
    import pathlib
    import re
    root = pathlib.Path(dk.__file__).parent
    # who may import each: the kernels only through the registry (and the benchmarks, for the dense
    # oneDNN matmul baseline of backends/dense_matmul.py); the per-tensor references only from the
    # optimizers' functional forms (implementation="reference", as torch/optim splits them)
    allowed = {"backends": {"_backend.py", "app/bench/cases.py"},
               "reference": {"optim/masked_sgd.py", "optim/masked_adamw.py"}}
    offenders = []
    for package, modules in allowed.items():
        pattern = re.compile(r"^\s*(from|import)\s+(\.+|dsd_kernels\.)" + package + r"\b"
                             r"|^\s*from\s+(\.+|dsd_kernels)\s+import\s+.*\b" + package + r"\b", re.M)
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            if rel.parts[0] == package or rel.as_posix() in modules:
                continue
            if pattern.search(path.read_text()):
                offenders.append((package, rel.as_posix()))
    assert offenders == []


def test_info_prints_the_registry_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "cpp" in out and "backend requested" in out
    header = next(line for line in out.splitlines() if line.split()[:3] == ["op", "backend", "device"])
    assert header.split()[3:] == ["dtypes", "role", "available"]
    assert any(line.split()[:5] == ["masked_linear", "triton", "cuda", "fp16,", "bf16,"]
               for line in out.splitlines())
    assert sum(1 for line in out.splitlines() if "fallback" in line) == len(_backend.OPS)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "dsd_kernels.app.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "bench" in out.stdout


def test_bench_command_times_every_backend_against_the_baselines(tmp_path):
    from dsd_kernels.backends.dense_matmul import onednn_linear_available
    out = tmp_path / "results.json"
    assert cli.main(["bench", "--ops", "masked_linear", "--device", "cpu", "--min-run-time", "0.03",
                     "--linear-shapes", "128x256x192", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__
    # on CPU: fp32, unstructured 50% and 64x64 blocks at 50/75/90%; forward, dX, dW, the step
    kinds = ["unstructured 50%", "64x64 blocks 50%", "64x64 blocks 75%", "64x64 blocks 90%"]
    assert [(r["op"], r["case"]) for r in data["results"]] == [
        (op, f"128x256->192 {kind} float32") for kind in kinds
        for op in ("masked_linear", "masked_linear dX", "masked_linear dW", "masked_linear step")]
    compiled = {"cpp"} if "cpp" in dk.available_backends() else set()
    for r in data["results"]:
        assert set(r["ours_s"]) == {"torch"} | compiled  # the interpreter is never timed
        # MKL's masked and dense products, and dense oneDNN's where torch has it
        assert len(r["baselines_s"]) == (3 if onednn_linear_available(torch.ones(1)) else 2)
        assert r["speedup_vs_best_baseline"]
        assert all(t > 0 for t in [*r["ours_s"].values(), *r["baselines_s"].values()])


def test_submodules_are_imported_on_first_use():
    code = ("import sys, dsd_kernels as dk\n"
            "assert 'dsd_kernels.optim' not in sys.modules and 'dsd_kernels.dsd' not in sys.modules\n"
            "assert dk.optim.MaskedSGD and dk.nn.MaskedLinear and dk.dsd.DSDScheduler\n"
            "assert 'dsd_kernels.optim' in sys.modules\n"
            "print(sorted(set(dir(dk)) & {'optim', 'nn', 'dsd'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['dsd', 'nn', 'optim']"
    with pytest.raises(AttributeError, match="has no attribute 'optimm'"):
        dk.optimm


def test_bench_reports_ours_against_the_copy_bandwidth_measured_beside_it():
    from dsd_kernels.app import bench as B
    x = torch.randn(1 << 16)
    refs = B.copy_reference("cpu", x.numel() * 4 * 2)
    (fn, moved), (_, in_place) = refs.values()
    assert moved == x.numel() * 4 * 2 and in_place == moved * 3 // 2  # under the cap: the op's own bytes
    assert list(B.copy_reference("cpu", 1 << 40).values())[0][1] == B.COPY_REFERENCE_BYTES
    case = B.Case("apply_masks_", "tiny", x.numel() * 4 * 2, ours=lambda: x.mul_(1.0),
                  baselines={"x.mul_(1)": lambda: x.mul_(1.0)}, references=refs)
    r = B.run_case(case, min_run_time=0.03, backends=["torch"])
    ref = r["references_GBps"]["copy_ (read + write)"]
    assert ref == moved / r["references_s"]["copy_ (read + write)"] / 1e9 and ref > 0
    assert r["ours_fraction_of_reference_GBps"]["copy_ (read + write)"]["torch"] == r["ours_GBps"]["torch"] / ref
    assert "reference: copy_ (read + write)" in B.format_row(r)


def test_use_backend_is_per_thread():
    """Two threads in overlapping use_backend blocks each see their own choice, and the process
    is left on its own choice (set_backend) after both exit."""
    import threading

    entered, seen, errors = threading.Barrier(2), {}, []

    def worker(name):
        try:
            with dk.use_backend(name):
                entered.wait(timeout=10)  # both blocks open at once
                seen[name] = dk.get_backend()
                entered.wait(timeout=10)
            seen[name + " after"] = dk.get_backend()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    dk.set_backend("torch")
    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in ("cpp", "triton")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors
        assert seen == {"cpp": "cpp", "triton": "triton", "cpp after": "torch", "triton after": "torch"}
        assert dk.get_backend() == "torch"
        with dk.use_backend(None):  # "auto" inside a block overrides the process-wide choice
            assert dk.get_backend() == "auto"
        assert dk.get_backend() == "torch"
    finally:
        dk.set_backend(None)
    assert _backend._forced is None


def test_bench_writes_under_runs_by_default_and_never_over_a_file_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quick = ["bench", "--ops", "masked_linear", "--device", "cpu", "--min-run-time", "0.01", "--backends", "torch",
             "--linear-shapes", "16x32x32"]
    assert cli.main(quick) == 0
    written = list((tmp_path / "runs").glob("bench-*/cpu-*.json"))
    assert len(written) == 1 and f"wrote {written[0]}" in capsys.readouterr().out
    target = tmp_path / "kept.json"
    target.write_text(json.dumps({"environment": {}, "results": [{"op": "other", "case": "kept"}]}))
    assert cli.main(quick + ["--out", str(target)]) == 2
    assert "exists; pass --merge" in capsys.readouterr().err
    assert json.loads(target.read_text())["results"] == [{"op": "other", "case": "kept"}]  # untouched
    assert cli.main(quick + ["--out", str(target), "--merge"]) == 0
    cases = [(r["op"], r["case"]) for r in json.loads(target.read_text())["results"]]
    assert cases[0] == ("other", "kept") and len(cases) > 1
