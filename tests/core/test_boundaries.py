"""Architectural boundaries and the convention adapter, checked mechanically."""
import ast
import subprocess
import sys
import pathlib

import torch

from reflow_core import paths, solvers

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imports(path: pathlib.Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_reflow_core_imports_neither_prefect_nor_mlflow():
    for f in (ROOT / "reflow_core").rglob("*.py"):
        assert not _imports(f) & {"prefect", "mlflow", "prefect_dask", "prefect_ray"}, f


def _internal_imports() -> dict[str, set[str]]:
    """reflow_core module -> the reflow_core modules it imports (relative imports, module level or not); a package's
    imports of its own submodules are not edges."""
    core = ROOT / "reflow_core"
    mods = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
            for f in core.rglob("*.py")}
    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
                deps |= {m for m in [base] + [f"{base}.{a.name}" for a in node.names] if m in mods}
        graph[name] = {d for d in deps if d != name and not d.startswith(name + ".") and not name.startswith(d + ".")}
    return graph


def test_reflow_core_has_no_import_cycles():
    graph, state = _internal_imports(), {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) != "done":
            state[m] = "open"
            for d in sorted(graph[m]):
                visit(d, path + [m])
            state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    assert "reflow_core.train" not in graph["reflow_core.distributed"]  # the cycle this check was added for
    assert graph["reflow_core.stages.kinds"] >= {"reflow_core.stages.teacher", "reflow_core.stages.base"}


def test_only_tracking_imports_mlflow():
    """MLflow lives in tracking (runs, metrics) and serving (the logged model and the pyfunc MLflow runs)."""
    users = {f.name for f in (ROOT / "flows").rglob("*.py") if "mlflow" in _imports(f)}
    assert users <= {"tracking.py", "tracking_store.py", "serving.py", "sampler_model.py"}, users


def test_original_rf_adapter_generates_in_our_convention():
    """Original RF: x_s = s x_data + (1 - s) x_noise, v_rf = x_data - x_noise. Adapted, our sampler (t: 1 -> 0)
    carries noise to data, and our inversion carries data back to noise."""
    x_data, x_noise = torch.randn(6, 2), torch.randn(6, 2)
    v_rf = lambda x, s: x_data - x_noise  # the exact RF velocity of this straight coupling
    v = paths.from_original_rf(v_rf)
    assert torch.allclose(solvers.sample(v, x_noise, nfe=3), x_data, atol=1e-6)
    assert torch.allclose(solvers.invert(v, x_data, nfe=3), x_noise, atol=1e-6)
    # and the time map: RF's s = 0.25 is our t = 0.75 (closer to noise)
    s = torch.full((6,), 0.25)
    rf_point = s[:, None] * x_data + (1 - s[:, None]) * x_noise
    assert torch.allclose(paths.interpolate(x_data, x_noise, 1 - s), rf_point)


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the pydantic models; regenerate it when a field changes."""
    made = subprocess.run([sys.executable, str(ROOT / "docs" / "tools" / "config_reference.py")], check=True,
                          capture_output=True, text=True).stdout
    assert (ROOT / "docs" / "configuration.md").read_text().strip() == made.strip(), \
        "run: python docs/tools/config_reference.py > docs/configuration.md"


def test_gpu_benchmark_imports_only_what_the_gpu_machine_can_hold():
    """The lent GPU machine has torch, numpy, fsspec, pyyaml, tqdm, matplotlib, and receives pydantic and zarr as
    carried wheels (benchmarks/device_wheels.sh); nothing of the orchestration stack may be pulled in."""
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu; "
            "import reflow_core.stages, reflow_core.pairs, reflow_core.metrics, reflow_core.plots, reflow_core.accel; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout.split())
    assert "gpu" in loaded and "zarr" in loaded and "pydantic" in loaded
    forbidden = {"prefect", "mlflow", "s3fs", "aiobotocore", "botocore", "boto3", "dask", "distributed",
                 "torch_fidelity", "torchvision", "moto", "prefect_dask", "sklearn"}
    assert not loaded & forbidden, loaded & forbidden
    carried = {"pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "zarr",
               "numcodecs", "donfig", "google_crc32c"}
    wheels = (ROOT / "benchmarks" / "device_wheels.sh").read_text()
    assert all(m.replace("_", "-") in wheels for m in carried)


def test_reflow_core_imports_without_the_orchestration_stack():
    """The torch core installs without prefect, mlflow and s3fs (pyproject: they are the `flows` extra): every
    reflow_core module imports in a process where they cannot be imported."""
    modules = sorted(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for f in (ROOT / "reflow_core").rglob("*.py"))
    code = ("import sys, importlib, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'prefect', 'mlflow', 's3fs', 'prefect_dask', 'dask', 'distributed'}:\n"
            "            raise ImportError(f'{name} is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print('ok', len(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert not any(p in base for p in ("prefect", "mlflow", "s3fs")), base
    flows_extra = " ".join(project["optional-dependencies"]["flows"])
    assert all(p in flows_extra for p in ("prefect", "mlflow", "s3fs")), flows_extra


def test_no_private_name_is_used_across_modules():
    """`_name` is a module's own: no module of reflow_core/ or flows/ imports one from another module of ours or reads
    one as `module._name` (what two modules share is public)."""
    ours = ("reflow_core", "flows", ".")
    bad = []
    for f in [*(ROOT / "reflow_core").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        tree = ast.parse(f.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(ours)):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{f.relative_to(ROOT)}:{node.lineno} imports {a.name}")
                    modules.add(a.asname or a.name)  # a name or a submodule: attribute reads below are checked
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith(ours[:2]))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{f.relative_to(ROOT)}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not bad, bad
