"""Config validation, problem reporting by key path, secrets, and the check-config command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lineside.agent.config import EXIT_CONFIG, load_config, parse_config, resolve_secret
from lineside.agent.errors import ConfigError
from lineside.agent.sources import CameraSourceConfig, FolderSourceConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "agent.example.yaml"

MINIMAL = """\
station: cell-1
bundle:
  path: /opt/bundle
source:
  kind: folder
  path: /srv/hot
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    # given
    path = write(tmp_path, MINIMAL)

    # when
    config = load_config(path)

    # then
    assert isinstance(config.source, FolderSourceConfig)
    assert config.source.done_dir == Path("/srv/hot/done")
    assert config.source.failed_dir == Path("/srv/hot/failed")
    assert config.inference.providers == ["tensorrt", "cuda", "cpu"]
    assert config.queue_policy() == "block"
    assert [s.kind for s in config.sinks] == ["jsonl"]


def test_camera_source_defaults_to_drop_oldest_and_explicit_policy_wins() -> None:
    # given
    base = {"station": "s", "bundle": {"path": "/b"}, "source": {"kind": "camera", "uri": 0}}

    # when
    default = parse_config(base)
    explicit = parse_config({**base, "queue": {"policy": "block"}})

    # then
    assert isinstance(default.source, CameraSourceConfig)
    assert default.queue_policy() == "drop_oldest"
    assert explicit.queue_policy() == "block"


def test_unknown_keys_are_reported_with_their_key_paths(tmp_path: Path) -> None:
    # given
    path = write(tmp_path, MINIMAL + "  colour: blue\nsinks:\n  - kind: jsonl\n    path: '-'\n    rotate: daily\n")

    # when
    problems = problems_of(path)

    # then
    assert "source.colour: Extra inputs are not permitted" in problems
    assert "sinks[0].rotate: Extra inputs are not permitted" in problems


def test_every_problem_is_listed_not_just_the_first(tmp_path: Path) -> None:
    # given: a wrong type, a bad enum value, a missing field and an unknown source kind
    text = """\
station: cell-1
bundle: {}
inference:
  providers: [cuda, gpu]
  device_id: first
source:
  kind: scanner
"""
    path = write(tmp_path, text)

    # when
    problems = problems_of(path)

    # then
    joined = "\n".join(problems)
    assert "bundle.path: Field required" in problems
    assert any(p.startswith("inference.providers[1]:") and "'gpu'" in p for p in problems), joined
    assert any(p.startswith("inference.device_id:") and "integer" in p for p in problems), joined
    assert any(p.startswith("source:") and "'scanner'" in p and "folder" in p for p in problems), joined


def test_union_tag_is_not_part_of_the_key_path(tmp_path: Path) -> None:
    # given
    path = write(tmp_path, MINIMAL + "  settle_seconds: soon\n")

    # when
    problems = problems_of(path)

    # then
    assert len(problems) == 1
    assert problems[0].startswith("source.settle_seconds: ")
    assert "'soon'" in problems[0]


def test_part_id_regex_must_compile_and_use_named_groups(tmp_path: Path) -> None:
    # given
    broken = write(tmp_path, MINIMAL + "  part_id_regex: '(?P<part>[A-Z'\n")

    # when
    problems = problems_of(broken)

    # then
    assert problems[0].startswith("source.part_id_regex: ")
    assert "regular expression" in problems[0]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    # given: an unclosed flow sequence on line 4
    path = write(tmp_path, "station: a\nbundle:\n  path: /b\n  x: [1, 2\nsource: {}\n")

    # when
    problems = problems_of(path)

    # then
    assert len(problems) == 1
    assert "YAML syntax error" in problems[0]
    assert "line 5" in problems[0]


def test_empty_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    # given
    empty = write(tmp_path, "")

    # when / then
    assert problems_of(empty) == ["<top level>: found an empty document"]
    assert "No such file" in problems_of(tmp_path / "absent.yaml")[0]


def test_shipped_example_config_validates() -> None:
    # given / when
    config = load_config(EXAMPLE)

    # then
    assert config.station
    assert {s.kind for s in config.sinks} == {"jsonl", "annotate"}


