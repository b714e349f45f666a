"""Nothing of ours shadows an installed package.

Our four layers sit at the repository root (`kernels/`, `model/`, ...) and install as `tpserve.*`;
Hugging Face's package `kernels`, which transformers imports, shares a name with one of them. So
no command of ours may put the root on sys.path, and no module in a folder our commands do put on
it may take an installed package's name.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from pathlib import Path

def test_probe():
    import transformers.activations  # imports Hugging Face's `kernels` (transformers >= 5.25)

    root = Path({root!r})
    on_path = [entry for entry in sys.path if Path(entry or ".").resolve() == root]
    assert not on_path, f"the repository root is on sys.path: {{sys.path}}"
"""


def path_folders() -> list[Path]:
    """Folders our commands put on sys.path: benchmarks/ (scripts run as `python benchmarks/x.py`),
    and tests/ with every folder below it (conftest.py adds tests/ for helpers.py; pytest puts each
    test module's folder first; fixture scripts run from theirs)."""
    tests = ROOT / "tests"
    return [ROOT / "benchmarks", tests, *sorted(p for p in tests.rglob("*") if p.is_dir() and p.name != "__pycache__")]


def our_files() -> set[Path]:
    """Tracked files and untracked ones git does not ignore: ignored build output is never ours."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    return {ROOT / line for line in listed.splitlines()}


def importable(folder: Path, files: set[Path]) -> dict[str, Path]:
    """Regular modules and packages a folder on sys.path makes importable, by name. A folder without
    __init__.py would only be a namespace package, which any installed package of its name outranks."""
    names = {}
    for child in sorted(folder.iterdir()):
        if child.suffix == ".py" and child.stem != "__init__" and child in files:
            names[child.stem] = child
        elif child.is_dir() and child / "__init__.py" in files:
            names[child.name] = child
    return names


def test_no_module_of_ours_has_an_installed_distributions_name():
    installed = importlib.metadata.packages_distributions()
    files = our_files()
    clashes = [
        f"{path.relative_to(ROOT)} shadows the module {name!r} of {', '.join(installed[name])}"
        for folder in path_folders()
        for name, path in importable(folder, files).items()
        if name in installed
    ]
    assert not clashes, "rename them:\n" + "\n".join(clashes)


def test_the_makefile_test_command_imports_transformers_activations_from_the_root(tmp_path):
    # The test recipe's command as make would run it for this venv, up to the word `pytest`.
    dry = subprocess.run(["make", "-n", "-s", "test", f"VENV={sys.prefix}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    words = shlex.split(next(line for line in dry.splitlines() if "pytest" in line))
    command = words[: next(i for i, word in enumerate(words) if Path(word).name == "pytest") + 1]
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE.format(root=str(ROOT)))
    run = subprocess.run(["sh", "-c", shlex.join(command) + " -q -p no:cacheprovider " + shlex.quote(str(probe))],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{shlex.join(command)} from {ROOT}:\n{run.stdout}\n{run.stderr}"
