"""The documentation: docs/ builds with warnings as errors, every public name has a
Google-style docstring (``Args:``, ``Returns:``, ``Example:``) whose example runs, every
public name is in the API reference, and the docs' Python blocks run.

Public names are those of ``PUBLIC_MODULES``' ``__all__`` lists that holotx defines (type
aliases, re-exported third-party names and constants are documented in the reference pages
but have no signature to check). A name exported by several modules is one object, checked
once.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from holotx.adapters import registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

PUBLIC_MODULES = (
    "holotx",
    "holotx.transforms",
    "holotx.wrappers",
    "holotx.schedules",
    "holotx.flat",
    "holotx.tree",
    "holotx.adapters",
)

BUILD_SECONDS = 60


def public_objects() -> dict[str, object]:
    """``{first public path: object}`` for every public name, modules excluded."""
    found: dict[int, tuple[str, object]] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.ismodule(obj):
                found.setdefault(id(obj), (f"{module_name}.{name}", obj))
    return dict(found.values())


def checked_objects() -> dict[str, object]:
    """The public functions and classes holotx defines: those with a signature to document."""
    return {path: obj for path, obj in public_objects().items()
            if (inspect.isfunction(obj) or inspect.isclass(obj))
            and getattr(obj, "__module__", "").startswith("holotx")}


# --------------------------------------------------------------------------- docstring sections

SECTION = re.compile(r"^(\w[\w ]*):\s*$")


def sections(doc: str) -> dict[str, str]:
    """Google-style sections of a (dedented) docstring: ``{title: body}``, a section being a
    line ``Title:`` at the docstring's left margin followed by indented lines."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        match = SECTION.match(lines[i])
        if match:
            body = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            out[match.group(1)] = "\n".join(body)
        else:
            i += 1
    return out


def documented_args(body: str) -> set[str]:
    """Argument names of an ``Args:`` section: its least indented entries, ``name:`` or
    ``name (type):``, with ``*``/``**`` kept off."""
    entries = [line for line in body.splitlines() if line.strip()]
    if not entries:
        return set()
    indent = min(len(line) - len(line.lstrip()) for line in entries)
    names = set()
    for line in entries:
        if len(line) - len(line.lstrip()) == indent:
            match = re.match(r"\s*\*{0,2}(\w+)\s*(\([^)]*\))?\s*:", line)
            if match:
                names.add(match.group(1))
    return names


def signature_args(obj: object) -> list[str]:
    """The arguments a caller passes: ``self`` left out, ``*args``/``**kwargs`` by name."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [name for name in sig.parameters if name != "self"]


def returns_something(obj: object) -> bool:
    """Whether a function's return annotation is anything but ``None`` (unannotated counts
    as returning)."""
    annotation = inspect.signature(obj).return_annotation
    return annotation not in (None, "None")


def docstring_problems(obj: object) -> list[str]:
    """What the docstring of a public function or class lacks (empty when complete)."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and doc == f"{obj.__name__}({', '.join(getattr(obj, '_fields', ()))})":
        doc = ""  # NamedTuple's generated docstring
    if not doc:
        return ["no docstring"]
    found = sections(doc)
    problems = []
    args = signature_args(obj)
    if args:
        if "Args" not in found:
            problems.append("no Args: section")
        else:
            missing = [a for a in args if a not in documented_args(found["Args"])]
            if missing:
                problems.append(f"Args: does not describe {', '.join(missing)}")
    if inspect.isfunction(obj) and returns_something(obj) and "Returns" not in found:
        problems.append("no Returns: section")
    example = found.get("Example", found.get("Examples"))
    if example is None:
        problems.append("no Example: section")
    elif ">>>" not in example:
        problems.append("the Example: section has no >>> example")
    return problems


def test_there_are_public_names_to_check():
    objects = checked_objects()
    assert len(objects) >= 100, sorted(objects)
    assert "holotx.adamw" in objects
    assert "holotx.adapters.TransformOptimizer" in objects


@pytest.mark.parametrize("path", sorted(checked_objects()))
def test_public_docstring_has_args_returns_and_example(path):
    problems = docstring_problems(checked_objects()[path])
    assert not problems, f"{path}: {'; '.join(problems)}"