def test_secret_prefers_systemd_credentials_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # given
    (tmp_path / "mqtt-password").write_text("from-credentials\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("LINESIDE_MQTT_PASSWORD", "from-env")
    monkeypatch.setenv("LINESIDE_S3_SECRET", "env-only")

    # when / then
    assert resolve_secret("mqtt-password") == "from-credentials"
    assert resolve_secret("s3.secret") == "env-only"
    assert resolve_secret("absent") is None
    with pytest.raises(ValueError):
        resolve_secret("../etc/passwd")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lineside.agent.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_check_config_cli_prints_key_paths_and_exits_78(tmp_path: Path) -> None:
    # given
    path = write(tmp_path, MINIMAL + "  bogus: 1\nqueue:\n  capacity: 0\n")

    # when
    proc = run_cli("check-config", str(path))

    # then
    assert proc.returncode == EXIT_CONFIG == 78
    assert "source.bogus: Extra inputs are not permitted" in proc.stderr
    assert "queue.capacity: " in proc.stderr
    assert proc.stdout == ""


def test_check_config_cli_accepts_the_example_file(tmp_path: Path) -> None:
    # given the sample as shipped (its paths exist on an installed box, not here)
    # when only the file is checked, and when its paths are checked too
    only_file = run_cli("check-config", "--no-paths", str(EXAMPLE))
    as_copied = run_cli("check-config", str(EXAMPLE))

    # then the file is valid; the paths missing on this machine are warnings naming their keys
    assert only_file.returncode == 0, only_file.stderr
    assert only_file.stdout.startswith("ok: station ") and only_file.stderr == ""
    assert as_copied.returncode == 0, as_copied.stderr
    assert as_copied.stdout.startswith("ok: station ") and "path warning(s)" in as_copied.stdout
    assert as_copied.stderr.startswith("warning: ") and "bundle.path: " in as_copied.stderr


def _example_on(tmp_path: Path) -> Path:
    """The sample config with every path moved under tmp_path, the way an engineer edits it for a box."""
    text = EXAMPLE.read_text()
    for old in ("/var/lib/lineside", "/var/cache/lineside", "/srv/xray"):
        text = text.replace(old, str(tmp_path / old.strip("/").replace("/", "_")))
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_check_config_accepts_the_example_once_its_folders_exist(tmp_path: Path) -> None:
    # given the sample pointed at tmp_path, with the bundle and the hot folder in place
    config = _example_on(tmp_path)
    bundle = tmp_path / "var_lib_lineside" / "bundles" / "current"
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    (tmp_path / "srv_xray" / "outgoing").mkdir(parents=True)

    # when
    proc = run_cli("check-config", "--strict", str(config))

    # then
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr


def test_check_config_names_every_missing_path_by_its_key(tmp_path: Path) -> None:
    # given the sample pointed at tmp_path, but neither bundle nor hot folder exists
    config = _example_on(tmp_path)

    # when checked strictly (as install.sh does before starting the service)
    proc = run_cli("check-config", "--strict", str(config))

    # then: exit 78, each problem under its key; folders made at start are not problems
    assert proc.returncode == EXIT_CONFIG
    problems = [line.strip() for line in proc.stderr.splitlines() if line.startswith("  ")]
    assert [p.split(":")[0] for p in problems] == ["bundle.path", "source.path"]
    assert all("does not exist" in p for p in problems)


def test_check_config_refuses_a_hot_folder_it_cannot_write(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere; the check is for the service user")
    # given a read-only hot folder
    config = _example_on(tmp_path)
    bundle = tmp_path / "var_lib_lineside" / "bundles" / "current"
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    hot = tmp_path / "srv_xray" / "outgoing"
    hot.mkdir(parents=True)
    hot.chmod(0o555)

    # when
    proc = run_cli("check-config", "--strict", str(config))

    # then
    assert proc.returncode == EXIT_CONFIG
    assert f"source.path: {hot} is not writable" in proc.stderr


def test_run_with_invalid_config_exits_78_before_loading_anything(tmp_path: Path) -> None:
    # given
    path = write(tmp_path, "station: 1 2 3\n")

    # when
    proc = subprocess.run(
        [sys.executable, "-m", "lineside.agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )

    # then
    assert proc.returncode == 78
    assert "bundle: Field required" in proc.stderr
