"""No user-caused condition ends as exit 70 ("internal error"): a missing extra, an OS error on a
user path and a closed pipe each get their documented exit code and one line naming the fix.

Missing modules are simulated in a subprocess by a meta-path finder that refuses them, so the
real packages stay installed for every other test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import DIFFGENTOR, REPO_ROOT, base_env, write_png

# Runs `api_client.cli.main(argv)` with the modules named in BLOCKED missing, as if never installed.
RUNNER = textwrap.dedent("""
    import importlib.abc, json, os, sys

    BLOCKED = set(json.loads(os.environ["TEST_BLOCKED_MODULES"]))

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Missing())
    from api_client.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@dataclass
class Case:
    args: list[str]
    code: int
    says: list[str]
    env: dict[str, str] = field(default_factory=dict)
    blocked: tuple[str, ...] = ()


def cases(tmp: Path) -> dict[str, Case]:
    a_file = tmp / "a-file"
    deepgen = "install `diffgentor[deepgen]`"
    return {
        "embedded-t2i-without-torch": Case(
            ["t2i", "--prompt", "a cat", "--output_dir", str(tmp / "o")],
            4,
            ["embedded mode runs the model in this process", deepgen, "DG_BROKER_URL"],
            blocked=("torch",),
        ),
        "embedded-edit-without-torch": Case(
            ["edit", "--input", str(tmp / "edit.csv"), "--output_dir", str(tmp / "o")],
            4,
            ["embedded mode runs the model in this process", deepgen],
            blocked=("torch",),
        ),
        "worker-without-torch": Case(
            ["worker", "--model_name", "deepgen"],
            4,
            ["`diffgentor worker` runs the model", deepgen],
            blocked=("torch",),
        ),
        "demo-without-torch": Case(
            ["demo", "--output_dir", str(tmp / "demo")], 4, [deepgen], blocked=("torch",)
        ),
        "tiny-model-without-torch": Case(
            ["tiny-model", str(tmp / "tiny")], 4, ["`diffgentor tiny-model`", deepgen], blocked=("torch",)
        ),
        "postgresql-without-psycopg": Case(
            ["list"],
            4,
            ["DG_DATABASE_URL is a PostgreSQL URL", "install `diffgentor[postgres]`"],
            env={"DG_DATABASE_URL": "postgresql+psycopg://dg:secret@127.0.0.1:1/jobs"},
            blocked=("psycopg",),
        ),
        "output-dir-is-a-file": Case(
            ["t2i", "--prompt", "a cat", "--output_dir", str(a_file)],
            3,
            [f"cannot use --output_dir {a_file}: File exists"],
        ),
        "output-dir-under-a-file": Case(
            ["t2i", "--prompt", "a cat", "--output_dir", str(a_file / "o")],
            3,
            [f"--output_dir {a_file / 'o'}: Not a directory"],
        ),
        "tiny-model-dir-is-a-file": Case(["tiny-model", str(a_file)], 3, [str(a_file)]),
        "dg-home-is-a-file": Case(
            ["list"], 3, [f"{a_file}: File exists", "that is DG_HOME"], env={"DG_HOME": str(a_file)}
        ),
        "dg-home-under-a-file": Case(
            ["list"],
            3,
            [f"{a_file / 'home'}: Not a directory", "DG_HOME"],
            env={"DG_HOME": str(a_file / "home")},
        ),
        "dg-home-cannot-be-created": Case(
            ["list"],
            3,
            ["/proc/diffgentor-home: No such file or directory"],
            env={"DG_HOME": "/proc/diffgentor-home"},
        ),
        "dg-home-not-permitted": Case(
            ["status", "0000"],
            3,
            ["/sys/diffgentor-home", "DG_HOME"],
            env={"DG_HOME": "/sys/diffgentor-home"},
        ),
    }


CASE_IDS = list(cases(Path("/x")))


@pytest.mark.parametrize("name", CASE_IDS)
def test_user_caused_conditions_have_their_exit_code(name: str, tmp_path: Path) -> None:
    case = cases(tmp_path)[name]
    (tmp_path / "a-file").write_text("not a folder")
    write_png(tmp_path / "in.png")
    (tmp_path / "edit.csv").write_text("input_images,instruction\nin.png,make it red\n")
    env = {
        **base_env(tmp_path / "home"),
        **case.env,
        "TEST_BLOCKED_MODULES": json.dumps(case.blocked),
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *case.args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert done.returncode != 70, done.stderr
    assert done.returncode == case.code, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for text in case.says:
        assert text in errors[0]


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`diffgentor list | head -1`: no traceback, no error line, exit 0 or 141 (128 + SIGPIPE)."""
    env = base_env(tmp_path / "home")
    seed = (
        "from api_client import DiffgentorClient\n"
        "client = DiffgentorClient.from_env()\n"
        "client.store.submit([client.t2i_spec(f'prompt {i}') for i in range(1000)])\n"
    )
    subprocess.run([sys.executable, "-c", seed], env=env, check=True, timeout=120, cwd=REPO_ROOT)
    for args in (["list", "--limit", "1000"], ["list", "--limit", "1000", "--json"]):
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", f"'{DIFFGENTOR}' {' '.join(args)} | head -1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode in (0, 141), done.stderr
        assert done.stderr == ""
        assert len(done.stdout.splitlines()) == 1