def checked_methods() -> dict[str, object]:
    """The public methods of the classes of :func:`checked_objects` that holotx defines,
    inherited ones from a private holotx base included (``Lookahead.step`` is
    ``_SyncWrapper.step``): ``{"class path.method": function}``, each function once."""
    classes = {id(obj): path for path, obj in checked_objects().items() if inspect.isclass(obj)}
    found: dict[int, tuple[str, object]] = {}
    for cls_id, path in classes.items():
        for owner in next(o for o in checked_objects().values() if id(o) == cls_id).__mro__:
            if not getattr(owner, "__module__", "").startswith("holotx"):
                continue
            where = classes.get(id(owner), path)  # a public base names its own methods
            for name, attr in vars(owner).items():
                fn = getattr(attr, "__func__", attr)  # static and class methods
                if not name.startswith("_") and inspect.isfunction(fn):
                    found.setdefault(id(fn), (f"{where}.{name}", fn))
    return dict(found.values())


def test_there_are_public_methods_to_check():
    methods = checked_methods()
    for path in ("holotx.adapters.TransformOptimizer.step",
                 "holotx.adapters.TransformOptimizer.load_state_dict",
                 "holotx.adapters.Lookahead.step", "holotx.flat.FlatLayout.bind"):
        assert path in methods, sorted(methods)


@pytest.mark.parametrize("path", sorted(checked_methods()))
def test_public_method_has_args_returns_and_example(path):
    problems = docstring_problems(checked_methods()[path])
    assert not problems, f"{path}: {'; '.join(problems)}"


@pytest.mark.parametrize("path", sorted(p for p, fn in checked_methods().items()
                                        if not fn.__qualname__.startswith(p.split(".")[-2] + ".")))
