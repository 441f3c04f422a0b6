"""The registry archive: built as ``comfy node pack`` builds it (scripts/pack_node.py), it holds what the pack
needs at run time and nothing a user does not need or a registry scan would flag; pyproject.toml carries the
registry's metadata; the publish workflow stays inert without its token. No ComfyUI, no network."""
import ast
import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("pack_node", REPO / "scripts" / "pack_node.py")
pack_node = importlib.util.module_from_spec(_spec)
sys.modules["pack_node"] = pack_node  # dataclasses look their module up
_spec.loader.exec_module(pack_node)

SCAN_RULES = ("S307", "S102", "compile()", "__import__", "E702", "process", "network", "pickle", "hub download",
              "URL", "eval()", "new Function", "requirements", "syntax", "tokenize")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "node.zip"
    files = pack_node.build(out)
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert sorted(names) == files
        yield out, names, {n: zf.read(n) for n in names}


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the archive is git's file list")
    return [f for f in out.splitlines() if (REPO / f).is_file()]


def test_the_archive_holds_what_the_pack_runs_on(archive):
    _, names, _ = archive
    have = set(names)
    for must in ("__init__.py", "__main__.py", "LICENSE", "README.md", "NODES.md", "requirements.txt",
                 "pyproject.toml", "assets/clip_tokenizer/LICENSE", "web/productbg.js", pack_node.ICON):
        assert must in have, must
    for folder in ("nodes", "backbones", "weights", "attention", "imaging", "pipeline", "training", "cli", "fileio"):
        assert f"{folder}/__init__.py" in have, folder
    tracked = _tracked()
    # every module of the package and every run-time asset (model configs, tokenizer, demo model, categories),
    # workflow (UI and API format, thumbnails, inputs) and frontend file that git tracks
    for f in tracked:
        top = f.split("/")[0]
        if f.endswith(".py") and top not in pack_node.FORBIDDEN_DIRS or top in ("assets", "workflows", "web"):
            assert f in have, f
    assert any(n.startswith("assets/demo_model/") and n.endswith(".safetensors") for n in names)
    assert {n for n in names if n.startswith("workflows/") and n.endswith(".json")} \
        >= {f for f in tracked if f.startswith("workflows/") and f.endswith(".json")}


def test_the_archive_leaves_out_tests_benches_ci_and_scripts(archive):
    _, names, _ = archive
    for n in names:
        parts = n.split("/")
        assert parts[0] not in ("tests", "bench", ".ci", ".github", "scripts"), n
        assert "fixtures" not in parts and "__pycache__" not in parts, n
        assert not n.endswith((".sh", ".bat", ".ps1", ".pyc")), n
        assert not n.lower().endswith(pack_node.PICKLE_SUFFIXES), n
    # what setup runs to install things: none of it ships
    for script in ("scripts/setup_env.sh", "scripts/fetch_comfyui.py", "scripts/test.sh", "scripts/demo.sh",
                   "scripts/setup_browser.sh", ".ci/run"):
        assert script not in names
    # nor anything git does not track (caches, venvs, build output)
    tracked = set(_tracked())
    assert set(names) <= tracked


def test_no_packed_file_does_what_a_registry_scan_flags(archive):
    """eval / exec / compile, ';'-joined statements (the registry's ruff rules S307, S102, E702), pip or any
    process, network modules and downloads, pickle loading, URLs — in every packed Python and JavaScript file and
    the requirements. A hit is a finding to fix in the code, never a file to leave out quietly."""
    out, _, _ = archive
    findings = [f for f in pack_node.check_zip(out) if f.rule.startswith(SCAN_RULES)]
    assert not findings, "\n".join(map(str, findings))


def test_the_archive_is_complete_and_self_contained(archive):
    """Everything pack_node's check asks: nothing needed missing, nothing forbidden, every import of the package
    resolves inside the archive (a module that is not tracked by git would be missing from it), versions agree."""
    out, _, _ = archive
    findings = pack_node.check_zip(out)
    assert not findings, "\n".join(map(str, findings))


