"""Device profiles: the shipped YAML files, detection on fake hardware trees, sensors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.profiles import (
    SensorReader,
    detect_profile,
    list_profiles,
    load_profile,
    normalize_arch,
    parse_profile,
    read_sensors,
    runtime_options,
)
from agent.profiles.loading import ENV_DIR
from agent.runtimes import ProviderSpec, get_backend
from agent.runtimes.litert import PROBE_MODEL as TFLITE_PROBE
from agent.runtimes.onnx import PROBE_MODEL as ONNX_PROBE
from tests.agent.fixtures.fake_machine import (
    FAKE_HARDWARE,
    ORIN_NANO_CPUINFO,
    PI4_CPUINFO,
    XAVIER_CPUINFO,
    FakeMachine,
    coral_usb,
    raspberry_pi_5,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO / "device_profiles"
SHIPPED = list_profiles([SHIPPED_DIR])
CPU_ONLY = {"CPUExecutionProvider"}


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path / "root")


def detect(m: FakeMachine, arch: str, providers: set[str] = CPU_ONLY) -> str:
    return detect_profile(m.root, providers, arch, profiles=SHIPPED).profile.name


# --- the shipped profiles ------------------------------------------------------------


def test_the_promised_profiles_ship() -> None:
    names = {p.name for p in SHIPPED}
    assert names >= {
        "jetson-orin",
        "jetson-xavier",
        "raspberry-pi-5",
        "raspberry-pi-4",
        "coral-dev-board",
        "coral-usb",
        "rockchip-rk3588",
        "intel-x86-openvino",
        "generic-arm64",
        "generic-x86_64",
    }


@pytest.mark.parametrize("path", sorted(SHIPPED_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_validates(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert profile.source == path
    assert profile.description
    for fmt in ("onnx", "tflite"):
        chain = profile.chain(fmt)
        assert chain, f"{fmt} chain is empty"
    # Specific profiles say how to recognise the board; only generic ones have no rules.
    assert bool(profile.detect) == (not profile.name.startswith("generic-"))
    assert profile.memory.headroom_mib > 0


def test_every_shipped_profile_has_a_fake_machine() -> None:
    assert set(FAKE_HARDWARE) == {p.name for p in SHIPPED}


def test_accelerator_profiles_require_their_accelerator() -> None:
    by_name = {p.name: p for p in SHIPPED}
    assert by_name["jetson-orin"].required_accelerator == ("tensorrt", "cuda")
    assert by_name["coral-usb"].required_accelerator == ("edgetpu",)
    assert by_name["coral-dev-board"].required_accelerator == ("edgetpu",)
    assert by_name["raspberry-pi-5"].required_accelerator == ()
    assert [s.name for s in by_name["jetson-orin"].chain("onnx")] == ["tensorrt", "cuda", "cpu"]
    assert [s.name for s in by_name["coral-usb"].chain("tflite")] == ["edgetpu", "xnnpack"]


# --- detection -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAKE_HARDWARE))
def test_each_fake_machine_selects_exactly_its_profile(machine: FakeMachine, name: str) -> None:
    arch, providers, build = FAKE_HARDWARE[name]
    build(machine)
    detection = detect_profile(machine.root, providers, arch, profiles=SHIPPED)
    assert detection.profile.name == name
    assert detection.candidates[0] == name
    if name.startswith("generic-"):
        assert detection.matched == ()
        assert "fallback" in detection.reason
    else:
        assert detection.matched, "a specific profile must say which rule matched"


def test_empty_tree_falls_back_per_arch(machine: FakeMachine) -> None:
    machine.root.mkdir()
    assert detect(machine, "aarch64") == "generic-arm64"
    assert detect(machine, "x86_64") == "generic-x86_64"
    assert detect(machine, "arm64") == "generic-arm64"  # macOS spelling
    openvino = {"OpenVINOExecutionProvider", "CPUExecutionProvider"}
    assert detect(machine, "x86_64", openvino) == "intel-x86-openvino"


def test_no_profile_for_the_arch_is_a_config_error(machine: FakeMachine) -> None:
    machine.root.mkdir()
    with pytest.raises(ConfigError) as err:
        detect_profile(machine.root, CPU_ONLY, "riscv64", profiles=SHIPPED)
    assert err.value.code == "profile_not_found"
    assert "riscv64" in err.value.message


def test_reason_names_the_matching_rule(machine: FakeMachine) -> None:
    raspberry_pi_5(machine)
    detection = detect_profile(machine.root, CPU_ONLY, "aarch64", profiles=SHIPPED)
    assert "'Raspberry Pi 5 Model B Rev 1.0'" in detection.reason
    assert detection.to_dict()["candidates"] == ["raspberry-pi-5", "generic-arm64"]


def test_device_tree_model_alone_is_enough(machine: FakeMachine) -> None:
    machine.model("NVIDIA Jetson AGX Orin Developer Kit")
    assert detect(machine, "aarch64") == "generic-arm64"  # 'Orin' in the model is not a rule
    machine.compatible("nvidia,p3737-0000+p3701-0000", "nvidia,p3701-0000", "nvidia,tegra234")
    assert detect(machine, "aarch64") == "jetson-orin"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("Raspberry Pi 4 Model B Rev 1.4", "raspberry-pi-4"),
        ("Raspberry Pi 400 Rev 1.0", "raspberry-pi-4"),
        ("Raspberry Pi Compute Module 4 Rev 1.0", "raspberry-pi-4"),
        ("Raspberry Pi 5 Model B Rev 1.0", "raspberry-pi-5"),
        ("Raspberry Pi Compute Module 5 Rev 1.0", "raspberry-pi-5"),
        ("Raspberry Pi 3 Model B Plus Rev 1.3", "generic-arm64"),
        ("Google i.MX8MQ Phanbell", "coral-dev-board"),
        ("Rockchip RK3588 EVB1 V10 Board", "rockchip-rk3588"),
    ],
)
def test_device_tree_models(machine: FakeMachine, model: str, expected: str) -> None:
    machine.model(model)
    assert detect(machine, "aarch64") == expected


def test_inside_a_container_jetsons_are_told_apart_by_cpuinfo(machine: FakeMachine) -> None:
    # Docker hides /proc/device-tree; L4T containers still see the release file.
    machine.write("/etc/nv_tegra_release", "# R35 (release), REVISION: 5.0\n")
    machine.cpuinfo(ORIN_NANO_CPUINFO)
    assert detect(machine, "aarch64") == "jetson-orin"
    machine.cpuinfo(XAVIER_CPUINFO)
    assert detect(machine, "aarch64") == "jetson-xavier"
    machine.cpuinfo("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n")
    assert detect(machine, "aarch64") == "generic-arm64"


def test_inside_a_container_a_pi_is_known_by_cpuinfo(machine: FakeMachine) -> None:
    machine.cpuinfo(PI4_CPUINFO)
    assert detect(machine, "aarch64") == "raspberry-pi-4"


def test_an_accelerator_beats_the_host_board(machine: FakeMachine) -> None:
    raspberry_pi_5(machine)
    coral_usb(machine)
    detection = detect_profile(machine.root, CPU_ONLY, "aarch64", profiles=SHIPPED)
    assert detection.profile.name == "coral-usb"
    assert detection.candidates == ("coral-usb", "raspberry-pi-5", "generic-arm64")
    assert detection.reason == "USB device 18d1:9302 is present"


def test_coral_usb_before_its_firmware_is_loaded(machine: FakeMachine) -> None:
    machine.usb("3-2", "1a6e", "089a")
    assert detect(machine, "x86_64") == "coral-usb"


def test_arch_filters_profiles(machine: FakeMachine) -> None:
    raspberry_pi_5(machine)
    assert detect(machine, "x86_64") == "generic-x86_64"


def test_providers_are_asked_of_onnxruntime_when_not_given(machine: FakeMachine) -> None:
    machine.root.mkdir()
    has_openvino = "OpenVINOExecutionProvider" in get_backend("onnx").available_providers()
    expected = "intel-x86-openvino" if has_openvino else "generic-x86_64"
    assert detect_profile(machine.root, None, "x86_64", profiles=SHIPPED).profile.name == expected


def test_normalize_arch() -> None:
    assert normalize_arch("AMD64") == "x86_64"
    assert normalize_arch("arm64") == "aarch64"
    assert normalize_arch("aarch64") == "aarch64"


# --- invalid profiles ----------------------------------------------------------------

GOOD = """\
name: raspberry-pi-5
arch: [aarch64]
detect:
  - device_tree_model: '^Raspberry Pi 5'
