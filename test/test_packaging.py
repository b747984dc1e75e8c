"""Packaging: package.xml for rosdep, setup.cfg for pip, the installed fitting set,
scripts/setup.sh's pip error handling, and the two launch files.

Here the launch files are checked statically, and the Python one is also run against
recording stand-ins of the launch classes; test_launch.py runs both with the real launch
(scripts/install_launch.sh installs it in the pip mode: PyPI's ``launch`` is another project).
"""

from __future__ import annotations

import ast
import configparser
import glob
import importlib.util
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCH_XML = REPO / "launch" / "loop_closure.launch.xml"
LAUNCH_PY = REPO / "launch" / "loop_closure.launch.py"
FIT = REPO / "data" / "corridor_vprbench"

# The one contract of both launch files.
LAUNCH_DEFAULTS = {  # argument -> default value as the node receives it ('' = empty string)
    "namespace": "",
    "image": "image",
    "compressed_image": "image/compressed",
    "camera_info": "camera_info",
    "odom": "odom",
    "depth": "depth",
    "image_rectified": "false",
    "compressed": "false",
    "use_sim_time": "false",
    "preset": "speed",
    "sigterm_timeout": "60",  # launch reads these two by name: room for save_map_on_shutdown (README, Shutdown)
    "sigkill_timeout": "240",
    "checkpoint": "",
    "fleet_dsn": "",
    "robot_id": "",
}
LAUNCH_ARGS = {*LAUNCH_DEFAULTS, "params_file"}
LAUNCH_REMAPS = {
    "image": "image",
    "image/compressed": "compressed_image",
    "camera_info": "camera_info",
    "odom": "odom",
    "depth": "depth",
}
LAUNCH_PARAMS = {
    "preset": str,
    "checkpoint": str,
    "fleet_dsn": str,
    "robot_id": str,
    "compressed": bool,
    "image_rectified": bool,
    "use_sim_time": bool,
}

# Third-party modules the library imports -> (pip requirement, rosdep key or None where rosdistro has none).
PY_DEPS = {
    "numpy": ("numpy", "python3-numpy"),
    "cv2": ("opencv-python-headless", "python3-opencv"),
    "scipy": ("scipy", "python3-scipy"),
    "PIL": ("pillow", "python3-pil"),
    "matplotlib": ("matplotlib", "python3-matplotlib"),
    "tqdm": ("tqdm", "python3-tqdm"),
    "torch": ("torch", "python3-pytorch-pip"),
    "torchvision": ("torchvision", "python3-pytorch-pip"),
    "faiss": ("faiss-cpu", None),
    "rosbags": ("rosbags", None),
    "evo": ("evo", None),
    "onnx": ("onnx", None),
    "tomli": ("tomli", None),
    "yaml": ("pyyaml", "python3-yaml"),
    "onnxruntime": ("onnxruntime", None),
    "openvino": ("openvino", None),
    "nncf": ("nncf", None),
    "tensorrt": ("tensorrt", None),
    "gtsam": ("gtsam", None),
    "psycopg": ("psycopg", None),
    "pgvector": ("pgvector", None),
}
#: imported only by an engine that is asked for (pnv_ros.engines) or by the fleet store (pnv_ros.fleet, inside its
#: functions): module -> the setup.cfg extra that brings it,
#: or None where the platform brings it (TensorRT: NVIDIA's wheel, JetPack)
OPTIONAL_DEPS = {"openvino": "openvino", "nncf": "openvino", "tensorrt": None, "psycopg": "fleet", "pgvector": "fleet"}
ROS_MODULES = {"rclpy", "rcl_interfaces", "builtin_interfaces", "ament_index_python", "cv_bridge", "rosidl_runtime_py"}


# ---------------------------------------------------------------- helpers


def _package_xml():
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(REPO / "package.xml"))
    pkg.validate()
    return pkg


def _imports(root: Path) -> dict[str, set[Path]]:
    """Top-level module -> files importing it, for every .py under root."""
    out: dict[str, set[Path]] = {}
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                out.setdefault(n.split(".")[0], set()).add(f)
    return out


def _is_ros(module: str) -> bool:
    return module in ROS_MODULES or module.endswith(("_msgs", "_srvs", "_interfaces"))


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _requirements(text: str) -> dict[str, str]:
    """Requirement name (lower case) -> its full line, from install_requires / requirements.txt text."""
    out = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            out[re.split(r"[\s;<>=!~\[]", line, maxsplit=1)[0].lower()] = line
    return out


