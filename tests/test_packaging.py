"""The two install routes stay equivalent, and CI runs the README's test command as written."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"simpleitk": "simpleitk", "matplotlib": "matplotlib-base", "snakemake": "snakemake-minimal"}
# oneDNN's PyPI wheels are versioned by oneAPI release (2023.2 = oneDNN 3.2); conda-forge's
# single "onednn" package carries both the library and the headers.
CONDA_SPECS = {"onednn-cpu-gomp": "onednn>=3.2", "onednn-devel-cpu-gomp": "onednn>=3.2"}


def _requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["test"]
    out = {}
    for req in reqs:
        name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)(>=[0-9.]+)(?:; .*)?", req).groups()
        out[name.lower()] = bound
    return out


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    entries = [d for d in env["dependencies"] if isinstance(d, str)]
    entries += next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    for name, bound in _requirements().items():
        spec = CONDA_SPECS.get(name, CONDA_NAMES.get(name, name) + bound)
        assert spec in entries, f"environment.yml lacks {spec}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and "pip install" in line)
    assert command.strip() in readme
    assert "snakemake --cores all results/table2.csv" in readme


def test_the_cuda_extra_is_jaxs_own_and_the_cuda_rule_env_differs_only_by_it():
    """``pip install -e ".[cuda12]"`` takes jax's ``cuda12`` extra, which pins the CUDA plugin to the
    installed jax's version; the rules' CUDA environment is the CPU one plus that extra."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cuda12"] == ["jax[cuda12]>=0.4.30"]
    envs = ROOT / "workflow" / "envs"
    cpu = yaml.safe_load((envs / "diffseg.yaml").read_text())
    cuda = yaml.safe_load((envs / "diffseg-cuda.yaml").read_text())
    pip = lambda env: next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))  # noqa: E731
    assert [d for d in cpu["dependencies"] if isinstance(d, str)] == [
        d for d in cuda["dependencies"] if isinstance(d, str)
    ]
    assert pip(cuda) == [line.replace("-e ../..", "-e ../..[cuda12]") for line in pip(cpu)]
