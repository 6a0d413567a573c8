"""Every file in accelerate_configs/ must load through Accelerate's own config code and get through
`accelerate launch`'s argument handling, so a typo fails here on CPU instead of on a rented GPU box.

What Accelerate checks by itself and what it does not (accelerate 1.15):
- `load_config_from_file` / `ClusterConfig.from_yaml_file` raise ValueError on an unknown TOP-LEVEL key, and
  `DistributedType(...)` rejects an unknown distributed_type. Those are used as they are.
- Keys INSIDE the nested sections (deepspeed_config, fsdp_config, ...) are not checked at all:
  `accelerate launch` copies each one onto its argparse namespace (`setattr(args, key, value)`, adding an
  `fsdp_` / `dynamo_` prefix when missing) and a misspelt one is silently ignored, e.g.
  `zero3_save_16bit_modle: true` would launch fine and then fail at save time. So nested keys are checked
  against the launch parser's own options, and their values against its `choices` / `type`.
- `mixed_precision` is not checked when loading either, and an unquoted `no` is the YAML boolean false.
Nothing here starts a process: the launch is simulated up to the environment it would hand to the workers, and
the DeepSpeed / FSDP plugins are built from that environment (DeepSpeed itself need not be installed).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    PrecisionType,
)
from accelerate.utils import launch as launch_utils

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"
CONFIGS = sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("*.yml")])
EXPECTED = {
    "cpu.yaml",
    "cpu_2proc.yaml",
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
    "fsdp.yaml",
    "multi_node.yaml",
}

# How `accelerate launch` names the option a nested key lands on (commands/launch.py,
# _validate_launch_command). A section missing here fails the check rather than going unchecked: add its
# prefix rule when you use it.
NESTED_PREFIX = {
    "deepspeed_config": "",
    "fsdp_config": "fsdp_",
    "dynamo_config": "dynamo_",
    "mpirun_config": "",
}


def _launch_options() -> dict[str, argparse.Action]:
    return {action.dest: action for action in launch_command_parser()._actions}


def validate_config(path: Path) -> ClusterConfig:
    """Load `path` the way `accelerate launch` does and raise on anything it would silently get wrong."""
    config = load_config_from_file(str(path))  # raises ValueError on an unknown top-level key
    assert isinstance(config, ClusterConfig), f"{path.name}: not a local-machine config"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("distributed_type", "mixed_precision"):
        # Unquoted NO / no are YAML booleans: DistributedType(False) or mixed_precision=False later.
        if key in raw and not isinstance(raw[key], str):
            raise ValueError(f"{path.name}: {key} is {raw[key]!r}, not a string; quote it ('NO', 'no')")
    precisions = PrecisionType.list()
    if config.mixed_precision is not None and config.mixed_precision not in precisions:
        raise ValueError(f"{path.name}: mixed_precision {config.mixed_precision!r} not in {precisions}")

    options = _launch_options()
    for section, value in raw.items():
        if not isinstance(value, dict) or not value:
            continue
        if section not in NESTED_PREFIX:
            raise ValueError(f"{path.name}: no key check for section {section!r}; add it to NESTED_PREFIX")
        prefix = NESTED_PREFIX[section]
        for key, item in value.items():
            where = f"{path.name}: {section}.{key}"
            dest = key if key.startswith(prefix) else prefix + key
            if dest not in options:
                raise ValueError(f"{where}: unknown key (accelerate launch has no --{dest})")
            action = options[dest]
            if action.choices is not None and str(item) not in {str(c) for c in action.choices}:
                raise ValueError(f"{where}={item!r} not in {list(action.choices)}")
            if action.type in (int, float):
                try:
                    action.type(item)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{where}={item!r} is not {action.type.__name__}") from err
    if config.num_processes > 0 and config.num_processes % config.num_machines:
        raise ValueError(f"{path.name}: num_processes must be a multiple of num_machines (it is the total)")
    return config


def simulate_launch(path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `accelerate launch --config_file path train.py` up to, not including, starting processes.

    Returns the parsed launch args and the plugin a worker would build from the environment it gets.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # skips a psutil core count that some containers cannot answer
    monkeypatch.setattr(launch_utils, "is_port_in_use", lambda port: False)  # the port is not under test
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    plugin = None
    # Same dispatch order as accelerate.commands.launch.launch_command.
    if args.use_deepspeed and not args.cpu:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = launch_utils.prepare_deepspeed_cmd_env(args)
    elif (args.use_fsdp or args.multi_gpu) and not args.cpu:
        env = launch_utils.prepare_multi_gpu_env(args)
    else:
        _, env = launch_utils.prepare_simple_launcher_cmd_env(args)
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    if args.use_deepspeed:
        plugin = DeepSpeedPlugin()
    elif args.use_fsdp:
        plugin = FullyShardedDataParallelPlugin()
    return args, plugin


def test_expected_configs_exist():
    assert {path.name for path in CONFIGS} >= EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    validate_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_gets_through_launch(path, monkeypatch):
    simulate_launch(path, monkeypatch)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_header_says_how_to_launch(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert 2 <= len(header) <= 4, f"{path.name}: want a 2-4 line leading comment"
    assert f"accelerate launch --config_file accelerate_configs/{path.name} recipes/" in "\n".join(header)


def test_cpu_is_one_plain_process():
    config = validate_config(CONFIG_DIR / "cpu.yaml")
    assert config.distributed_type == DistributedType.NO
    assert config.num_processes == 1
    assert config.use_cpu is True
    assert config.mixed_precision == "no"


def test_cpu_2proc_goes_through_torchrun_with_two_processes(monkeypatch):
    path = CONFIG_DIR / "cpu_2proc.yaml"
    config = validate_config(path)
    # MULTI_GPU, not MULTI_CPU: in accelerate 1.15 only the former is started through torchrun; MULTI_CPU runs
    # one process and expects mpirun to start the rest. The workers become MULTI_CPU/gloo because the recipes
    # build Accelerator(cpu=True) on a machine with no accelerator (tests/test_distributed.py runs it).
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_processes == 2
    assert config.num_machines == 1
    assert config.use_cpu is True
    assert config.mixed_precision == "no"
    assert "accelerate launch --config_file accelerate_configs/cpu_2proc.yaml" in path.read_text(encoding="utf-8")
    args, _ = simulate_launch(path, monkeypatch)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert args.nproc_per_node == "2"


def test_deepspeed_zero3_gathers_weights_for_save_pretrained(monkeypatch):
    _, plugin = simulate_launch(CONFIG_DIR / "deepspeed_zero3.yaml", monkeypatch)
    assert plugin.zero_stage == 3
    assert plugin.zero3_save_16bit_model is True
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # Left to the recipe's Accelerator(gradient_accumulation_steps=...).
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"


def test_deepspeed_zero2(monkeypatch):
    _, plugin = simulate_launch(CONFIG_DIR / "deepspeed_zero2.yaml", monkeypatch)
    assert plugin.zero_stage == 2
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"


def test_fsdp_is_fsdp2_transformer_wrap_sharded_checkpoints(monkeypatch):
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    _, plugin = simulate_launch(CONFIG_DIR / "fsdp.yaml", monkeypatch)
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.reshard_after_forward is True


def test_multi_node_splits_processes_over_machines(monkeypatch):
    config = validate_config(CONFIG_DIR / "multi_node.yaml")
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 0)
    assert config.main_process_ip and config.main_process_port
    args, _ = simulate_launch(CONFIG_DIR / "multi_node.yaml", monkeypatch)
    assert (args.nnodes, args.nproc_per_node) == ("2", "8")


GOOD = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "DEEPSPEED",
    "deepspeed_config": {"zero_stage": 3, "zero3_save_16bit_model": True},
    "mixed_precision": "bf16",
    "num_processes": 2,
}


def _with(**changes):
    config = {**GOOD, "deepspeed_config": dict(GOOD["deepspeed_config"])}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = config
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return config


def test_good_example_passes(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD), encoding="utf-8")
    validate_config(path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(_with(num_proceses=2), "unknown keys", id="top-level-typo"),
        pytest.param(_with(deepspeed_config__zero3_save_16bit_modle=True), "unknown key", id="nested-typo"),
        pytest.param(_with(deepspeed_config__zero_stage="three"), "is not int", id="bad-type"),
        pytest.param(_with(mixed_precision="bf32"), "mixed_precision", id="bad-precision"),
        pytest.param(_with(distributed_type="MULTI_GPUS"), "MULTI_GPUS", id="bad-distributed-type"),
        pytest.param(
            {**_with(distributed_type="FSDP"), "deepspeed_config": {}, "fsdp_config": {"fsdp_verison": 2}},
            "unknown key",
            id="nested-fsdp-typo",
        ),
        pytest.param(
            {**_with(distributed_type="FSDP"), "deepspeed_config": {}, "fsdp_config": {"fsdp_version": 3}},
            "not in",
            id="bad-choice",
        ),
    ],
)
def test_bad_config_is_rejected(tmp_path, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        validate_config(path)


def test_unquoted_no_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distributed_type: 'NO'\nmixed_precision: no\nuse_cpu: true\n", encoding="utf-8")
    with pytest.raises(ValueError, match="quote it"):
        validate_config(path)
