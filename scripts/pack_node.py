"""Build the node pack's registry archive as ``comfy node pack`` would, check what is in it, and scan it.

    python scripts/pack_node.py                      # -> dist/node.zip, then the checks; exit 1 on any finding
    python scripts/pack_node.py --out /tmp/node.zip
    python scripts/pack_node.py --list               # the file list only (nothing written)
    python scripts/pack_node.py --fill-urls https://github.com/OWNER/REPO --ref SHA
        # what the publish workflow runs first: pyproject.toml gets this repository's addresses ([project.urls]
        # and the [tool.comfy] Icon, where not set); it is rewritten in place, on the CI runner only

What goes in is comfy-cli's rule (``comfy node pack`` and ``comfy node publish`` share it): the git-tracked
files (``git ls-files``: so .gitignore'd and untracked files never ship), minus the paths ``.comfyignore``
matches (gitignore patterns; as in the ``pathspec`` library comfy-cli uses, every pattern is tried against the
file's path and the last one that matches decides, ``!`` re-including), plus every path listed in
``[tool.comfy] includes``, which wins over ``.comfyignore``. Without git, comfy-cli archives the whole tree minus
``.comfyignore``; this script also leaves out what ``.gitignore`` ignores there (caches, venvs): stricter, never
looser. Entries sit at the archive's root, as comfy-cli writes them; dates are fixed, so the same tree gives the
same bytes.

The checks (``check_archive``), on the files as packed:
- contents: the entry points, every module of the packages pyproject.toml lists, every package-data file
  (assets, workflows, web), LICENSE, README and the requirements; no tests, benches, fixtures, CI, scripts,
  shell scripts or pickle files; every import of the package resolves inside the archive; the versions in
  pyproject.toml and ``__init__.py`` agree and are X.Y.Z; [tool.comfy] has its keys.
- Python, by syntax tree (comments, strings and docstrings never match): ``eval`` / ``exec`` / ``compile`` /
  ``__import__`` (the registry's checks are ruff S307 and S102), statements joined by ``;`` (ruff E702),
  process spawning (``subprocess``, ``os.system`` …: the way a pack runs pip), network modules (``urllib.request``,
  ``requests``, ``socket``, ``huggingface_hub`` …), hub downloads (``torch.hub.load…``,
  ``from_pretrained("org/name")``),
  pickle loading (``pickle``, ``torch.load``) and URLs in code.
- JavaScript (``web/``): ``eval(``, ``new Function(``, absolute URLs.
- requirements.txt: plain package requirements only (no URLs, indexes, ``-e`` or local paths).

A finding is reported, never silently excluded: the fix is in the code or in ``.comfyignore``, deliberately.
Standard library only, no network.
"""
from __future__ import annotations

import argparse
import ast
import io
import os
import re
import subprocess
import sys
import tokenize
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport, when installed
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent
ARCHIVE_NAME = "node.zip"  # comfy-cli's name for it
ICON = "docs/images/icon.png"  # [tool.comfy] Icon (256², square as the registry asks)
FIXED_DATE = (1980, 1, 1, 0, 0, 0)

#: Left out of every archive (besides .comfyignore): they are not the pack, and a scan would flag some of them.
FORBIDDEN_DIRS = ("tests", "bench", "scripts", ".ci", ".github")
FORBIDDEN_PARTS = ("fixtures", "__pycache__")
SHELL_SUFFIXES = (".sh", ".bash", ".bat", ".cmd", ".ps1")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")  # as weights/safefile.py refuses
ROOT_FILES = ("__init__.py", "__main__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md", "NODES.md")
#: Top-level modules of the test and bench helpers: the package must not need them.
DEV_MODULES = {"tests", "bench", "scripts", "conftest", "tiny_models", "comfy_harness", "weight_samples",
               "weight_fuzz"}

BUILTIN_CALLS = {"eval": "S307 eval()", "exec": "S102 exec()", "compile": "compile() of source",
                 "__import__": "__import__()"}
PROCESS = ("subprocess", "pty", "os.system", "os.popen", "os.startfile", "os.execl", "os.execle", "os.execlp",
           "os.execlpe", "os.execv", "os.execve", "os.execvp", "os.execvpe", "os.spawnl", "os.spawnle",
           "os.spawnlp", "os.spawnlpe", "os.spawnv", "os.spawnve", "os.spawnvp", "os.spawnvpe", "os.posix_spawn",
           "os.posix_spawnp", "pip", "ensurepip")