def _corridor_files() -> set[str]:
    return {str(p.relative_to(FIT)) for p in FIT.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- package.xml (rosdep, colcon)


def test_package_xml_declares_build_and_run_dependencies() -> None:
    pkg = _package_xml()
    assert pkg.get_build_type() == "ament_cmake"
    build = {d.name for d in pkg.build_depends}
    run = {d.name for d in pkg.exec_depends}
    tools = {d.name for d in pkg.buildtool_depends}
    assert {"ament_cmake", "ament_cmake_python", "rosidl_default_generators"} <= tools
    assert "rosidl_interface_packages" in {g.name for g in pkg.member_of_groups}
    # The interfaces' DEPENDENCIES are needed to build them and to use them.
    cmake = (REPO / "CMakeLists.txt").read_text()
    rosidl_deps = set(re.search(r"DEPENDENCIES([^)]*)\)", cmake).group(1).split())
    assert rosidl_deps and rosidl_deps <= build & run, f"<depend> on {sorted(rosidl_deps - (build & run))}"
    # Everything the launch files and the node need at run time.
    needed = {"rclpy", "rosidl_default_runtime", "rcl_interfaces", "ament_index_python", "launch", "launch_ros"}
    assert needed <= run, f"missing <exec_depend>: {sorted(needed - run)}"


def test_package_xml_covers_every_ros_package_the_code_imports() -> None:
    run = {d.name for d in _package_xml().exec_depends}
    imported = {m for m in _imports(REPO / "pnv_ros") if _is_ros(m)} - {"cv_bridge"}  # cv_bridge: optional
    assert imported, "no ROS import found: the scan is broken"
    assert imported <= run, f"imported but not an <exec_depend>: {sorted(imported - run)}"


def test_package_xml_python_keys_are_real_rosdep_keys() -> None:
    text = (REPO / "package.xml").read_text()
    run = {d.name for d in _package_xml().exec_depends}
    for module, (pip_name, key) in PY_DEPS.items():
        if key:
            assert key in run, f"{module}: <exec_depend>{key}</exec_depend> missing"
        else:  # no key in rosdistro: not declared (rosdep would fail on it), but named for pip in a comment
            invented = [d for d in run if pip_name.split("-")[0] in d]
            assert not invented, f"{invented}: rosdistro has no such key"
            assert re.search(rf"<!--[^>]*\b{re.escape(pip_name)}\b[^>]*-->", text, re.S), f"{pip_name}: no note"


# ---------------------------------------------------------------- setup.cfg / requirements.txt (pip)


def test_setup_cfg_requires_what_the_library_imports_without_exact_torch_pins() -> None:
    req = _requirements(_setup_cfg()["options"]["install_requires"])
    third_party = {
        m for m in _imports(REPO / "pnv_ros") if m not in sys.stdlib_module_names and m != "pnv_ros" and not _is_ros(m)
    }
    unknown = third_party - set(PY_DEPS)
    assert not unknown, f"new third-party imports {sorted(unknown)}: add them to setup.cfg, package.xml and PY_DEPS"
    for module in third_party - set(OPTIONAL_DEPS):
        assert PY_DEPS[module][0] in req, f"{module} is imported but {PY_DEPS[module][0]} is not in install_requires"
    extras = _setup_cfg()["options.extras_require"]
    for module, extra in OPTIONAL_DEPS.items():
        if extra:
            assert PY_DEPS[module][0] in _requirements(extras[extra]), f"{module}: not in the {extra!r} extra"
    optional_users = [*(REPO / "pnv_ros" / "engines").glob("*.py"), *(REPO / "pnv_ros" / "fleet").glob("*.py")]
    for path in [*optional_users, REPO / "pnv_ros" / "export.py"]:
        engines = path.read_text()
        for module in OPTIONAL_DEPS:  # imported inside the engine that needs it, never at the top
            assert not re.search(rf"^(import|from) {module}\b", engines, re.M), f"{path}: {module} imported at the top"
    assert "rosbags" in req
    for name in ("torch", "torchvision"):
        assert "==" not in req[name] and ">=" in req[name], f"setup.cfg: give {name} a range, not {req[name]!r}"


def test_requirements_txt_keeps_the_exact_pins() -> None:
    req = _requirements((REPO / "requirements.txt").read_text())
    assert re.fullmatch(r"torch==\S+", req["torch"]) and re.fullmatch(r"torchvision==\S+", req["torchvision"])
    assert "rosbags" in req


# ---------------------------------------------------------------- the installed fitting set


def test_fitting_set_is_installed_in_both_modes() -> None:
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"install\(DIRECTORY data/corridor_vprbench DESTINATION share/\$\{PROJECT_NAME\}/data\)", cmake)
    files = {}
    for dest, patterns in _setup_cfg()["options.data_files"].items():
        for pattern in patterns.split():
            for f in glob.glob(str(REPO / pattern)):
                files[str(Path(dest) / Path(f).name)] = Path(f)
    want = {f"share/pnv_ros/data/corridor_vprbench/{rel}" for rel in _corridor_files()}
    assert set(files) == want
    assert all(files[d].resolve() == (FIT / d.split("corridor_vprbench/", 1)[1]).resolve() for d in files)