runtimes:
  onnx:
    providers: [cpu]
"""


def write_profile(folder: Path, text: str, name: str = "raspberry-pi-5") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("providers: [cpu]", "providers: [cpux]", "runtimes.onnx.providers.0: Input tag 'cpux'"),
        (
            "providers: [cpu]",
            "providers: [{name: tensorrt, options: {fp61: true}}]",
            "runtimes.onnx.providers.0.tensorrt.options.fp61: Extra inputs are not permitted",
        ),
        ("providers: [cpu]", "providers: [edgetpu]", "runtimes.onnx.providers.0: Input tag"),
        ("providers: [cpu]", "providers: [cpu, cpu]", "provider listed twice: cpu"),
        ("providers: [cpu]", "providers: []", "runtimes.onnx: a chain needs at least one provider"),
        ("arch: [aarch64]", "arch: [mips]", "arch.0: Input should be"),
        ("arch: [aarch64]", "arch: [aarch64]\nthreds: {intra_op: 4}", "threds: Extra inputs"),
        ("'^Raspberry Pi 5'", "'^Raspberry (Pi 5'", "detect.0.device_tree_model: invalid regular"),
        ("- device_tree_model: '^Raspberry Pi 5'", "- {}", "detect.0: a detect rule needs"),
        ("arch: [aarch64]", "arch: [aarch64]\nrequired_accelerator: edgetpu", "is in no runtimes"),
        ("name: raspberry-pi-5", "name: raspberry-pi-6", "name: 'raspberry-pi-6' differs from"),
        (
            "arch: [aarch64]",
            "arch: [aarch64]\nsensors: {loads: [{name: t, path: /a}, {name: t, path: /b}]}",
            "sensors: sensor name used twice: t",
        ),
        (
            "arch: [aarch64]",
            "arch: [aarch64]\nsensors: {temperatures: [{name: t, path: sys/t}]}",
            "sensors.temperatures.0.path: 'sys/t' is not an absolute path",
        ),
    ],
)
def test_an_invalid_profile_names_the_file_and_field(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in GOOD
    path = write_profile(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert err.value.code == "config_invalid"
    assert err.value.message.startswith(f"{path}: ")
    assert expected in err.value.message
    assert "\n" not in err.value.message


def test_the_good_profile_is_good(tmp_path: Path) -> None:
    assert load_profile(write_profile(tmp_path, GOOD)).name == "raspberry-pi-5"


def test_yaml_syntax_errors_give_the_line(tmp_path: Path) -> None:
    path = write_profile(tmp_path, GOOD + "memory: {limit_mib: 3\n")
    with pytest.raises(ConfigError, match=r"raspberry-pi-5.yaml: invalid YAML at line \d+"):
        load_profile(path)
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        parse_profile("- a\n- b\n", Path("x.yaml"))


def test_source_is_not_a_yaml_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source: Extra inputs"):
        load_profile(write_profile(tmp_path, GOOD + "source: /etc/passwd\n"))


# --- where profiles come from ----------------------------------------------------------


def test_env_dir_overrides_a_shipped_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    custom = GOOD.replace("providers: [cpu]", "providers: [xnnpack, cpu]")
    write_profile(tmp_path / "mine", custom)
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "mine"))
    profile = load_profile("raspberry-pi-5")
    assert profile.source == tmp_path / "mine" / "raspberry-pi-5.yaml"
    assert [s.name for s in profile.chain("onnx")] == ["xnnpack", "cpu"]
    # The rest still comes from the shipped folder, once each.
    names = [p.name for p in list_profiles()]
    assert len(names) == len(set(names))
    assert "jetson-orin" in names
    assert next(p for p in list_profiles() if p.name == "raspberry-pi-5").source == profile.source


def test_an_invalid_profile_in_a_search_dir_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_profile(tmp_path, "name: broken\narch: [x86_64]\npriority: high\n", name="broken")
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"broken.yaml: priority: Input should be a valid integer"
    ):
        list_profiles()


def test_unknown_profile_name_lists_the_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DIR, raising=False)
    with pytest.raises(
        ConfigError, match=r"unknown device profile 'jetson-nano' \(known: .*jetson-orin"
    ):
        load_profile("jetson-nano")
    with pytest.raises(ConfigError, match="no such profile file"):
        load_profile("/nonexistent/x.yaml")


# --- runtime options ------------------------------------------------------------------


def test_runtime_options_follow_the_profile(tmp_path: Path) -> None:
    orin = load_profile("jetson-orin")
    options = runtime_options(orin, "onnx", tmp_path)
    assert options.providers == (
        ProviderSpec("tensorrt", {"fp16": True}),
        ProviderSpec("cuda", {}),
        ProviderSpec("cpu", {}),
    )
    assert options.intra_op_threads == 4
    assert options.inter_op_threads == 1
    assert options.cache_dir == tmp_path
    coral = runtime_options(load_profile("coral-usb"), "tflite")
    assert coral.providers[0] == ProviderSpec("edgetpu", {"device": "usb"})
    assert coral.intra_op_threads is None
    with pytest.raises(ConfigError, match="no provider chain for 'pt'"):
        runtime_options(orin, "pt")


def test_workspace_is_given_in_bytes(tmp_path: Path) -> None:
    text = GOOD.replace(
        "providers: [cpu]", "providers: [{name: tensorrt, options: {workspace_mib: 512}}, cpu]"
    )
    profile = load_profile(write_profile(tmp_path, text))
    assert profile.chain("onnx")[0] == ProviderSpec("tensorrt", {"workspace_bytes": 512 * 2**20})


def test_jetson_chain_loads_a_real_model_and_says_why_it_fell_back() -> None:
    backend = get_backend("onnx")
    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(backend.available_providers()):
        pytest.skip("this onnxruntime build has GPU providers")
    runtime = backend.load(ONNX_PROBE, runtime_options(load_profile("jetson-orin"), "onnx"))
    assert runtime.provider == "CPUExecutionProvider"
    assert [(a.provider, a.ok) for a in runtime.attempts] == [
        ("TensorrtExecutionProvider", False),
        ("CUDAExecutionProvider", False),
        ("CPUExecutionProvider", True),
    ]


def test_coral_chain_falls_back_to_xnnpack_without_libedgetpu() -> None:
    import ctypes.util

    if ctypes.util.find_library("edgetpu"):
        pytest.skip("libedgetpu is installed here")
    backend = get_backend("tflite")
    runtime = backend.load(TFLITE_PROBE, runtime_options(load_profile("coral-usb"), "tflite"))
    assert runtime.provider == "XNNPACK"
    assert runtime.attempts[0].ok is False
    assert "libedgetpu.so.1" in runtime.attempts[0].reason


def test_memory_limit() -> None:
    memory = load_profile("raspberry-pi-5").memory
    assert memory.limit_bytes(8 * 2**30) == 4 * 2**30
    assert memory.limit_bytes(None) is None
    capped = memory.model_copy(update={"limit_mib": 1024})
    assert capped.limit_bytes(8 * 2**30) == 2**30
    assert capped.limit_bytes(None) == 2**30
    assert memory.headroom_bytes == 256 * 2**20


# --- sensors ---------------------------------------------------------------------------


def test_thermal_zones_in_degrees(machine: FakeMachine) -> None:
    machine.thermal_zone(0, "cpu-thermal", 52300).thermal_zone(1, "gpu-thermal", 48150)
    readings = read_sensors(load_profile("jetson-orin"), machine.root)
    assert readings["temperatures_c"] == {"thermal.cpu-thermal": 52.3, "thermal.gpu-thermal": 48.15}
    assert readings["temperature_c"] == 52.3
    assert readings["loads_percent"] == {}  # no GPU load file on this fake


def test_absent_sensors_are_absent(machine: FakeMachine) -> None:
    machine.root.mkdir()
    readings = read_sensors(load_profile("coral-dev-board"), machine.root)
    assert readings == {"temperatures_c": {}, "loads_percent": {}, "flags": {}}
    machine.write("/sys/class/apex/apex_0/temp", "41250\n")
    readings = read_sensors(load_profile("coral-dev-board"), machine.root)
    assert readings["temperatures_c"] == {"edgetpu": 41.25}


def test_a_zone_that_cannot_be_read_is_left_out(machine: FakeMachine) -> None:
    machine.thermal_zone(0, "soc-thermal", 45000)
    machine.write("/sys/class/thermal/thermal_zone1/type", "bigcore0-thermal\n")
    (machine.root / "sys/class/thermal/thermal_zone1/temp").mkdir(parents=True)  # EISDIR
    readings = read_sensors(load_profile("rockchip-rk3588"), machine.root)
    assert readings["temperatures_c"] == {"thermal.soc-thermal": 45.0}


def test_loads(machine: FakeMachine) -> None:
    machine.write("/sys/class/devfreq/17000000.gpu/device/load", "375\n")
    assert read_sensors(load_profile("jetson-orin"), machine.root)["loads_percent"] == {"gpu": 37.5}
    rk = FakeMachine(machine.root.parent / "rk")
    rk.write("/sys/class/devfreq/fb000000.gpu/load", "23@300000000Hz\n")
    assert read_sensors(load_profile("rockchip-rk3588"), rk.root)["loads_percent"] == {"gpu": 23.0}


def test_raspberry_pi_throttling_flags(machine: FakeMachine) -> None:
    machine.write("/sys/devices/platform/soc/soc:firmware/get_throttled", "50005\n")
    flags = read_sensors(load_profile("raspberry-pi-4"), machine.root)["flags"]
    assert flags == {
        "throttled.under_voltage": True,
        "throttled.freq_capped": False,
        "throttled.throttled": True,
        "throttled.soft_temp_limit": False,
        "throttled.under_voltage_occurred": True,
        "throttled.freq_capped_occurred": False,
        "throttled.throttled_occurred": True,
        "throttled.soft_temp_limit_occurred": False,
    }


def test_pi5_throttling_found_through_the_driver(machine: FakeMachine) -> None:
    machine.write(
        "/sys/bus/platform/drivers/raspberrypi-firmware/107c000000.soc:firmware/get_throttled",
        "0\n",
    )
    machine.write("/sys/class/thermal/thermal_zone0/temp", "61850\n")
    readings = read_sensors(load_profile("raspberry-pi-5"), machine.root)
    assert readings["temperatures_c"] == {"cpu": 61.85}
    assert readings["flags"]["throttled.under_voltage"] is False


def test_reader_resolves_globs_once_and_rereads_values(machine: FakeMachine) -> None:
    for i in range(12):  # thermal_zone10 sorts after thermal_zone2
        machine.thermal_zone(i, f"zone{i}", 30000 + i * 1000)
    reader = SensorReader(load_profile("generic-x86_64").sensors, machine.root)
    assert [Path(f).parent.name for f in reader.files][:3] == [
        "thermal_zone0",
        "thermal_zone1",
        "thermal_zone2",
    ]
    assert reader.read().temperatures_c["thermal.zone11"] == 41.0
    machine.thermal_zone(11, "zone11", 90000)  # a new value is read...
    machine.thermal_zone(12, "zone12", 95000)  # ...a zone that appeared later is not
    readings = reader.read()
    assert readings.temperatures_c["thermal.zone11"] == 90.0
    assert "thermal.zone12" not in readings.temperatures_c
    assert readings.max_temperature_c == 90.0
    (machine.root / "sys/class/thermal/thermal_zone11/temp").unlink()  # a vanished file
    assert "thermal.zone11" not in reader.read().temperatures_c


def test_duplicate_labels_stay_apart(machine: FakeMachine) -> None:
    machine.thermal_zone(0, "acpitz", 40000).thermal_zone(1, "acpitz", 45000)
    temps = read_sensors(load_profile("generic-x86_64"), machine.root)["temperatures_c"]
    assert temps == {"thermal.acpitz": 40.0, "thermal.acpitz.thermal_zone1": 45.0}