def test_inherited_method_examples_run(path, keep_threads):
    """The examples of methods a public class inherits from a private base (which
    :func:`examples_of` does not reach through the class)."""
    (test,) = doctest.DocTestFinder(exclude_empty=True).find(checked_methods()[path], name=path, globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    runner.run(test, clear_globs=True)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0, f"{path}: {results.failed} of {results.attempted} examples failed (above)"


def test_docstring_check_can_fail():
    """The check finds what is missing (so a passing test above means something)."""

    def no_sections(x: int) -> int:
        """Does something."""
        return x

    def args_incomplete(x: int, y: int = 0) -> int:
        """Does something.

        Args:
            x: the first.

        Returns:
            A number.

        Example:
            >>> 1
            1
        """
        return x + y

    def complete(x: int, *rest: int, **options: int) -> None:
        """Does something.

        Args:
            x (int): the first.
            *rest: more.
            **options: keywords.

        Example:
            >>> 1
            1
        """

    assert docstring_problems(no_sections) == [
        "no Args: section", "no Returns: section", "no Example: section"]
    assert docstring_problems(args_incomplete) == ["Args: does not describe y"]
    assert docstring_problems(complete) == []


# --------------------------------------------------------------------------- papers

ADAM, ADAMW, RADAM = "1412.6980", "1711.05101", "1908.03265"
LARS, LAMB, TADAM, ADABELIEF = "1708.03888", "1904.00962", "2003.00179", "2010.07468"
ADAMP, ADAN, ADEMAMIX, LOOKAHEAD = "2006.08217", "2208.06677", "2409.03137", "1907.08610"
HOLOCRON = "https://github.com/frgfm/Holocron"

# Every public name that implements a published algorithm, and the arXiv ids it must link.
PAPERS: dict[str, tuple[str, ...]] = {
    "holotx.adam": (ADAM,), "holotx.adamw": (ADAMW,), "holotx.radam": (RADAM,),
    "holotx.lars": (LARS,), "holotx.lamb": (LAMB,), "holotx.ralars": (RADAM, LAMB),
    "holotx.tadam": (TADAM,), "holotx.adabelief": (ADABELIEF,), "holotx.adamp": (ADAMP,),
    "holotx.adan": (ADAN,), "holotx.ademamix": (ADEMAMIX,), "holotx.lookahead": (LOOKAHEAD,),
    "holotx.scale_by_adam": (ADAM,), "holotx.scale_by_radam": (RADAM,),
    "holotx.scale_by_tadam": (TADAM,), "holotx.scale_by_belief": (ADABELIEF,),
    "holotx.scale_by_adamp": (ADAMP,), "holotx.scale_by_adan": (ADAN,),
    "holotx.scale_by_ademamix": (ADEMAMIX,), "holotx.scale_by_trust_ratio": (LARS, LAMB),
    "holotx.transforms.rectification": (RADAM,), "holotx.transforms.bias_correction": (ADAM,),
    "holotx.transforms.projection_coefficients": (ADAMP,),
    "holotx.transforms.ademamix_warmup": (ADEMAMIX,), "holotx.transforms.trust_ratios": (LARS, LAMB),
    "holotx.adapters.LARS": (LARS,), "holotx.adapters.LAMB": (LAMB,),
    "holotx.adapters.RaLars": (RADAM, LAMB), "holotx.adapters.TAdam": (TADAM,),
    "holotx.adapters.AdaBelief": (ADABELIEF,), "holotx.adapters.AdamP": (ADAMP,),
    "holotx.adapters.Adan": (ADAN,), "holotx.adapters.AdEMAMix": (ADEMAMIX,),
    "holotx.adapters.Lookahead": (LOOKAHEAD,),
}


@pytest.mark.parametrize("path", sorted(PAPERS))
def test_algorithm_links_its_paper(path):
    doc = inspect.getdoc(checked_objects()[path]) or ""
    missing = [f"https://arxiv.org/abs/{arxiv_id}" for arxiv_id in PAPERS[path]
               if f"https://arxiv.org/abs/{arxiv_id}" not in doc]
    assert not missing, f"{path} does not link {missing}"


@pytest.mark.parametrize("path", ["holotx.scout", "holotx.adapters.Scout"])
def test_scout_says_it_is_holocrons_own(path):
    doc = inspect.getdoc(checked_objects()[path]) or ""
    assert HOLOCRON in doc
    assert "no paper" in doc


# --------------------------------------------------------------------------- the examples run

def examples_of(path: str) -> list[doctest.DocTest]:
    """The docstring examples of a public object (its methods' too, for a class)."""
    obj = checked_objects()[path]
    finder = doctest.DocTestFinder(exclude_empty=True)
    module = sys.modules[obj.__module__]
    tests = finder.find(obj, name=path, module=module, globs={})
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("path", sorted(checked_objects()))
def test_docstring_examples_run(path, keep_threads, monkeypatch):
    # register_optimizer's example adds a name: the registry is put back afterwards.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    tests = examples_of(path)
    assert tests, f"{path} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    for test in tests:
        test.globs = {}
        runner.run(test, clear_globs=True)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0, f"{path}: {results.failed} of {results.attempted} examples failed (above)"


def test_a_failing_example_is_caught():
    def wrong() -> None:
        """Example:
            >>> 1 + 1
            3
        """

    (test,) = doctest.DocTestFinder().find(wrong, globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=lambda _: None)
    assert runner.summarize(verbose=False).failed == 1


# --------------------------------------------------------------------------- the reference is complete

DIRECTIVE = re.compile(
    r"^\s*\.\. (?:auto(?:function|class|data|module)|py:(?:data|class|function)|module|currentmodule)::"
    r"\s*(\S+)", re.MULTILINE)


def documented_objects() -> set[int]:
    """Ids of the objects the API reference pages document (``auto*``/``py:*`` directives,
    short names resolved against the page's current module)."""
    ids = set()
    for page in sorted((DOCS / "api").glob("*.rst")):
        current = None
        for match in DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            directive = match.group(0)
            target = match.group(1)
            if "module::" in directive:
                current = target
                continue
            dotted = target if target.startswith("holotx") or current is None else f"{current}.{target}"
            module_name, _, attr = dotted.rpartition(".")
            obj = getattr(importlib.import_module(module_name), attr)
            ids.add(id(obj))
    return ids


def test_api_reference_documents_every_public_name():
    documented = documented_objects()
    missing = sorted(path for path, obj in public_objects().items() if id(obj) not in documented)
    assert not missing, f"not in docs/api/*.rst: {missing}"


# --------------------------------------------------------------------------- the build

def test_conf_reaches_no_network():
    conf = (DOCS / "conf.py").read_text(encoding="utf-8")
    assert "sphinx.ext.intersphinx" not in conf
    assert re.search(r"^intersphinx_mapping\b.*=\s*\{\}\s*$", conf, flags=re.MULTILINE)


def sphinx_build(source: Path, out: Path) -> subprocess.CompletedProcess:
    # A proxy that refuses every connection: a build that tried to reach the network
    # (intersphinx, a remote image) would warn, and -W makes that an error.
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning",
           **dict.fromkeys(("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"), "http://127.0.0.1:9")}
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "-E",
         "-d", str(out / "doctrees"), str(source), str(out / "html")],
        capture_output=True, text=True, timeout=5 * BUILD_SECONDS, env=env, cwd=ROOT)


