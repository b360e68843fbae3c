"""Config loading: nested YAML, dotted overrides, type checks, round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from properlm.config import load_config, save_config, to_dict
from properlm.errors import ConfigError


# Module level: get_type_hints cannot see classes local to a test function.
@dataclass
class Stage2:
    """Group experts (example)."""

    num_experts: int = 5
    rank: int = 4
    lr: float = 2e-4
    router: Literal["user", "text"] = "user"
    targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj"])

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")


@dataclass
class Data:
    path: str = "data/lamp2m"
    max_users: Optional[int] = None
    out: Path = Path("runs/x")


@dataclass
class Run:
    name: str = "demo"
    seed: int = 0
    flag: bool = False
    user_ids: list[int] = field(default_factory=list)
    shape: tuple[int, int] = (2, 3)
    stage2: Stage2 = field(default_factory=Stage2)
    data: Data = field(default_factory=lambda: Data(path="data/custom"))
    extra: Optional[Stage2] = None
    tags: dict[str, float] = field(default_factory=dict)


@dataclass
class Needs:
    required: int
    other: int = 1


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file():
    assert load_config(Run) == Run()


def test_nested_yaml_partial_sections(tmp_path):
    p = _yaml(tmp_path, "seed: 3\nstage2:\n  num_experts: 8\n  lr: 1e-4\ndata:\n  max_users: 10\n")
    cfg = load_config(Run, p)
    assert cfg.seed == 3
    assert cfg.stage2 == Stage2(num_experts=8, lr=1e-4)  # "1e-4" is text to PyYAML; coerced
    assert isinstance(cfg.stage2.lr, float)
    # keys not given keep the section's default instance (the factory's path, not Data's)
    assert cfg.data == Data(path="data/custom", max_users=10)


def test_overrides_all_kinds(tmp_path):
    p = _yaml(tmp_path, "stage2:\n  num_experts: 8\n")
    cfg = load_config(
        Run,
        p,
        [
            "stage2.num_experts=2",  # override beats file
            "stage2.lr=1",  # float accepts int
            "stage2.router=text",
            "stage2.targets=[down_proj]",
            "flag=true",
            "data.path=foo",
            "data.max_users=null",
            "data.out=/tmp/o",
            "user_ids=[1, 2]",
            "shape=[4, 5]",
            "name=007",  # a text field keeps what was typed
            "extra.rank=16",  # an Optional section starts from its class defaults
            "tags={a: 1}",
        ],
    )
    assert cfg.stage2 == Stage2(num_experts=2, lr=1.0, router="text", targets=["down_proj"])
    assert cfg.flag is True and cfg.name == "007"
    assert cfg.data == Data(path="foo", max_users=None, out=Path("/tmp/o"))
    assert cfg.user_ids == [1, 2] and cfg.shape == (4, 5)
    assert cfg.extra == Stage2(rank=16)
    assert cfg.tags == {"a": 1.0}


def test_section_override_as_mapping_merges():
    cfg = load_config(Run, None, ["stage2={num_experts: 3}", "stage2.rank=2"])
    assert cfg.stage2 == Stage2(num_experts=3, rank=2)


def test_empty_text_override_is_empty_string():
    assert load_config(Run, None, ["name="]).name == ""


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=1.5", "'seed' expects int, got 1.5"),
        ("seed=true", "'seed' expects int, got True"),  # bool is not an int here
        ("flag=1", "'flag' expects bool, got 1"),
        ("stage2.router=moe", "'stage2.router' expects Literal['user', 'text'], got 'moe'"),
        ("user_ids=[1, x]", "'user_ids[1]' expects int, got 'x'"),
        ("user_ids=3", "'user_ids' expects list[int], got 3"),
        ("shape=[1, 2, 3]", "'shape' expects tuple[int, int]"),
        ("stage2.lr=fast", "'stage2.lr' expects float, got 'fast'"),
        ("data.max_users=lots", "'data.max_users' expects"),
        ("stage2=5", "'stage2' expects Stage2, got 5"),
        ("name=null", "'name' expects str, got None"),
    ],
)
def test_override_type_errors(override, message):
    with pytest.raises(ConfigError, match="override") as e:
        load_config(Run, None, [override])
    assert message in str(e.value)


def test_yaml_type_error_names_file_key_type_value(tmp_path):
    p = _yaml(tmp_path, "stage2:\n  rank: four\n")
    with pytest.raises(ConfigError) as e:
        load_config(Run, p)
    assert str(p) in str(e.value) and "'stage2.rank' expects int, got 'four'" in str(e.value)


def test_bad_yaml_value_fixed_by_override_is_fine(tmp_path):
    p = _yaml(tmp_path, "stage2:\n  rank: four\n  num_experts: 0\n")
    cfg = load_config(Run, p, ["stage2.rank=4", "stage2.num_experts=2"])
    assert cfg.stage2.rank == 4 and cfg.stage2.num_experts == 2


def test_unknown_keys(tmp_path):
    p = _yaml(tmp_path, "stage2:\n  experts: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(Run, p)
    assert str(p) in str(e.value) and "'stage2.experts'" in str(e.value)

    with pytest.raises(ConfigError) as e:
        load_config(Run, None, ["stage2.experts=8"])
    msg = str(e.value)
    assert "'stage2.experts'" in msg and "num_experts, rank, lr, router, targets" in msg

    with pytest.raises(ConfigError, match="valid keys at the top level: name, seed"):
        load_config(Run, None, ["stage3.rank=1"])
    with pytest.raises(ConfigError, match="'seed' is a setting of type int, not a section"):
        load_config(Run, None, ["seed.x=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Run, None, ["seed"])


def test_post_init_error_becomes_config_error(tmp_path):
    with pytest.raises(ConfigError, match="invalid 'stage2': num_experts must be >= 1, got 0"):
        load_config(Run, None, ["stage2.num_experts=0"])
    with pytest.raises(ConfigError, match="invalid Stage2: num_experts must be >= 1"):
        load_config(Stage2, None, ["num_experts=-1"])


def test_missing_required_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'required'"):
        load_config(Needs)
    assert load_config(Needs, None, ["required=3"]) == Needs(required=3)
    with pytest.raises(ConfigError, match="malformed YAML at line 3"):
        load_config(Run, _yaml(tmp_path, "seed: 1\nstage2: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Run, _yaml(tmp_path, "- 1\n- 2\n"))
    assert load_config(Run, _yaml(tmp_path, "")) == Run()


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        Run, None, ["stage2.lr=3e-5", "extra.router=text", "shape=[7, 8]", "data.out=a/b", "tags={x: 0.5}", "name=2024"]
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    again = load_config(Run, path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(cfg)["data"]["out"] == "a/b" and to_dict(cfg)["shape"] == [7, 8]
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind
