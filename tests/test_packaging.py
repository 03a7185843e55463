"""The install routes stay equivalent (pyproject.toml is the one dependency list), and CI runs the
README's test command as written."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"simpleitk": "simpleitk", "matplotlib": "matplotlib-base", "snakemake": "snakemake-minimal"}
# oneDNN's PyPI wheels are versioned by oneAPI release (2023.2 = oneDNN 3.2); conda-forge's
# single "onednn" package carries both the library and the headers.
CONDA_SPECS = {"onednn-cpu-gomp": "onednn>=3.2", "onednn-devel-cpu-gomp": "onednn>=3.2"}


def _name_and_bound(req: str) -> tuple[str, str]:
    """``"numpy>=1.26"`` or ``"onednn-cpu-gomp>=2023.2; platform_system == ..."`` -> (name, ">=bound")."""
    name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)(>=[0-9.]+)(?:; .*)?", req).groups()
    return name.lower(), bound


def _requirements(extras: tuple[str, ...] = ("test",)) -> dict[str, str]:
    """pyproject.toml's dependencies (and ``extras``): {PyPI name: ">=lower bound"}."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    return dict(_name_and_bound(req) for req in reqs)


def _expected_conda(extras: tuple[str, ...]) -> set[str]:
    """What a conda environment must list for pyproject.toml's dependencies (and ``extras``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = {f"python{project['requires-python']}"}
    for name, bound in _requirements(extras).items():
        specs.add(CONDA_SPECS.get(name, CONDA_NAMES.get(name, name) + bound))
    return specs


def _conda_specs(path: Path) -> set[str]:
    """Every package spec of a conda environment file, conda's and pip's alike (not pip itself or -e)."""
    deps = yaml.safe_load(path.read_text())["dependencies"]
    entries = [d for d in deps if isinstance(d, str)]
    entries += next(d["pip"] for d in deps if isinstance(d, dict))
    return {e.split("#")[0].strip() for e in entries if e != "pip" and not e.startswith("-e ")}


# pyproject.toml is the one dependency list; each conda file names exactly its packages (under
# their conda names) with the same lower bounds: environment.yml with the test and slurm extras
# (a development environment), the rules' environments without extras.
@pytest.mark.parametrize(
    ("path", "extras"),
    [
        ("environment.yml", ("test", "slurm")),
        ("workflow/envs/diffseg.yaml", ()),
        ("workflow/envs/diffseg-cuda.yaml", ()),
        ("workflow/envs/diffseg-tpu.yaml", ()),
    ],
)
def test_conda_environments_match_pyproject(path, extras):
    found, expected = _conda_specs(ROOT / path), _expected_conda(extras)
    assert found == expected, (
        f"{path} disagrees with pyproject.toml: missing {sorted(expected - found)}, "
        f"extra or differently bounded {sorted(found - expected)}"
    )


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and "pip install" in line)
    assert command.strip() in readme
    assert "snakemake --cores all results/table2.csv" in readme


@pytest.mark.parametrize(
    ("extra", "env_file"), [("cuda12", "diffseg-cuda.yaml"), ("tpu", "diffseg-tpu.yaml")]
)
def test_the_accelerator_extras_are_jaxs_own_and_their_rule_envs_differ_only_by_them(extra, env_file):
    """``pip install -e ".[cuda12]"`` / ``".[tpu]"`` take jax's own extra, which pins the CUDA plugin
    (libtpu) to the installed jax's version; the rules' CUDA (TPU) environment is the CPU one plus
    that extra."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras[extra] == [f"jax[{extra}]>=0.4.30"]
    envs = ROOT / "workflow" / "envs"
    cpu = yaml.safe_load((envs / "diffseg.yaml").read_text())
    accel = yaml.safe_load((envs / env_file).read_text())
    pip = lambda env: next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))  # noqa: E731
    assert [d for d in cpu["dependencies"] if isinstance(d, str)] == [
        d for d in accel["dependencies"] if isinstance(d, str)
    ]
    assert pip(accel) == [line.replace("-e ../..", f"-e ../..[{extra}]") for line in pip(cpu)]


def test_no_function_in_the_library_is_over_80_lines():
    """Long functions hide what they compute: the library keeps each under 80 lines (docstring included)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "diffseg"
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if function and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
    assert not long, long