def test_the_scanner_finds_what_it_looks_for():
    bad = '''
import subprocess, pickle
import urllib.request as ur
from os import system
import requests
from torch import hub
x = eval("1+1")
exec("y = 2")
subprocess.check_call([sys.executable, "-m", "pip", "install", "x"])
system("pip install x")
ur.urlopen(u)
requests.get(u)
hub.load("a/b", "m")
torch.load(path)
CLIPTextModel.from_pretrained("openai/clip-vit-large-patch14")
a = 1; b = 2
u = "https://example.org/weights.bin"
'''
    rules = [f.rule for f in pack_node.scan_python("bad.py", bad)]
    for want in ("imports subprocess", "imports pickle", "imports urllib.request", "imports os.system",
                 "imports requests", "S307", "S102", "calls subprocess.check_call", "calls os.system",
                 "calls urllib.request.urlopen", "calls requests.get", "calls torch.hub.load", "calls torch.load",
                 "hub download", "E702", "URL in code"):
        assert any(want in r for r in rules), (want, rules)
    good = '''"""Docstrings may say eval(x), exec(y), https://example.org and subprocess; comments too."""
import re
import torch
model.eval()  # exec(...) in a comment
pattern = re.compile(r"a;b")
text = "pip install 'productbg[upscale]'; nothing runs it"
folder = torch.hub.get_dir()
pipe = Pipeline.from_pretrained(root / "unet", local_files_only=True)
vae = AutoencoderKL.from_pretrained("./vae")
def f():
    """exec() here is text."""
    return {"a": 1}; 
'''
    assert [f.rule for f in pack_node.scan_python("good.py", good)] == ["E702 statements joined by ';'"]
    assert [f.rule for f in pack_node.scan_python("good.py", good.replace("}; ", "}"))] == []
    js = 'const r = await api.fetchApi(`/productbg/banks`);\nconst f = new Function("x");\neval(s);\n' \
         'fetch("https://example.org/x");\nobj.eval(1);\n'
    assert [f.rule for f in pack_node.scan_javascript("w.js", js)] == ["new Function()", "eval() in JavaScript",
                                                                        "URL in code"]
    reqs = "torch>=2.1\nnumpy  # plain\nspandrel[extra]>=0.3\n--extra-index-url http://x\ngit+https://x/y\n-e .\n"
    assert [f.line for f in pack_node.scan_requirements("requirements.txt", reqs)] == [4, 5, 6]


@pytest.mark.parametrize("pattern, path, hit", [
    ("/tests/", "tests/test_x.py", True),
    ("/tests/", "sub/tests/x.py", False),        # anchored at the root
    ("/tests/", "tests", False),                 # folders only: a file called tests stays
    ("fixtures/", "tests/fixtures/a.safetensors", True),
    ("fixtures/", "a/fixtures", False),
    ("*.pt", "deep/er/model.pt", True),
    ("*.pt", "model.pth", False),
    ("docs/**/*.png", "docs/images/a.png", True),
    ("docs/**/*.png", "docs/a.png", True),       # ** matches no folder too
    ("**/api/*.json", "workflows/api/x.json", True),
    ("w?rkflows/inputs", "workflows/inputs/a.png", True),
    ("[ab]*/", "assets/x", True),
    ("[!ab]*/", "assets/x", False),
    ("/*/", "LICENSE", False),
])
def test_comfyignore_patterns_match_as_pathspec_does(pattern, path, hit):
    """The cases were checked against the ``pathspec`` library comfy-cli uses (1,740 path × pattern-set pairs,
    this repo's files included, agreed)."""
    assert pack_node.IgnoreSpec([pattern]).match(path) is hit


def test_last_matching_pattern_decides():
    spec = pack_node.IgnoreSpec(["*.md", "!README.md", "# a comment", ""])
    assert spec.match("NODES.md") and not spec.match("README.md") and not spec.match("x.py")