def test_the_checkout_fitting_set_is_todays() -> None:
    """In a checkout the lookup gives exactly the folders (and so the images) the default model was built from."""
    from pnv_ros.model.default_model import find_fitting_set

    assert find_fitting_set() == [REPO / "data/corridor_vprbench/ref", REPO / "data/corridor_vprbench/query"]


def _fake_share(prefix: Path) -> Path:
    """<prefix>/share/pnv_ros/data/corridor_vprbench with the corridor files symlinked."""
    share = prefix / "share" / "pnv_ros" / "data" / "corridor_vprbench"
    for rel in _corridor_files():
        (share / rel).parent.mkdir(parents=True, exist_ok=True)
        (share / rel).symlink_to(FIT / rel)
    return share


@pytest.fixture
def no_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-style world: no source tree, empty prefixes, no ament index."""
    from pnv_ros.model import fitting

    monkeypatch.setattr(fitting, "_SOURCE_ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr("site.USER_BASE", str(tmp_path / "user"))
    monkeypatch.setitem(sys.modules, "ament_index_python", None)  # import fails
    monkeypatch.setitem(sys.modules, "ament_index_python.packages", None)
    return tmp_path


def test_fitting_set_found_in_pip_prefix_share(no_checkout: Path) -> None:
    from pnv_ros.images import list_images
    from pnv_ros.model.default_model import find_fitting_set, fitting_set_candidates

    share = _fake_share(no_checkout / "venv")
    cands = fitting_set_candidates()
    assert cands[0] == no_checkout / "site-packages" / "data" / "corridor_vprbench"  # the source tree first
    assert cands[1] == share
    found = find_fitting_set()
    assert found == [share / "ref", share / "query"]
    # The same images in the same order as the checkout's: the default model comes out bit-identical.
    repo_images = list_images([FIT / "ref", FIT / "query"])
    got = list_images(found)
    assert [p.relative_to(share) for p in got] == [p.relative_to(FIT) for p in repo_images]
    assert [p.resolve() for p in got] == [p.resolve() for p in repo_images]


def test_fitting_set_found_through_the_ament_index(no_checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pnv_ros.model.default_model import find_fitting_set

    share = _fake_share(no_checkout / "colcon_install" / "pnv_ros")
    packages = types.ModuleType("ament_index_python.packages")
    packages.get_package_share_directory = lambda name: str(share.parent.parent) if name == "pnv_ros" else None
    monkeypatch.setitem(sys.modules, "ament_index_python", types.ModuleType("ament_index_python"))
    monkeypatch.setitem(sys.modules, "ament_index_python.packages", packages)
    assert find_fitting_set() == [share / "ref", share / "query"]


def test_fitting_set_source_tree_wins_over_installed_copies(tmp_path: Path) -> None:
    from pnv_ros.model.default_model import find_fitting_set

    first, second = _fake_share(tmp_path / "a"), _fake_share(tmp_path / "b")
    assert find_fitting_set([tmp_path / "missing", first, second]) == [first / "ref", first / "query"]


def test_missing_fitting_set_is_one_clear_error(no_checkout: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from pnv_ros.cli import main
    from pnv_ros.errors import CheckpointError
    from pnv_ros.model.default_model import find_fitting_set, fitting_set_candidates

    half = no_checkout / "venv" / "share" / "pnv_ros" / "data" / "corridor_vprbench"
    (half / "ref").mkdir(parents=True)  # ref without query does not count
    with pytest.raises(CheckpointError) as e:
        find_fitting_set()
    for c in fitting_set_candidates():
        assert str(c) in str(e.value)
    assert "--fit DIR" in str(e.value)
    # Through the CLI: one 'error:' line, exit 1, nothing built.
    monkeypatch.setenv("PNV_CACHE_DIR", str(no_checkout / "cache"))
    assert main(["models", "build-default", "-q"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--fit DIR" in lines[0] and str(half) in lines[0], err
    assert not (no_checkout / "cache" / "models" / "pnv_default_WPCA512.pth.tar").exists()


def test_wheel_carries_the_fitting_set(tmp_path: Path) -> None:
    """pip mode for real: a wheel built from a copy of the sources holds the set under share/pnv_ros/data."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pnv_ros", src / "pnv_ros", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(FIT, src / "data" / "corridor_vprbench")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."]
    r = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("pnv_ros-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = {n.split(".data/data/share/pnv_ros/data/corridor_vprbench/", 1)[1] for n in names if ".data/data/" in n}
    assert data == _corridor_files()


# ---------------------------------------------------------------- scripts/setup.sh


def _pip_q() -> str:
    text = (REPO / "scripts" / "setup.sh").read_text()
    m = re.search(r"^pip_q\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert m, "scripts/setup.sh: pip_q() not found"
    return m.group(0)


FAKE_PIP = """#!/usr/bin/env bash
case "$*" in
  *broken-pkg*) echo "WARNING: Location 'x' is ignored"
                echo "ERROR: No matching distribution found for broken-pkg" >&2; exit 1;;
  *quiet-pkg*) echo "WARNING: Location 'y' is ignored"; exit 0;;
  *) echo "Successfully installed fine-pkg"; exit 0;;
esac
"""


def test_setup_sh_stops_on_a_failed_pip(tmp_path: Path) -> None:
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "setup.sh")], check=True)
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_PIP)
    fake.chmod(0o755)

    def run(*pkgs: str) -> subprocess.CompletedProcess:
        steps = "".join(f"pip_q install {p}; echo done-{p}\n" for p in pkgs)
        script = f"set -euo pipefail\n{_pip_q()}{steps}"
        return subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)

    ok = run("fine-pkg", "quiet-pkg")  # a filter that prints nothing is not a failure
    assert ok.returncode == 0 and "done-fine-pkg" in ok.stdout and "done-quiet-pkg" in ok.stdout, ok
    assert "WARNING: Location" not in ok.stdout + ok.stderr
    bad = run("fine-pkg", "broken-pkg", "fine-pkg2")
    assert bad.returncode != 0
    assert "No matching distribution found for broken-pkg" in bad.stdout + bad.stderr  # pip's own error
    assert "done-broken-pkg" not in bad.stdout and "done-fine-pkg2" not in bad.stdout
    assert "WARNING: Location" not in bad.stdout + bad.stderr