NETWORK = ("socket", "urllib.request", "urllib3", "http.client", "requests", "httpx", "aiohttp.client",
           "aiohttp.ClientSession", "ftplib", "smtplib", "telnetlib", "xmlrpc.client", "webbrowser",
           "huggingface_hub", "torch.hub.load", "torch.hub.download_url_to_file", "torch.hub.load_state_dict_from_url",
           "urlretrieve", "urlopen")
PICKLE = ("pickle", "cPickle", "marshal", "dill", "shelve", "joblib.load", "torch.load")
URL = re.compile(r"\b(?:https?|ftp)://", re.I)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.text}"


# ------------------------------------------------------------------------------------------ gitignore patterns
class IgnoreRule:
    """One gitignore line (gitwildmatch): ``*`` ``?`` ``[..]`` within a path part, ``**`` across parts, a
    trailing ``/`` for folders only, a ``/`` at the start or in the middle anchors it at the root, ``!`` negates.
    A pattern that matches a folder matches everything under it."""

    def __init__(self, line: str):
        self.source = line
        pat = line.rstrip("\n")
        pat = re.sub(r"(?<!\\)\s+$", "", pat)
        self.negate = pat.startswith("!")
        if self.negate:
            pat = pat[1:]
        elif pat.startswith("\\!") or pat.startswith("\\#"):
            pat = pat[1:]
        self.dir_only = pat.endswith("/")
        pat = pat.rstrip("/")
        anchored = "/" in pat
        pat = pat.lstrip("/")
        if pat.startswith("**/"):
            pat, anchored = pat[3:], False
        body = _glob_regex(pat)
        self.regex = re.compile(("^" if anchored else r"^(?:.*/)?") + body + "$", re.S)

    def matches(self, path: str, is_dir: bool = False) -> bool:
        """``path`` (posix, relative) or one of the folders above it matches."""
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub, sub_is_dir = "/".join(parts[:i]), i < len(parts) or is_dir
            if self.dir_only and not sub_is_dir:
                continue
            if self.regex.match(sub):
                return True
        return False