def _git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def _toy_repo(root: Path, includes: str) -> None:
    for rel in ("__init__.py", "nodes/a.py", "tests/test_a.py", "assets/x.json", "local/secret.env", "big/w.bin",
                "cache/c.txt", "extra/untracked.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / ".gitignore").write_text("/local/\n/cache/\n/extra/\n")
    (root / ".comfyignore").write_text("/tests/\n*.bin\n")
    (root / "pyproject.toml").write_text(f'[project]\nname = "t"\nversion = "1.0.0"\n\n[tool.comfy]\n'
                                         f'includes = [{includes}]\n')


def test_selection_follows_comfy_cli_in_a_git_checkout(tmp_path):
    """git-tracked files minus .comfyignore, plus [tool.comfy] includes (even untracked or .comfyignore'd)."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    _toy_repo(tmp_path, '"extra", "big/w.bin"')
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    (tmp_path / "nodes" / "new_untracked.py").write_text("")
    assert pack_node.select_files(tmp_path) == [".comfyignore", ".gitignore", "__init__.py", "assets/x.json",
                                                "big/w.bin", "extra/untracked.txt", "nodes/a.py", "pyproject.toml"]


def test_selection_without_git_walks_the_tree_minus_both_ignore_files(tmp_path):
    """comfy-cli would also sweep in .gitignore'd files (local secrets, caches) here; the script does not."""
    _toy_repo(tmp_path, "")
    assert pack_node.select_files(tmp_path) == [".comfyignore", ".gitignore", "__init__.py", "assets/x.json",
                                                "nodes/a.py", "pyproject.toml"]


def test_pyproject_meets_the_registry_specification():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = meta["project"], meta["tool"]["comfy"]
    name = project["name"]
    # < 100 characters; letters, digits, '-', '_', '.'; no two specials in a row; starts with a letter
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name)
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    init = (REPO / "__init__.py").read_text(encoding="utf-8")
    assert re.search(rf'^__version__ = "{re.escape(project["version"])}"$', init, re.M), "bump both versions"
    assert project["license"] == "GPL-3.0-or-later" and "LICENSE" in project["license-files"]
    assert project["description"].strip()
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    assert isinstance(comfy["includes"], list) and all((REPO / i.lstrip("/")).exists() for i in comfy["includes"])
    assert (REPO / pack_node.ICON).is_file()


def test_the_publish_workflow_fills_in_the_addresses(tmp_path):
    """The committed pyproject.toml names no address (none is known here); the workflow's --fill-urls adds them
    from the repository it runs in, setuptools accepts the result, and the publish check then passes."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    filled = pack_node.fill_urls(text, "https://github.com/someone/productbg/", "0123abc")
    meta = tomllib.loads(filled)
    assert meta["project"]["urls"] == {"Repository": "https://github.com/someone/productbg",
                                       "Documentation": "https://github.com/someone/productbg/blob/0123abc/README.md",
                                       "Issues": "https://github.com/someone/productbg/issues"}
    assert meta["tool"]["comfy"]["Icon"] == f"https://github.com/someone/productbg/raw/0123abc/{pack_node.ICON}"
    unchanged = copy.deepcopy(meta)  # nothing else changed
    del unchanged["project"]["urls"]
    unchanged["tool"]["comfy"]["Icon"] = ""
    assert unchanged == tomllib.loads(text)
    assert pack_node.fill_urls(filled, "https://github.com/other/x", "ffff") == filled  # set values are kept
    (tmp_path / "pyproject.toml").write_text(filled)
    assert pack_node.publish_metadata_problems(tmp_path) == []
    (tmp_path / "pyproject.toml").write_text(text)
    assert "[project.urls] Repository is empty" in pack_node.publish_metadata_problems(tmp_path)
    validate = pytest.importorskip("setuptools.config.pyprojecttoml").validate
    validate(meta, str(tmp_path / "pyproject.toml"))


def test_the_publish_workflow_is_inert_without_its_token():
    wf = (REPO / ".github" / "workflows" / "publish.yml").read_text(encoding="utf-8")
    assert re.search(r"uses: Comfy-Org/publish-node-action@[0-9a-f]{40}\b", wf), "pin the action to a commit"
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in wf
    assert "REGISTRY_ACCESS_TOKEN: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in wf
    publish = wf[wf.index("- name: Publish\n"):]
    assert re.search(r"if: .*env\.REGISTRY_ACCESS_TOKEN != ''", publish.splitlines()[1])
    assert "skip_checkout" in publish
    assert "scripts/pack_node.py --for-publish" in wf and "scripts/pack_node.py --fill-urls" in wf
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(wf)
    on = doc.get("on", doc.get(True))
    assert on["push"]["paths"] == ["pyproject.toml"] and "workflow_dispatch" in on
    steps = doc["jobs"]["publish"]["steps"]
    gated = [s for s in steps if "REGISTRY_ACCESS_TOKEN" in str(s.get("if", ""))]
    assert [s["name"] for s in gated] == ["No REGISTRY_ACCESS_TOKEN secret, so no upload", "Publish"]
    assert all("steps.version.outputs.changed == 'true'" in s["if"] for s in steps if "if" in s)
    # the version step compares with the commit before the push, and the action does not check out again
    assert "git show \"$BEFORE:pyproject.toml\"" in steps[2]["run"]
    assert str(steps[-1]["with"]["skip_checkout"]) == "true"


def test_the_script_is_standard_library_only():
    tree = ast.parse((REPO / "scripts" / "pack_node.py").read_text(encoding="utf-8"))
    tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert tops <= set(sys.stdlib_module_names) | {"tomli"}, tops
