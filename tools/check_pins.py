#!/usr/bin/env python3
"""Check that the exact pins of a requirements file agree with each other's published metadata.

What it does. For every `name[extras]==version` line of a requirements file it asks pip for
that release's declared metadata for a target (default CPython 3.12, Linux x86_64, manylinux up
to glibc 2.35): wheel METADATA from `pip install --dry-run --no-deps --only-binary=:all:
--report` (else `pip download --no-deps`), or for a package with no wheel for the target its
sdist's PKG-INFO (`pip download --no-build-isolation --no-clean`: nothing is installed; pip runs
the sdist's metadata step in this interpreter, and its failure is expected and harmless, e.g.
transformer-engine-torch needs torch and CUDA). Then it reports a contradiction when
  * a pinned package's Requires-Python excludes the target interpreter,
  * a pin names an extra that the release does not provide, or
  * a pinned package declares a requirement on another pinned package (after evaluating the
    environment marker for the target and the extras named in the pin) whose specifier
    excludes the pinned version.
One line per checked pair, then a summary. Exit 0: consistent; 1: a contradiction (or, with
--resolve, pip's resolver found a conflict); 2: bad input or metadata that could not be read.

`--resolve` also runs pip's full resolver over the pins (dry run, wheels only, same target),
which covers requirements on packages the file does not pin. A package that exists only as an
sdist cannot be resolved that way without building it; the tool says so and resolves the rest
with that package's PKG-INFO requirements in its place.

What it leaves out. It installs, builds and imports nothing, so it says nothing about run
time: ABI of extensions compiled against torch, CUDA driver and GPU kernels are not checked.
Requirements on unpinned packages are checked only by --resolve. An sdist's PKG-INFO may mark
Requires-Dist as Dynamic (recomputed when it is built); the tool prints that caveat. pip
constraint files from the local pip configuration are ignored (PIP_CONSTRAINT=/dev/null)
unless --keep-pip-constraints is given.

    python tools/check_pins.py requirements/gpu.txt [--resolve]
    python tools/check_pins.py requirements/cpu.txt --python-version 3.11 --also torch==2.13.0+cpu
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name


class PinError(ValueError):
    """A requirements line this tool cannot check; the message names the line and the fix."""


@dataclass(frozen=True)
class Target:
    python_version: str = "3.12"
    machine: str = "x86_64"
    glibc: str = "2.35"

    @property
    def full_python(self) -> str:
        parts = self.python_version.split(".")
        return ".".join(parts + ["0"] * (3 - len(parts)))

    def marker_env(self, extra: str = "") -> dict[str, str]:
        """PEP 508 environment of the target; `extra` is "" for the base requirements."""
        full = self.full_python
        return {"python_version": ".".join(full.split(".")[:2]), "python_full_version": full,
                "implementation_name": "cpython", "implementation_version": full,
                "platform_python_implementation": "CPython", "os_name": "posix", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": self.machine, "platform_release": "",
                "platform_version": "", "extra": extra}

    def pip_flags(self) -> list[str]:
        major, minor = (int(x) for x in self.glibc.split(".")[:2])
        platforms = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 4, -1)]
        platforms += [f"manylinux{tag}_{self.machine}" for tag in ("2014", "2010", "1")]
        return ["--python-version", self.python_version, "--implementation", "cp",
                *(flag for platform in platforms for flag in ("--platform", platform))]

    def describe(self) -> str:
        return f"CPython {self.full_python} on Linux {self.machine} (manylinux, glibc <= {self.glibc})"


@dataclass(frozen=True)
class Pin:
    name: str  # canonical (PEP 503)
    version: str
    extras: frozenset[str]  # canonical (PEP 685)
    text: str  # as written, without comment

    @property
    def short(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass
class Metadata:
    name: str
    version: str
    requires_python: str | None
    requires_dist: list[str]
    provides_extra: list[str] | None = None
    source: str = "wheel METADATA"
    dynamic: list[str] = field(default_factory=list)
    build_requires: list[str] = field(default_factory=list)  # sdists: pyproject's [build-system]


@dataclass(frozen=True)
class Finding:
    status: str  # "ok", "FAIL", "skip", "note"
    text: str

    def line(self) -> str:
        return f"{self.status:<5} {self.text}"


# ---- pure functions: parsing and the contradiction logic -------------------------------------


def parse_pin(text: str, where: str) -> Pin:
    """One requirement line -> Pin; only exact `==` pins are accepted."""
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise PinError(f"{where}: cannot parse {text!r} ({exc}); write NAME[EXTRAS]==VERSION") from exc
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version or req.url:
        raise PinError(f"{where}: {text!r} is not an exact pin; write NAME[EXTRAS]==VERSION")
    if req.marker is not None:
        raise PinError(f"{where}: {text!r} has a marker; keep markers out of pinned stack files")
    extras = frozenset(canonicalize_name(e) for e in req.extras)
    return Pin(canonicalize_name(req.name), specs[0].version, extras, text)


def parse_requirements(text: str, source: str) -> list[Pin]:
    """Exact pins of a requirements file; comments and blank lines skipped, options refused."""
    pins: dict[str, Pin] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        if line.startswith("-"):
            raise PinError(f"{where}: option line {line!r} is not supported; list pins only")
        pin = parse_pin(line, where)
        if pin.name in pins:
            raise PinError(f"{where}: {pin.name} is pinned twice; keep one line")
        pins[pin.name] = pin
    return list(pins.values())


def requirement_applies(req: Requirement, target: Target, extras: frozenset[str]) -> bool:
    """True when req's marker holds for the target, either always or under a requested extra."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate(target.marker_env(extra)) for extra in ("", *sorted(extras)))


def admits(specifier: str | SpecifierSet, version: str) -> bool:
    """Whether a version satisfies a specifier (pre-releases allowed: the pin is explicit)."""
    spec = specifier if isinstance(specifier, SpecifierSet) else SpecifierSet(specifier)
    return spec.contains(version, prereleases=True)


def check_requires_python(pin: Pin, meta: Metadata, target: Target) -> Finding:
    spec = (meta.requires_python or "").strip()
    if not spec:
        return Finding("ok", f"{pin.short}  Requires-Python (none declared) admits {target.full_python}")
    try:
        ok = admits(spec, target.full_python)
    except InvalidSpecifier:
        return Finding("FAIL", f"{pin.short}  Requires-Python {spec!r} is not a valid specifier")
    verdict = "admits" if ok else "EXCLUDES"
    return Finding("ok" if ok else "FAIL", f"{pin.short}  Requires-Python {spec} {verdict} {target.full_python}")


def check_extras(pin: Pin, meta: Metadata) -> list[Finding]:
    if not pin.extras or meta.provides_extra is None:
        return []
    provided = {canonicalize_name(e) for e in meta.provides_extra}
    findings = []
    for extra in sorted(pin.extras):
        ok = extra in provided
        verdict = "provided" if ok else f"NOT provided (it has: {', '.join(sorted(provided)) or 'none'})"
        findings.append(Finding("ok" if ok else "FAIL", f"{pin.short}  extra [{extra}] {verdict}"))
    return findings


def check_requirements(pin: Pin, meta: Metadata, pins: dict[str, Pin], target: Target) -> list[Finding]:
    """One finding per declared requirement of `pin` that names another pinned package."""
    findings = []
    skipped: dict[str, list[str]] = {}  # other pin -> markers that were false for the target
    for text in meta.requires_dist:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            findings.append(Finding("note", f"{pin.short}  unparsable Requires-Dist {text!r} ignored"))
            continue
        other = pins.get(canonicalize_name(req.name))
        if other is None or other.name == pin.name:
            continue
        pair = f"{pin.short} -> {other.short}"
        if not requirement_applies(req, target, pin.extras):
            markers = skipped.setdefault(pair, [])
            if str(req.marker) not in markers:
                markers.append(str(req.marker))
        elif req.url:
            findings.append(Finding("note", f"{pair}  ({text}: a URL requirement, not checked)"))
        elif admits(req.specifier, other.version):
            findings.append(Finding("ok", f"{pair}  (requires {req.name}{req.specifier or ' any version'})"))
        else:
            findings.append(Finding("FAIL", f"{pair}  (requires {req.name}{req.specifier}; "
                                            f"the pinned {other.version} is excluded)"))
    for pair, markers in skipped.items():
        findings.append(Finding("skip", f"{pair}  (only where {' | '.join(markers)}: false for the target)"))
    return findings


def check_all(pins: list[Pin], metas: dict[str, Metadata], target: Target) -> list[Finding]:
    by_name = {pin.name: pin for pin in pins}
    findings: list[Finding] = []
    for pin in pins:
        meta = metas.get(pin.name)
        if meta is None:
            continue
        if canonicalize_name(meta.name) != pin.name or not admits(f"=={pin.version}", meta.version):
            findings.append(Finding("FAIL", f"{pin.short}  pip returned {meta.name}=={meta.version} instead"))
        findings.append(check_requires_python(pin, meta, target))
        findings.extend(check_extras(pin, meta))
        findings.extend(check_requirements(pin, meta, by_name, target))
    return findings


def metadata_from_text(text: str, source: str) -> Metadata:
    """Parse core metadata (METADATA or PKG-INFO, RFC 822 style)."""
    msg = email.parser.Parser().parsestr(text, headersonly=True)
    return Metadata(msg.get("Name", "?"), msg.get("Version", "?"), msg.get("Requires-Python"),
                    msg.get_all("Requires-Dist") or [], msg.get_all("Provides-Extra"), source,
                    [d.lower() for d in msg.get_all("Dynamic") or []])


def metadata_from_report(report: dict) -> Metadata:
    """The first entry of a `pip install --report` document."""
    meta = report["install"][0]["metadata"]
    return Metadata(meta["name"], meta["version"], meta.get("requires_python"),
                    list(meta.get("requires_dist") or []), meta.get("provides_extra"))


def extras_pulling(pin: Pin, meta: Metadata, names: set[str], target: Target) -> set[str]:
    """The extras of `pin` whose (extra-only) requirements name one of `names`."""
    pulling = set()
    for text in meta.requires_dist:
        req = Requirement(text)
        if canonicalize_name(req.name) not in names or requirement_applies(req, target, frozenset()):
            continue
        pulling |= {e for e in pin.extras if requirement_applies(req, target, frozenset({e}))}
    return pulling


# ---- pip I/O -----------------------------------------------------------------------------------


class Pip:
    def __init__(self, command: list[str], keep_constraints: bool) -> None:
        self.command = command
        self.env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
        if not keep_constraints:
            self.env["PIP_CONSTRAINT"] = os.devnull

    def run(self, args: list[str], tmpdir: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, TMPDIR=tmpdir) if tmpdir else self.env
        done = subprocess.run(self.command + args, capture_output=True, text=True, env=env)
        done.stderr = "\n".join(l for l in done.stderr.splitlines() if "is ignored: it is neither" not in l)
        return done


def fetch_metadata(pin: Pin, target: Target, pip: Pip) -> Metadata:
    """Wheel metadata via a no-deps dry run; else the wheel itself; else the sdist's PKG-INFO."""
    with tempfile.TemporaryDirectory(prefix="check_pins_") as tmp:
        report = Path(tmp, "report.json")
        done = pip.run(["install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed", "--only-binary=:all:",
                        "--target", f"{tmp}/target", "--report", str(report), *target.pip_flags(), pin.text])
        if done.returncode == 0 and report.exists():
            return metadata_from_report(json.loads(report.read_text()))
        done = pip.run(["download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", f"{tmp}/wheels",
                        *target.pip_flags(), pin.text])
        for wheel in Path(tmp, "wheels").glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
                return metadata_from_text(zf.read(member).decode(), "wheel METADATA")
        if "No matching distribution" not in done.stderr:
            raise RuntimeError(f"pip could not read {pin.text}: {last_lines(done.stderr)}")
        return fetch_sdist_pkg_info(pin, target, pip, Path(tmp))


def fetch_sdist_pkg_info(pin: Pin, target: Target, pip: Pip, tmp: Path) -> Metadata:
    """PKG-INFO (and build requirements) of the sdist, read from the tree pip unpacked and kept
    (--no-clean); without build isolation nothing is installed, and its metadata build may fail."""
    build_tmp = tmp / "build"
    build_tmp.mkdir()
    done = pip.run(["download", "--no-deps", "--no-build-isolation", "--no-clean", "--no-binary", pin.name,
                    "-d", str(tmp / "sdist"), *target.pip_flags(), pin.text], tmpdir=str(build_tmp))
    found = sorted(build_tmp.glob("pip-*/*/PKG-INFO"))
    if not found:
        raise RuntimeError(f"no wheel for the target and no readable sdist for {pin.text}: "
                           f"{last_lines(done.stderr)}")
    meta = metadata_from_text(found[0].read_text(errors="replace"), "sdist PKG-INFO")
    pyproject = found[0].parent / "pyproject.toml"
    if pyproject.exists():
        build_system = tomllib.loads(pyproject.read_text()).get("build-system", {})
        meta.build_requires = list(build_system.get("requires", []))
    return meta


def last_lines(text: str, count: int = 6) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return " | ".join(lines[-count:]) or "(no output)"


def pip_resolve(requirements: list[str], target: Target, pip: Pip) -> tuple[bool, list[str]]:
    """Full dry-run resolution; (ok, lines): the distributions pip would install, or its errors."""
    with tempfile.TemporaryDirectory(prefix="check_pins_") as tmp:
        report = Path(tmp, "report.json")
        done = pip.run(["install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary=:all:",
                        "--target", f"{tmp}/target", "--report", str(report), *target.pip_flags(), *requirements])
        if done.returncode == 0 and report.exists():
            installs = json.loads(report.read_text())["install"]
            names = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installs)
            return True, names
        errors = [l for l in (done.stdout + "\n" + done.stderr).splitlines() if l.strip()]
        return False, errors[-40:]


def unresolvable_names(errors: list[str]) -> list[str]:
    """Names in pip's "No matching distribution found for NAME..." lines."""
    found = (re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", line) for line in errors)
    return [canonicalize_name(m.group(1)) for m in found if m]


# ---- the command -----------------------------------------------------------------------------


def substitute_sdists(pins: list[Pin], metas: dict[str, Metadata], target: Target) -> tuple[set[str], list[str]]:
    """The sdist-only pins, and the requirement list with each replaced by its PKG-INFO requirements
    (and the extras that pull it dropped from the other pins)."""
    sdists = {p.name for p in pins if p.name in metas and metas[p.name].source.startswith("sdist")}
    reqs: list[str] = []
    for pin in pins:
        meta = metas[pin.name]
        if pin.name in sdists:
            reqs += [text for text in meta.requires_dist if requirement_applies(Requirement(text), target, pin.extras)
                     and canonicalize_name(Requirement(text).name) not in sdists]
            continue
        kept = sorted(pin.extras - extras_pulling(pin, meta, sdists, target))
        reqs.append(f"{pin.name}{'[' + ','.join(kept) + ']' if kept else ''}=={pin.version}")
    return sdists, reqs


def run_resolve(pins: list[Pin], metas: dict[str, Metadata], target: Target, pip: Pip) -> list[Finding]:
    ok, lines = pip_resolve([p.text for p in pins], target, pip)
    if ok:
        return [Finding("ok", f"resolve: pip would install {len(lines)} distributions:")] + [
            Finding("", f"  {line}") for line in lines]
    sdists, reqs = substitute_sdists(pins, metas, target)
    findings = pip_failure(lines, sdists)
    missing = set(unresolvable_names(lines))
    if not missing or not missing <= sdists:
        return findings + [Finding("FAIL", "resolve: pip's resolver found no installable set (above)")]
    for name in sorted(missing):
        build = ", ".join(metas[name].build_requires) or "its build requirements"
        findings.append(Finding("note", f"resolve: {name} exists only as an sdist for this target; pip cannot "
                                        f"resolve it without building it (build requires: {build})"))
    findings.append(Finding("note", "resolve again with the sdist-only pins replaced by their PKG-INFO "
                                    f"requirements: {' '.join(reqs)}"))
    ok, lines = pip_resolve(reqs, target, pip)
    if ok:
        return findings + [Finding("ok", f"resolve (sdist-only pins replaced): pip would install {len(lines)} "
                                         "distributions:")] + [Finding("", f"  {line}") for line in lines]
    return findings + pip_failure(lines, sdists) + [
        Finding("FAIL", "resolve: no installable set even with the sdist-only pins replaced (above)")]


def pip_failure(lines: list[str], sdists: set[str]) -> list[Finding]:
    """pip's error lines, and which requirements had no wheel for the target."""
    findings = [Finding("", f"  pip: {line}") for line in lines]
    no_wheel = sorted(set(unresolvable_names(lines)) - sdists)
    if no_wheel:
        findings.append(Finding("note", f"resolve: no wheel for the target for {', '.join(no_wheel)} (an sdist "
                                        "only, or wheels for other platforms / a newer glibc: see `pip download -v`)"))
    return findings


def fetch_all(pins: list[Pin], target: Target, pip: Pip) -> tuple[dict[str, Metadata], int]:
    """Metadata of every pin, printing where each came from; (metadata by name, pins that failed)."""
    metas: dict[str, Metadata] = {}
    for pin in pins:
        try:
            metas[pin.name] = meta = fetch_metadata(pin, target, pip)
        except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as exc:
            print(f"ERROR {pin.text}: metadata not read ({exc}); check that this name and version "
                  f"exist for {target.describe()}")
            continue
        print(f"meta  {pin.text:40s} {meta.source}{' (Dynamic: ' + ', '.join(meta.dynamic) + ')' if meta.dynamic else ''}")
        if meta.source.startswith("sdist") and "requires-dist" in meta.dynamic:
            print(f"note  {pin.short}: only an sdist for the target; its Requires-Dist is recomputed when it "
                  "is built, so this PKG-INFO copy reflects the machine that made the sdist")
    return metas, len(pins) - len(metas)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requirements", nargs="?", default="requirements/gpu.txt")
    parser.add_argument("--python-version", default="3.12", help="target interpreter, e.g. 3.12 or 3.11")
    parser.add_argument("--machine", default="x86_64")
    parser.add_argument("--glibc", default="2.35", help="newest manylinux glibc of the target (2.35: Ubuntu 22.04)")
    parser.add_argument("--also", action="append", default=[], metavar="PIN",
                        help="an exact pin installed outside the file (e.g. torch==2.13.0+cpu)")
    parser.add_argument("--resolve", action="store_true", help="also run pip's full resolver (dry run)")
    parser.add_argument("--pip", default=f"{shlex.quote(sys.executable)} -m pip", help="pip command to use")
    parser.add_argument("--keep-pip-constraints", action="store_true",
                        help="honour constraint files from the local pip configuration")
    args = parser.parse_args(argv)
    target, path = Target(args.python_version, args.machine, args.glibc), Path(args.requirements)
    try:
        pins = parse_requirements(path.read_text(), str(path)) + [parse_pin(t, "--also") for t in args.also]
    except OSError as exc:
        print(f"error: requirements file {path}: {exc.strerror}; pass an existing requirements file of exact pins",
              file=sys.stderr)
        return 2
    except PinError as exc:
        print(f"error: {exc}; pass an existing requirements file of exact pins", file=sys.stderr)
        return 2
    pip = Pip(shlex.split(args.pip), args.keep_pip_constraints)
    given = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"check_pins: {path} ({len(pins)} pins) for {target.describe()}")
    print(f"run: tools/check_pins.py {given} at {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"pip: {pip.run(['--version']).stdout.strip() or args.pip}; local pip constraint files "
          f"{'honoured' if args.keep_pip_constraints else 'ignored'}")
    metas, errors = fetch_all(pins, target, pip)
    findings = check_all(pins, metas, target)
    if args.resolve:
        findings += run_resolve(pins, metas, target, pip) if not errors else [
            Finding("note", "resolve skipped: some pins' metadata could not be read (above)")]
    for finding in findings:
        print(finding.line() if finding.status else finding.text)
    failed = [f for f in findings if f.status == "FAIL"]
    checked = sum(f.status in ("ok", "FAIL") for f in findings)
    print(f"summary: {len(pins)} pins, {checked} checks, {len(failed)} failed (contradictions, or the resolve), "
          f"{errors} pin(s) without metadata -> {'FAIL' if failed else 'ERROR' if errors else 'OK'}")
    for finding in failed:
        print(f"  {finding.text}")
    return 1 if failed else 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
