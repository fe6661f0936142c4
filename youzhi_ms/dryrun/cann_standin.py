"""A COMPILE-ONLY stand-in for Huawei CANN, generated from the installed MindSpore wheel, so that MindSpore's Ascend
plugin loads on a machine without CANN and its parallel compiler can run under DryRun level 0 (compile only).

Why it exists: the PyPI `mindspore` wheel ships the Ascend plugin (`lib/plugin/libmindspore_ascend.so.2` and
`lib/plugin/ascend/*.so`), but those libraries are linked (BIND_NOW) against ~20 CANN libraries that are not on PyPI
(libascendcl, libhccl, libge_runner, ...). Without them `set_device("Ascend")` fails, and on the CPU device MindSpore
refuses semi-auto parallel ("Invalid backend: CPU") and DryRun of a distributed job. DryRun level 0 never touches a
device, so the plugin only needs the CANN symbols to *exist*.

What is built (into a cache directory, never into the repository; nothing binary is committed):
  1. the symbol list: every dynamic symbol the Ascend plugin libraries import (`readelf --dyn-syms`, the same list
     `nm -D --undefined-only` prints, with the symbol types) that neither MindSpore's own libraries, libpython nor the
     system C/C++ runtime define (`nm -D --defined-only`), plus the CANN entry points MindSpore resolves at run time
     with dlsym (found with `strings`: acl*/Hccl*/rt*/... names);
  2. one generated C file in which every such function returns 0 (all aliases of one function), every data symbol is
     a zero-filled block, and a handful of entries get a body that DryRun needs (each commented where it is written);
  3. `gcc -shared` of that file into `<cache>/.../latest/lib64/libyouzhi_cann_compile_only.so`, and one symlink per
     missing CANN library name (libascendcl.so, libhccl.so, ...). The directory is called `latest` because MindSpore
     derives its CANN root from the path of the library that defines `aclrtMalloc`;
  4. a minimal Python package `hccl` (MindSpore's `communication.init` imports `hccl.sys_version`).

It is pinned to the MindSpore version it was written against (the singleton layout and the special entries are
version-specific) and labelled compile-only everywhere: any computation that reaches a stand-in function gets 0 and
garbage, so it is only ever put on the library path of a DryRun level-0 child process (`child_env`), never into the
environment of a normal run. Where a real CANN is installed (`real_cann_root`), the tools use it instead.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set, Tuple

from youzhi_ms.errors import YouzhiError

PINNED_MINDSPORE = "2.10.0"
STANDIN_LIB = "libyouzhi_cann_compile_only.so"
LABEL = "COMPILE-ONLY CANN stand-in (youzhi_ms DryRun level 0): no device, every call returns 0; not CANN"
# An Atlas 800T A2 card (910B, 64 GB HBM). MindSpore picks its kernel and parallel settings by the SoC name.
SOC_NAME = "Ascend910B3"
# Version reported by the stand-in `hccl` package (only its major.minor is parsed by MindSpore).
HCCL_VERSION = "0.0.0+youzhi.compile.only"

# Names MindSpore resolves with dlsym from CANN libraries (not visible as imports): functions of these families.
_DLSYM_NAME = re.compile(r"^(acl[A-Za-z]\w+|Hccl[A-Z]\w+|Hcom[A-Z]\w+|hcom[A-Z]\w+|rt[A-Z]\w+|hal[A-Z]\w+|"
                         r"Msprof[A-Z]\w+|mspti[A-Z]\w+|mm[A-Z]\w+|Dlog\w+|Alog\w+)$")
# Imports that are not CANN's and must stay undefined (toolchain hooks, TLS init wrappers).
_SKIP = re.compile(r"^(_ZTH|_ZTW|_ITM_|__gcov_|__gmon_start__|_Jv_RegisterClasses|__cxa_|__tls_get_addr)")
# Singletons whose objects MindSpore's static initialisers use inline (e.g. ge::StatusFactory::Instance() followed
# by an inlined std::map insert): the accessor must return memory shaped like an empty std::map at offset 0
# (measured with mindspore 2.10.0: returning 0 from these four accessors segfaults while the plugin loads).
_SINGLETON = re.compile(r"(Instance|GeInstance|GetInstance)Ev$")


@dataclass(frozen=True)
class StandIn:
    root: str            # .../latest (what MindSpore takes as the CANN root)
    lib_dir: str         # .../latest/lib64 (libraries under the CANN names)
    python_dir: str      # holds the `hccl` package
    manifest: dict

    def child_env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The environment of a DryRun child process: the stand-in first on the library and Python paths."""
        env = dict(os.environ if base is None else base)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (self.lib_dir, env.get("LD_LIBRARY_PATH")) if p)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.python_dir, env.get("PYTHONPATH")) if p)
        env["YOUZHI_CANN_STANDIN"] = self.root
        return env


