import os
import subprocess
import sys

import pytest

import graphopt.pipeline
from graphopt.generate import GenerateSettings, generate
from graphopt.rules import DEFAULT_LIBRARY, load_rules

# every optimisation in the test suite checks the IR after every stage (graphopt.lint)
graphopt.pipeline.LINT_EVERY_STAGE = True

if os.environ.get("PYTEST_XDIST_WORKER"):   # pytest -n 2 on two cores: one torch thread per worker
    import torch
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--search", default=None, choices=("egraph", "backtracking", "hybrid"),
                     help="the search engine of the suite's in-process optimisations (default: graphopt's); "
                          "CLI subprocesses keep theirs")


def pytest_configure(config):
    engine = config.getoption("--search")
    if engine:
        import graphopt.options
        graphopt.options.DEFAULT_SEARCH = engine


@pytest.fixture(scope="session")
def default_library():
    """The shipped library, substitutions/default.json."""
    return load_rules()


@pytest.fixture(scope="session")
def fresh_library():
    """A library generated now from graphs of up to 3 ops (a few seconds)."""
    return generate(GenerateSettings(max_ops=3), workers=2, progress=False)


def run_cli(*args, cwd=None, timeout=300):
    """Run the graphopt CLI in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


__all__ = ["DEFAULT_LIBRARY", "run_cli"]


def calls_to(fast, target) -> list:
    """The kwargs of every call of ``target`` (a torch function) in the optimised graphs of
    ``fast``: the graphs are plain torch, so a fused op is a call of the torch function."""
    return [dict(n.kwargs) for gm in fast.graph_modules for n in gm.graph.nodes
            if n.op == "call_function" and n.target is target]