def _glob_regex(pat: str) -> str:
    out, i = [], 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("/**/", i):
            out.append("(?:/|/.*/)")
            i += 4
        elif pat.startswith("/**", i) and i + 3 == len(pat):
            out.append("/.*")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pat.find("]", i + 2 if pat[i + 1:i + 2] in ("!", "^", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                inner = pat[i + 1:j]
                inner = "^" + inner[1:] if inner.startswith("!") else inner
                out.append("[" + inner.replace("\\", "\\\\") + "]")
                i = j + 1
        elif c == "\\" and i + 1 < len(pat):
            out.append(re.escape(pat[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


class IgnoreSpec:
    """The rules of one ignore file; the last matching rule decides (as comfy-cli's ``pathspec`` does)."""

    def __init__(self, lines):
        self.rules = [IgnoreRule(ln) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]

    @classmethod
    def read(cls, path: Path) -> "IgnoreSpec":
        return cls(path.read_text(encoding="utf-8").splitlines() if path.is_file() else [])

    def match(self, path: str, is_dir: bool = False) -> bool:
        hit = False
        for rule in self.rules:
            if rule.matches(path, is_dir):
                hit = not rule.negate
        return hit


# --------------------------------------------------------------------------------------------- file selection
def pyproject(repo: Path = REPO) -> dict:
    return tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))


def _tracked(repo: Path) -> list[str] | None:
    """``git ls-files`` (what comfy-cli starts from), or None where git cannot answer (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    files = [f for f in out.decode("utf-8").split("\0") if f]
    return files or None


def _walk(repo: Path, skip: IgnoreSpec) -> list[str]:
    gitignore = IgnoreSpec.read(repo / ".gitignore")
    out = []
    for root, dirs, files in os.walk(repo):
        rel = Path(root).relative_to(repo).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = sorted(d for d in dirs if d != ".git" and not gitignore.match(rel + d, True)
                         and not skip.match(rel + d, True))
        out += [rel + f for f in sorted(files)]
    return [f for f in out if not gitignore.match(f)]


def select_files(repo: Path = REPO) -> list[str]:
    """The archive's paths (posix, relative to ``repo``), sorted: comfy-cli's rule, see the module docstring."""
    includes = [PurePosixPath(os.path.normpath(i.lstrip("/"))).as_posix()
                for i in pyproject(repo).get("tool", {}).get("comfy", {}).get("includes", [])]
    ignore = IgnoreSpec.read(repo / ".comfyignore")

    def forced(p: str) -> bool:
        return any(p == i or p.startswith(i + "/") for i in includes)

    def skipped(p: str) -> bool:
        return not forced(p) and ignore.match(p)

    tracked = _tracked(repo)
    base = tracked if tracked is not None else _walk(repo, ignore)
    chosen = {p for p in base if not skipped(p) and (repo / p).is_file()}  # a tracked file deleted here: left out
    for inc in includes:  # comfy-cli adds these even when untracked or ignored by .gitignore
        target = repo / inc
        if target.is_file():
            chosen.add(inc)
        elif target.is_dir():
            chosen.update(p.relative_to(repo).as_posix() for p in target.rglob("*")
                          if p.is_file() and not skipped(p.relative_to(repo).as_posix()))
    return sorted(chosen)


def build(out: Path, repo: Path = REPO) -> list[str]:
    """Write the archive to ``out`` (atomically: a temp file beside it, then a rename); returns its paths."""
    files = select_files(repo)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for rel in files:
                src = repo / rel
                info = zipfile.ZipInfo(rel, FIXED_DATE)
                info.external_attr = (0o100755 if os.access(src, os.X_OK) else 0o100644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, src.read_bytes())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return files


# -------------------------------------------------------------------------------------------------- the checks
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _hits(name: str, table) -> bool:
    return any(name == t or name.startswith(t + ".") for t in table)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def scan_python(path: str, source: str) -> list[Finding]:
    """What a registry scan would flag in one Python file (see the module docstring)."""
    out: list[Finding] = []
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        return [Finding(path, e.lineno or 0, "syntax", str(e))]
    lines = source.splitlines()

    def add(node: ast.AST, rule: str):
        ln = getattr(node, "lineno", 0)
        out.append(Finding(path, ln, rule, lines[ln - 1].strip()[:120] if 0 < ln <= len(lines) else ""))

    imported: dict[str, str] = {}  # local name -> dotted origin
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            for a in node.names:
                imported[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
            for a in node.names:
                imported[a.asname or a.name] = f"{node.module}.{a.name}"
        else:
            continue
        for n in names:
            for rule, table in (("process (how a pack runs pip)", PROCESS), ("network", NETWORK),
                                ("pickle loading", PICKLE)):
                if _hits(n, table):
                    add(node, f"{rule}: imports {n}")
                    break
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in BUILTIN_CALLS and node.func.id not in imported:
                add(node, BUILTIN_CALLS[node.func.id])
                continue
            name = _dotted(node.func)
            head, _, rest = name.partition(".")
            full = f"{imported[head]}.{rest}".rstrip(".") if head in imported else name
            for rule, table in (("process (how a pack runs pip)", PROCESS), ("network", NETWORK),
                                ("pickle loading", PICKLE)):
                if full and _hits(full, table):
                    add(node, f"{rule}: calls {full}")
                    break
            else:
                first = node.args[0] if node.args else None
                if name.endswith("from_pretrained") and isinstance(first, ast.Constant) \
                        and isinstance(first.value, str) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", first.value):
                    add(node, f"hub download: from_pretrained({first.value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                and URL.search(node.value):
            add(node, "URL in code")
    depth = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.OP:
                if tok.string in "([{":
                    depth += 1
                elif tok.string in ")]}":
                    depth -= 1
                elif tok.string == ";" and depth == 0:
                    out.append(Finding(path, tok.start[0], "E702 statements joined by ';'", tok.line.strip()[:120]))
    except (tokenize.TokenError, IndentationError) as e:
        out.append(Finding(path, 0, "tokenize", str(e)))
    return sorted(set(out), key=lambda f: (f.line, f.rule))


def scan_javascript(path: str, source: str) -> list[Finding]:
    """eval, new Function and absolute URLs in a frontend file (comment lines included: strict, by line)."""
    out = []
    for i, line in enumerate(source.splitlines(), 1):
        for rule, rx in (("eval() in JavaScript", r"(?<![\w.$])eval\s*\("),
                         ("new Function()", r"\bnew\s+Function\s*\("),
                         ("URL in code", r"(?:https?|ftp)://")):
            if re.search(rx, line):
                out.append(Finding(path, i, rule, line.strip()[:120]))
    return out


def scan_requirements(path: str, source: str) -> list[Finding]:
    out = []
    for i, line in enumerate(source.splitlines(), 1):
        req = line.split("#", 1)[0].strip()
        if req and (req.startswith("-") or "://" in req or " @ " in req or req.startswith((".", "/"))
                    or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[\w,.-]+\])?\s*([<>=!~;].*)?$", req)):
            out.append(Finding(path, i, "requirements: only plain package requirements", req))
    return out


def _module_of(path: str) -> tuple[str, ...]:
    parts = PurePosixPath(path).with_suffix("").parts
    return tuple(parts[:-1]) if parts[-1] == "__init__" else tuple(parts)


def _import_problems(path: str, tree: ast.AST, modules: set[tuple[str, ...]]) -> list[Finding]:
    """Imports of the package (relative, or ``productbg.…``) that the archive cannot satisfy, and imports of
    the test / bench helpers."""
    here = _module_of(path)
    package = here if path.endswith("__init__.py") else here[:-1]
    out = []
    for node in ast.walk(tree):
        targets: list[tuple[tuple[str, ...], list[str]]] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level - 1 > len(package):
                out.append(Finding(path, node.lineno, "import", "relative import above the package root"))
                continue
            base = package[:len(package) - (node.level - 1)]
            targets.append((base + tuple((node.module or "").split(".")) if node.module else base,
                            [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "productbg":
            targets.append((tuple(node.module.split(".")[1:]), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top == "productbg":
                    targets.append((tuple(a.name.split(".")[1:]), []))
                elif top in DEV_MODULES:
                    out.append(Finding(path, node.lineno, "imports a test/bench helper", a.name))
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in DEV_MODULES:
            out.append(Finding(path, node.lineno, "imports a test/bench helper", node.module))
        for mod, names in targets:
            if mod not in modules:
                out.append(Finding(path, node.lineno, "import not in the archive", ".".join(mod) or "(root)"))
    return out


def check_archive(names: list[str], read, repo: Path = REPO) -> list[Finding]:
    """Every problem of an archive whose paths are ``names`` and whose bytes ``read(path)`` gives."""
    meta = pyproject(repo)
    have = set(names)
    out: list[Finding] = []
    # what must be there
    need = set(ROOT_FILES) | set(meta["project"].get("license-files", []))
    tracked = _tracked(repo)
    tree_files = set(tracked) if tracked is not None else set(_walk(repo, IgnoreSpec([])))
    tree_files = {f for f in tree_files if (repo / f).is_file()}
    setuptools = meta.get("tool", {}).get("setuptools", {})
    for pkg in setuptools.get("packages", []):
        folder = pkg.removeprefix("productbg").lstrip(".").replace(".", "/")
        prefix = folder + "/" if folder else ""
        need |= {f for f in tree_files if f.startswith(prefix) and f.endswith(".py") and "/" not in f[len(prefix):]}
    for pattern in setuptools.get("package-data", {}).get("productbg", []):
        top = pattern.split("/", 1)[0]
        need |= {f for f in tree_files if f.startswith(top + "/")}
    out += [Finding(p, 0, "missing from the archive", "needed at run time") for p in sorted(need - have)]
    # what must not be there
    for p in names:
        parts = PurePosixPath(p).parts
        if parts[0] in FORBIDDEN_DIRS and len(parts) > 1:
            out.append(Finding(p, 0, "must not ship", f"{parts[0]}/ is not part of the pack"))
        elif any(x in FORBIDDEN_PARTS for x in parts):
            out.append(Finding(p, 0, "must not ship", "fixtures / caches"))
        if p.lower().endswith(SHELL_SUFFIXES):
            out.append(Finding(p, 0, "must not ship", "shell script"))
        if p.lower().endswith(PICKLE_SUFFIXES):
            out.append(Finding(p, 0, "must not ship", "pickle-format file (can run code when loaded)"))
        if (repo / p).is_symlink():
            out.append(Finding(p, 0, "must not ship", "symlink (the archive would hold its target)"))
    # metadata
    version = meta["project"].get("version", "")
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        out.append(Finding("pyproject.toml", 0, "version", f"{version!r} is not X.Y.Z"))
    init = read("__init__.py").decode("utf-8") if "__init__.py" in have else ""
    m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', init, re.M)
    if not m or m.group(1) != version:
        out.append(Finding("__init__.py", 0, "version", f"__version__ {m and m.group(1)!r} != pyproject {version!r}"))
    comfy = meta.get("tool", {}).get("comfy", {})
    for key in ("PublisherId", "DisplayName", "Icon", "includes"):
        if key not in comfy:
            out.append(Finding("pyproject.toml", 0, "[tool.comfy]", f"no {key}"))
    for inc in comfy.get("includes", []):
        if not (repo / inc.lstrip("/")).exists():
            out.append(Finding("pyproject.toml", 0, "[tool.comfy] includes", f"{inc} does not exist"))
    # the scans
    modules = {_module_of(p) for p in names if p.endswith(".py")}
    for p in names:
        if p.endswith(".py"):
            src = read(p).decode("utf-8")
            out += scan_python(p, src)
            try:
                out += _import_problems(p, ast.parse(src), modules)
            except SyntaxError:
                pass
        elif p.endswith((".js", ".mjs")):
            out += scan_javascript(p, read(p).decode("utf-8"))
        elif PurePosixPath(p).name.startswith("requirements") and p.endswith(".txt"):
            out += scan_requirements(p, read(p).decode("utf-8"))
    return out


def check_zip(archive: Path, repo: Path = REPO) -> list[Finding]:
    with zipfile.ZipFile(archive) as zf:
        return check_archive(zf.namelist(), zf.read, repo)


def publish_metadata_problems(repo: Path = REPO) -> list[str]:
    """What the registry needs filled in before a publish (the workflow fills the addresses: --fill-urls)."""
    meta = pyproject(repo)
    urls, comfy = meta["project"].get("urls", {}), meta.get("tool", {}).get("comfy", {})
    out = [f"[project.urls] {k} is empty" for k in ("Repository",) if not urls.get(k)]
    out += [f"[tool.comfy] {k} is empty" for k in ("PublisherId", "DisplayName", "Icon") if not comfy.get(k)]
    return out


def fill_urls(text: str, repo_url: str, ref: str) -> str:
    """pyproject.toml's text with the hosting repository's addresses (``https://github.com/OWNER/REPO``; the icon
    at commit ``ref``): a ``[project.urls]`` table (Repository, Documentation, Issues) added where there is none,
    empty values in it and an empty ``[tool.comfy] Icon`` filled. Values already set are kept."""
    repo_url = repo_url.rstrip("/")
    urls = {"Repository": repo_url, "Documentation": f"{repo_url}/blob/{ref}/README.md", "Issues": f"{repo_url}/issues"}
    if not re.search(r"^\[project\.urls\]", text, re.M):
        table = "[project.urls]\n" + "".join(f'{k} = "{v}"\n' for k, v in urls.items()) + "\n"
        at = re.search(r"^\[tool\.comfy\]", text, re.M)
        text = text[:at.start()] + table + text[at.start():] if at else text.rstrip("\n") + "\n\n" + table
    values = {**urls, "Icon": f"{repo_url}/raw/{ref}/{ICON}"}
    for key, value in values.items():
        text = re.sub(rf'^({key}\s*=\s*)""', lambda m, v=value: f'{m.group(1)}"{v}"', text, flags=re.M)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "dist" / ARCHIVE_NAME, help="archive (default dist/node.zip)")
    ap.add_argument("--list", action="store_true", help="print the archive's files; write nothing")
    ap.add_argument("--fill-urls", metavar="REPO_URL", help="fill pyproject.toml's empty addresses from this repo")
    ap.add_argument("--ref", default="main", help="commit or branch the icon address points at (--fill-urls)")
    ap.add_argument("--for-publish", action="store_true", help="also require the publish metadata to be filled in")
    args = ap.parse_args(argv)
    if args.fill_urls:
        path = REPO / "pyproject.toml"
        path.write_text(fill_urls(path.read_text(encoding="utf-8"), args.fill_urls, args.ref), encoding="utf-8")
        print(f"pyproject.toml: addresses filled from {args.fill_urls} at {args.ref}")
        return 0
    if args.list:
        print("\n".join(select_files()))
        return 0
    files = build(args.out)
    findings = check_zip(args.out)
    problems = publish_metadata_problems() if args.for_publish else []
    size = args.out.stat().st_size
    print(f"{args.out}: {len(files)} files, {size / 2**20:.1f} MiB")
    for f in findings:
        print(f"  {f}")
    for p in problems:
        print(f"  pyproject.toml: {p}")
    print(f"{len(findings) + len(problems)} findings")
    return 1 if findings or problems else 0


if __name__ == "__main__":
    sys.exit(main())