# --------------------------------------------------------------------------------------------------- real CANN
def real_cann_root() -> Optional[str]:
    """The installed CANN toolkit, if any (set_env.sh exports ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME)."""
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH"):
        p = os.environ.get(var)
        if not p:
            continue
        root = os.path.dirname(p) if var == "ASCEND_OPP_PATH" else p
        if os.path.isfile(os.path.join(root, "lib64", "libascendcl.so")):
            return root
    default = "/usr/local/Ascend/ascend-toolkit/latest"
    if os.path.isfile(os.path.join(default, "lib64", "libascendcl.so")):
        return default
    return None


# --------------------------------------------------------------------------------------------------- wheel facts
def mindspore_dir() -> str:
    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        raise YouzhiError("mindspore is not installed; run run_scripts/setup_env.sh")
    return list(spec.submodule_search_locations)[0]


def mindspore_version(ms_dir: str) -> str:
    """Read version.py without importing MindSpore (importing it loads ~1 GB of libraries)."""
    with open(os.path.join(ms_dir, "version.py")) as f:
        m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", f.read())
    if not m:
        raise YouzhiError(f"cannot read the MindSpore version from {ms_dir}/version.py; reinstall mindspore")
    return m.group(1)


def _is_x86_64_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 62


def _elf_files(top: str) -> List[str]:
    out = []
    for p in glob.glob(os.path.join(top, "**", "*.so*"), recursive=True):
        if os.path.isfile(p) and not os.path.islink(p) and _is_x86_64_elf(p):
            out.append(p)
    return sorted(out)


def plugin_libraries(ms_dir: str) -> List[str]:
    """The Ascend plugin's host libraries (the per-op device kernel .so files are loaded only to launch kernels)."""
    plugin = os.path.join(ms_dir, "lib", "plugin")
    libs = [p for p in _elf_files(os.path.join(plugin, "ascend")) if "/op_kernels/" not in p]
    libs += [p for p in glob.glob(os.path.join(plugin, "*.so*")) if "ascend" in os.path.basename(p)]
    return sorted(set(libs))