def test_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx")
    start = time.perf_counter()
    result = sphinx_build(DOCS, tmp_path)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"sphinx -W failed:\n{result.stdout}\n{result.stderr}"
    html = tmp_path / "html"
    for page in ("index", "functional", "meta_learning", "torch_optim", "distributed", "contract",
                 "holocron", "benchmarks", "api/optimizers", "api/adapters"):
        assert (html / f"{page}.html").exists(), page
    assert "https://arxiv.org/abs/1412.6980" in (html / "api" / "optimizers.html").read_text(encoding="utf-8")
    assert seconds < BUILD_SECONDS, f"the docs took {seconds:.0f} s to build"


def test_a_warning_fails_the_build(tmp_path):
    """``-W`` is in force: a page with a broken directive fails the build."""
    pytest.importorskip("sphinx")
    source = tmp_path / "src"
    source.mkdir()
    (source / "conf.py").write_text('extensions = ["sphinx.ext.autodoc"]\n', encoding="utf-8")
    (source / "index.rst").write_text("Title\n=====\n\n.. autofunction:: holotx.no_such_name\n",
                                      encoding="utf-8")
    result = sphinx_build(source, tmp_path / "out")
    assert result.returncode != 0
    assert "no_such_name" in result.stdout + result.stderr


# --------------------------------------------------------------------------- the pages' code

CODE_BLOCK = re.compile(
    r"^\.\. code-block:: python\n((?:[ ]{3}:[\w-]+:.*\n)*)\n((?:(?:[ ]{3}.*)?\n)+)", re.MULTILINE)


def page_blocks() -> list[tuple[str, str]]:
    """``(id, code)`` of every ``.. code-block:: python`` of the user pages, except those
    given ``:class: sketch`` (code for a framework or a multi-process launch the tests do
    not have)."""
    blocks = []
    for page in sorted(DOCS.glob("*.rst")):
        text = page.read_text(encoding="utf-8")
        for k, match in enumerate(CODE_BLOCK.finditer(text)):
            if ":class: sketch" in match.group(1):
                continue
            code = "\n".join(line[3:] for line in match.group(2).splitlines())
            blocks.append((f"{page.stem}-{k}", code))
    return blocks


def test_pages_have_code_blocks():
    assert len(page_blocks()) >= 5


@pytest.mark.parametrize(("name", "code"), page_blocks(), ids=[n for n, _ in page_blocks()])
def test_page_block_runs(name, code, keep_threads):
    torch._dynamo.reset()
    exec(compile(code, f"docs/{name}", "exec"), {"__name__": "__docs__"})
    torch._dynamo.reset()


# --------------------------------------------------------------------------- references

def test_no_file_cites_a_document_outside_the_repository():
    """Every document the code or the docs point to is in the repository (an earlier
    docstring cited a design file that never was)."""
    banned = ("DESIGN" + ".md", "../" + "shared", "/work/" + "shared")
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=False)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".rst", ".toml", ".txt", ".cfg") or not path.exists():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{name}: {b}" for b in banned if b in text]
    assert not offenders, offenders
