"""deploy/Dockerfile, checked without a container engine (none runs here or in CI): its
stages, user and paths, and its build step run for real - the package built from exactly the
paths it copies, stamped with the commit passed as a build argument."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from tests.harness import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copies() -> list[list[str]]:
    return [shlex.split(rest) for word, rest in instructions() if word == "COPY"]


def test_multi_stage_non_root_with_the_charts_user_and_paths() -> None:
    ins = instructions()
    stages = [rest for word, rest in ins if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build") and stages[1].endswith(
        "AS runtime")
    runtime = ins[[i for i, (w, _) in enumerate(ins) if w == "FROM"][1]:]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users == ["10001:10001"]
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "apirouter" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert "COPY --from=build /opt/apirouter /opt/apirouter" in DOCKERFILE.read_text()
    assert "APIROUTER_RUN_DIR=/run/apirouter" in DOCKERFILE.read_text()
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignore)


def test_every_copied_path_exists_and_the_entrypoint_is_the_cli() -> None:
    for args in copies():
        if args[0].startswith("--from="):
            continue
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = cfg["options.packages.find"]["include"].split()
    copied = {Path(a).name for args in copies() for a in args[:-1]}
    assert {p for p in packages if "." not in p} <= copied, "a package is not copied"
    entry = dict(
        line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].split("\n")
        if line)
    ins = instructions()
    assert json.loads(next(r for w, r in ins if w == "ENTRYPOINT")) == ["apirouter"]
    assert "apirouter" in entry
    cmd = json.loads(next(r for w, r in ins if w == "CMD"))
    helped = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--help"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    for flag in (a for a in cmd if a.startswith("--")):
        assert flag in helped.stdout, flag
    example = next(args for args in copies() if args[-1] == "/etc/apirouter/router.yaml")
    assert (ROOT / example[0]).is_file()


def test_the_build_stage_stamps_commit_and_time_into_the_package(tmp_path: Path) -> None:
    """What `pip install .` in the build stage does, on exactly the files it copies."""
    src = tmp_path / "src"
    for args in copies():
        if args[0].startswith("--from=") or args[-1].startswith("/"):
            continue
        dest = src / args[-1]
        for item in args[:-1]:  # COPY semantics: a directory's contents go to dest
            if (ROOT / item).is_dir():
                shutil.copytree(ROOT / item, dest,  # what the .dockerignore keeps out
                                ignore=shutil.ignore_patterns("__pycache__", "_build_info.json",
                                                              "*.so"))
            else:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / item, dest / Path(item).name)
    env = {**os.environ, "APIROUTER_GIT_COMMIT": "0123abcd" * 5,
           "SOURCE_DATE_EPOCH": "1700000000"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src),
                           "-w", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("apirouter-*.whl")
    with zipfile.ZipFile(wheel) as z:
        stamp = json.loads(z.read("apirouter/_build_info.json"))
        assert "apirouter/buildinfo.py" in z.namelist()
        # the C cores (setup.py C_CORES), compiled in the build stage (which installs gcc for it)
        for core in ("_bucketcore", "_ringcore", "_ssecore", "_httpcore", "_wholecore",
                     "_usagecore"):
            assert any(n.startswith(f"apirouter/{core}.") and n.endswith(".so")
                       for n in z.namelist())
    build_stage = DOCKERFILE.read_text().split(" AS runtime")[0]
    assert "gcc" in build_stage and "libc6-dev" in build_stage
    assert stamp == {"git_commit": "0123abcd" * 5, "build_time": "2023-11-14T22:13:20Z"}