def test_setup_sh_routes_every_pip_install_through_pip_q() -> None:
    text = (REPO / "scripts" / "setup.sh").read_text().replace(_pip_q(), "")
    assert not re.search(r"pip install", text.replace("pip_q install", "")), "a pip install bypasses pip_q"
    for line in text.splitlines():
        if "pip" in line and "|| true" in line:
            assert "pip check" in line, f"pip failure hidden: {line}"
    for step in (
        "-r requirements.txt",
        "--no-build-isolation -e . --config-settings editable_mode=compat",
        "--no-deps patchnetvlad==0.1.8",
    ):
        assert f"pip_q install -q {step}" in text


# ---------------------------------------------------------------- launch files


def _xml_launch() -> tuple[dict[str, str], ET.Element]:
    root = ET.parse(LAUNCH_XML).getroot()
    assert root.tag == "launch"
    args = {a.get("name"): a.get("default") for a in root.findall("arg")}
    (node,) = root.findall("node")
    return args, node


def test_xml_launch_declares_the_arguments_and_wires_them() -> None:
    args, node = _xml_launch()
    assert set(args) == LAUNCH_ARGS
    for name, default in LAUNCH_DEFAULTS.items():
        empty_strings = ("checkpoint", "fleet_dsn", "robot_id")
        value = yaml.safe_load(args[name]) if name in empty_strings else args[name]  # '' = YAML's empty string
        assert value == default, (name, args[name])
    assert args["params_file"] == "$(find-pkg-share pnv_ros)/config/$(var preset).yaml"
    assert (node.get("pkg"), node.get("exec"), node.get("name")) == ("pnv_ros", "loop_closure_node", "loop_closure")
    assert node.get("namespace") == "$(var namespace)"
    remaps = {r.get("from"): r.get("to") for r in node.findall("remap")}
    assert remaps == {topic: f"$(var {arg})" for topic, arg in LAUNCH_REMAPS.items()}
    params = node.findall("param")
    assert params[0].attrib == {"from": "$(var params_file)"}  # first, so the arguments override it
    assert {p.get("name"): p.get("value") for p in params[1:]} == {n: f"$(var {n})" for n in LAUNCH_PARAMS}