def _run(cmd: List[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise YouzhiError(f"'{cmd[0]}' is not installed; the compile-only CANN stand-in is built with binutils and gcc "
                          "(apt-get install binutils gcc)") from e
    if r.returncode != 0:
        raise YouzhiError(f"{' '.join(cmd[:3])} ... failed: {r.stderr.strip()[:300]}")
    return r.stdout


def _defined(paths: Iterable[str]) -> Set[str]:
    names: Set[str] = set()
    for p in paths:
        for line in _run(["nm", "-D", "--defined-only", p]).splitlines():
            parts = line.split()
            if len(parts) >= 3:
                names.add(parts[-1].split("@")[0])
    return names


def _imports(path: str) -> Dict[str, str]:
    """Unversioned undefined dynamic symbols of one library -> ELF type (FUNC, OBJECT, TLS, NOTYPE)."""
    out = {}
    for line in _run(["readelf", "--dyn-syms", "-W", path]).splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[6] == "UND" and "@" not in parts[7]:
            out[parts[7]] = parts[3]
    return out


def _needed(path: str) -> List[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run(["readelf", "-d", "-W", path]))


def _system_libraries() -> Dict[str, str]:
    """soname -> path of what the dynamic loader can find on this system (ldconfig cache + libpython's directory)."""
    found = {}
    try:
        text = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    except OSError:
        text = ""
    for m in re.finditer(r"^\s*(\S+) \(([^)]*)\) => (\S+)$", text, re.M):
        if "x86-64" in m.group(2) or "x86_64" in m.group(2):
            found.setdefault(m.group(1), m.group(3))
    return found


def _python_runtime() -> List[str]:
    paths = [os.path.realpath(sys.executable)]
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib and ".so" in ldlib and os.path.isfile(os.path.join(libdir, ldlib)):
        paths.append(os.path.join(libdir, ldlib))
    return [p for p in paths if _is_x86_64_elf(p)]


def collect_symbols(ms_dir: str) -> Tuple[Dict[str, str], List[str]]:
    """(symbol -> type to provide, CANN library names to provide), from the installed wheel."""
    targets = plugin_libraries(ms_dir)
    ours = _elf_files(ms_dir)
    own_names = {os.path.basename(p) for p in ours} | {os.path.basename(p) for p in glob.glob(
        os.path.join(ms_dir, "**", "*.so*"), recursive=True)}
    system = _system_libraries()
    missing: Set[str] = set()
    for t in targets:
        for n in _needed(t):
            if n not in own_names and n not in system:
                missing.add(n)
    runtime = [system[n] for n in ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libgomp.so.1",
                                   "libpthread.so.0", "libdl.so.2", "librt.so.1", "libz.so.1") if n in system]
    defined = _defined(ours + runtime + _python_runtime())
    wanted: Dict[str, str] = {}
    for t in targets:
        for name, typ in _imports(t).items():
            if name in defined or _SKIP.match(name):
                continue
            if typ == "TLS":
                raise YouzhiError(f"{os.path.basename(t)} imports the thread-local symbol {name}, which the stand-in "
                                  f"cannot provide; it was written for mindspore {PINNED_MINDSPORE}")
            wanted[name] = "OBJECT" if typ == "OBJECT" else "FUNC"
    for t in targets:
        for s in set(re.findall(rb"[A-Za-z_][A-Za-z0-9_]{3,}", open(t, "rb").read())):
            name = s.decode()
            if _DLSYM_NAME.match(name) and name not in defined:
                wanted.setdefault(name, "FUNC")
    return wanted, sorted(missing)


# --------------------------------------------------------------------------------------------------- C source
# Bodies DryRun level 0 needs; every other function is an alias of youzhi_cann_return_zero.
_SPECIAL_C = r"""
/* MindSpore chooses kernels and parallel defaults by SoC name: report a 910B card. */
const char *aclrtGetSocName(void) { return "%(soc)s"; }
int rtGetSocVersion(char *version, unsigned int max_len) {
  if (version && max_len) { strncpy(version, "%(soc)s", max_len - 1); version[max_len - 1] = 0; }
  return 0;
}
"""


def render_c(symbols: Dict[str, str], ms_version: str) -> str:
    special = {"aclrtGetSocName", "rtGetSocVersion"}
    lines = [f"/* {LABEL}.",
             f" * GENERATED by youzhi_ms/dryrun/cann_standin.py from the installed mindspore {ms_version} wheel;",
             " * do not edit, do not ship, do not use to run anything: it only lets the Ascend plugin load so that",
             " * MindSpore's parallel compiler can run under DryRun level 0 (MS_SIMULATION_LEVEL=0). */",
             "#include <string.h>",
             "long youzhi_cann_return_zero(void) { return 0; }",
             "",
             "/* A singleton accessor returns a zeroed block whose first member looks like an empty std::map",
             " * (libstdc++ _Rb_tree: compare at +0, header {color, parent, left, right} at +8, node count at +40):",
             " * the header's left/right point at the header itself, as an empty map's do. Static initialisers",
             " * insert into it. */",
             "#define YOUZHI_SINGLETON(fn, blk) \\",
             "  static long blk[1024] = {0, 0, 0, (long)&blk[1], (long)&blk[1], 0}; \\",
             "  void *fn(void) { return blk; }",
             _SPECIAL_C % {"soc": SOC_NAME}]
    n = 0
    for name in sorted(symbols):
        if name in special:
            continue
        if symbols[name] == "OBJECT":
            lines.append(f"char {name}[4096] __attribute__((aligned(64)));")
        elif _SINGLETON.search(name):
            n += 1
            lines.append(f"YOUZHI_SINGLETON({name}, youzhi_singleton_{n})")
        else:
            lines.append(f"long {name}(void) __attribute__((alias(\"youzhi_cann_return_zero\")));")
    return "\n".join(lines) + "\n"


_HCCL_INIT = f'''"""{LABEL}: the `hccl` Python package MindSpore's communication.init() imports to check the HCCL
version. Generated by youzhi_ms/dryrun/cann_standin.py; it has no functions."""
'''
_HCCL_VERSION = f'''"""{LABEL}."""
__sys_version__ = "{HCCL_VERSION}"
'''


# --------------------------------------------------------------------------------------------------- build
def default_cache_dir() -> str:
    base = os.environ.get("YOUZHI_DRYRUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "youzhi_ms_dryrun")
    return os.path.abspath(base)


def _fingerprint(ms_dir: str, ms_version: str) -> str:
    """Changes when the generator, the MindSpore version or any plugin library changes (then it is rebuilt)."""
    h = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    h.update(ms_version.encode())
    for p in plugin_libraries(ms_dir):
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, ms_dir)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_standin(cache_dir: Optional[str] = None, log=print) -> StandIn:
    """Build (once per MindSpore wheel) or reuse the stand-in; returns where it is."""
    ms_dir = mindspore_dir()
    version = mindspore_version(ms_dir)
    if version != PINNED_MINDSPORE:
        raise YouzhiError(f"the compile-only CANN stand-in was written for mindspore {PINNED_MINDSPORE}, this venv has "
                          f"{version}; install mindspore=={PINNED_MINDSPORE} for the dry run, or run it where CANN is "
                          "installed (source set_env.sh so ASCEND_HOME_PATH is set)")
    cache = cache_dir or default_cache_dir()
    key = f"mindspore-{version}-{_fingerprint(ms_dir, version)}"
    final = os.path.join(cache, key)
    with _locked(os.path.join(cache, ".lock")):
        if not os.path.isfile(os.path.join(final, "manifest.json")):
            log(f"building the compile-only CANN stand-in for mindspore {version} in {final} (once; ~1 min)")
            _build(ms_dir, version, final)
            _remove_stale(cache, keep=final)
    with open(os.path.join(final, "manifest.json")) as f:
        manifest = json.load(f)
    root = os.path.join(final, "latest")
    return StandIn(root, os.path.join(root, "lib64"), os.path.join(final, "python"), manifest)


def _remove_stale(cache: str, keep: str) -> None:
    """Earlier builds (another wheel or generator) in the cache: removed only if their manifest says we wrote them."""
    for d in glob.glob(os.path.join(cache, "mindspore-*")):
        if os.path.abspath(d) == os.path.abspath(keep):
            continue
        try:
            with open(os.path.join(d, "manifest.json")) as f:
                ours = json.load(f).get("label") == LABEL
        except (OSError, ValueError, AttributeError):
            ours = False
        if ours:
            shutil.rmtree(d, ignore_errors=True)


def _build(ms_dir: str, version: str, final: str) -> None:
    symbols, missing = collect_symbols(ms_dir)
    if "libascendcl.so" not in missing:
        raise YouzhiError("the Ascend plugin's CANN dependencies were not found in the wheel's import tables; the "
                          f"stand-in was written for mindspore {PINNED_MINDSPORE}'s layout")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=parent)
    try:
        lib_dir = os.path.join(tmp, "latest", "lib64")
        os.makedirs(lib_dir)
        src = os.path.join(tmp, "youzhi_cann_compile_only.c")
        with open(src, "w") as f:
            f.write(render_c(symbols, version))
        out = os.path.join(lib_dir, STANDIN_LIB)
        _run(["gcc", "-shared", "-fPIC", "-O0", "-w", f"-Wl,-soname,{STANDIN_LIB}", "-o", out, src])
        for name in missing:
            os.symlink(STANDIN_LIB, os.path.join(lib_dir, name))
        with open(os.path.join(tmp, "latest", "COMPILE_ONLY_NOT_CANN.txt"), "w") as f:
            f.write(LABEL + f"\nGenerated from mindspore {version} ({ms_dir}).\n")
        pkg = os.path.join(tmp, "python", "hccl")
        os.makedirs(pkg)
        with open(os.path.join(pkg, "__init__.py"), "w") as f:
            f.write(_HCCL_INIT)
        with open(os.path.join(pkg, "sys_version.py"), "w") as f:
            f.write(_HCCL_VERSION)
        manifest = {"label": LABEL, "mindspore_version": version, "mindspore_dir": ms_dir, "soc_name": SOC_NAME,
                    "symbols": len(symbols), "data_symbols": sum(t == "OBJECT" for t in symbols.values()),
                    "libraries": missing, "source": os.path.basename(src)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> None:  # python -m youzhi_ms.dryrun.cann_standin [--cache-dir D]: build and print where
    ap = argparse.ArgumentParser(description="build the compile-only CANN stand-in (DryRun level 0 only)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    s = ensure_standin(args.cache_dir)
    print(json.dumps({"root": s.root, **s.manifest}, indent=1))


if __name__ == "__main__":
    main()