def test_launch_parameters_exist_and_presets_have_files() -> None:
    node_src = "\n".join(p.read_text() for p in (REPO / "pnv_ros" / "ros").rglob("*.py"))
    for name in set(LAUNCH_PARAMS) - {"use_sim_time"}:  # use_sim_time: every rclpy node has it
        assert re.search(rf"""["']{name}["']""", node_src), f"the node has no parameter {name!r}"
    for preset in ("performance", "speed", "storage"):
        assert (REPO / "config" / f"{preset}.yaml").is_file()


def test_python_launch_declares_the_same_arguments_as_the_xml() -> None:
    source = LAUNCH_PY.read_text()
    tree = ast.parse(compile(source, str(LAUNCH_PY), "exec", ast.PyCF_ONLY_AST), str(LAUNCH_PY))
    consts = {
        t.id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id in ("ARGUMENTS", "REMAPS")
    }
    declared = {name for name, _default, _text in consts["ARGUMENTS"]}
    declared |= {
        c.args[0].value
        for c in ast.walk(tree)
        if isinstance(c, ast.Call)
        and getattr(c.func, "id", None) == "DeclareLaunchArgument"
        and c.args
        and isinstance(c.args[0], ast.Constant)
    }
    assert declared == set(_xml_launch()[0]) == LAUNCH_ARGS
    assert dict(consts["REMAPS"]) == LAUNCH_REMAPS


class _Rec:
    """A stand-in for a launch class: records its arguments."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and (self.args, self.kwargs) == (other.args, other.kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.args}{self.kwargs}"


def _stub_launch(monkeypatch: pytest.MonkeyPatch) -> dict[str, type]:
    classes = {
        n: type(n, (_Rec,), {})
        for n in (
            "LaunchDescription",
            "DeclareLaunchArgument",
            "LaunchConfiguration",
            "Node",
            "ParameterValue",
            "FindPackageShare",
        )
    }
    modules = {
        "launch": ["LaunchDescription"],
        "launch.actions": ["DeclareLaunchArgument"],
        "launch.substitutions": ["LaunchConfiguration"],
        "launch_ros": [],
        "launch_ros.actions": ["Node"],
        "launch_ros.parameter_descriptions": ["ParameterValue"],
        "launch_ros.substitutions": ["FindPackageShare"],
    }
    for name, members in modules.items():
        m = types.ModuleType(name)
        for c in members:
            setattr(m, c, classes[c])
        monkeypatch.setitem(sys.modules, name, m)
    return classes


def test_python_launch_builds_the_same_node_as_the_xml(monkeypatch: pytest.MonkeyPatch) -> None:
    k = _stub_launch(monkeypatch)
    spec = importlib.util.spec_from_file_location("pnv_launch_under_test", LAUNCH_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    assert isinstance(ld, k["LaunchDescription"])
    (entities,) = ld.args
    decls = {e.args[0]: e.kwargs["default_value"] for e in entities if isinstance(e, k["DeclareLaunchArgument"])}
    assert set(decls) == LAUNCH_ARGS
    assert {n: decls[n] for n in LAUNCH_DEFAULTS} == LAUNCH_DEFAULTS
    cfg = k["LaunchConfiguration"]
    assert decls["params_file"] == [k["FindPackageShare"]("pnv_ros"), "/config/", cfg("preset"), ".yaml"]
    (node,) = [e for e in entities if isinstance(e, k["Node"])]
    kw = node.kwargs
    assert (kw["package"], kw["executable"], kw["name"]) == ("pnv_ros", "loop_closure_node", "loop_closure")
    assert kw["namespace"] == cfg("namespace")
    assert dict(kw["remappings"]) == {topic: cfg(arg) for topic, arg in LAUNCH_REMAPS.items()}
    params_file, overrides = kw["parameters"]
    assert params_file == cfg("params_file")  # first, so the arguments override it
    assert overrides == {n: k["ParameterValue"](cfg(n), value_type=t) for n, t in LAUNCH_PARAMS.items()}


def test_preset_files_apply_to_a_namespaced_node() -> None:
    for preset in ("performance", "speed", "storage"):
        keys = set(yaml.safe_load((REPO / "config" / f"{preset}.yaml").read_text()))
        assert keys == {"/**"}, f"config/{preset}.yaml keys {keys}"


def test_preset_files_name_only_real_parameters_with_valid_values() -> None:
    """A typo in a params file would be silently ignored by ROS: every key must be in the node's table."""
    from pnv_ros.ros import params

    for preset in ("performance", "speed", "storage"):
        values = yaml.safe_load((REPO / "config" / f"{preset}.yaml").read_text())["/**"]["ros__parameters"]
        assert set(values) <= set(params.BY_NAME), set(values) - set(params.BY_NAME)
        for name, value in values.items():
            params.check(name, value)  # raises ConfigError for a bad value
        assert values["preset"] == preset
