"""benchmarks/gpu_matrix.sh without a GPU: its refusal, its runs and table on faked GPUs, the labels it reads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from tests.dist_helpers import clean_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_matrix.sh"
COMBINATIONS = [(a, z, c) for a in ("xformers", "sdpa") for z in ("0", "2", "3") for c in ("off", "on")]
# What benchmarks/throughput.py prints (labels only matter), for the faked runs.
FAKE_OUTPUT = """config c  model m  attention a  zero 2  precision bf16  world 2  micro 4  accum 1
samples/s 123.4  step 5.6 ms (median of 20; min 5.5, max 5.9)
  data 0.0 ms  forward 1.0 ms  backward 2.0 ms  optimizer 2.6 ms
peak memory 3.21 GiB (CUDA max_memory_allocated)
achieved 1.0 GFLOP/s per rank  bfloat16 matmul peak 2.0 GFLOP/s  MFU 41.0%"""


def _matrix_table():
    spec = importlib.util.spec_from_file_location("matrix_table", ROOT / "benchmarks" / "matrix_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_gpu_bin(folder: Path) -> Path:
    """A `python` faking 2 GPUs and throughput.py's output, and a `deepspeed` launcher next to it."""
    # Everything else (reading the config, writing the table) goes to the real interpreter; the
    # xformers ZeRO-0 run without checkpointing runs out of memory.
    folder.mkdir()
    python = folder / "python"
    python.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *torch.cuda.device_count*) echo "2 Fake GPU" ;;
  *throughput.py*)
    echo "ARGS $*"
    case "$*" in *"attention=xformers deepspeed.zero_stage=0 model.grad_checkpointing=false"*)
      echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" >&2; exit 1 ;;
    esac
    cat <<'EOF'
{FAKE_OUTPUT}
EOF
    ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
    deepspeed = folder / "deepspeed"
    deepspeed.write_text(
        '#!/usr/bin/env bash\n[ "$1 $2" = "--num_gpus 2" ] || exit 9\nshift 2\nexec "$(dirname "$0")/python" "$@"\n'
    )
    python.chmod(0o755)
    deepspeed.chmod(0o755)
    return python


@pytest.mark.timeout(60)
def test_without_cuda_it_exits_2_with_one_line(tmp_path: Path) -> None:
    env = dict(clean_env(), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out.md")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out.md").exists()
    bad = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out.md"), "--gpus", "two"], env=env, capture_output=True)
    assert bad.returncode == 2


@pytest.mark.timeout(120)
def test_matrix_runs_every_combination_and_writes_the_table(tmp_path: Path) -> None:
    env = dict(clean_env(), PYTHON=str(_fake_gpu_bin(tmp_path / "bin")))
    out = tmp_path / "matrix.md"
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--steps", "5", "--", "model.precision=bf16"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr  # the run that ran out of memory
    lines = out.read_text().splitlines()
    assert lines[0].startswith("## GPU matrix: tic_debug.yaml, micro-batch 128 per GPU, 2 x Fake GPU, 5 timed steps")
    assert lines[2] == "| attention | ZeRO | grad ckpt | precision | samples/s | step ms | peak memory | MFU |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[4:]]
    assert [tuple(r[:3]) for r in rows] == COMBINATIONS
    assert rows[0][3:] == ["?", "failed: out of memory", "", "", ""]
    assert all(r[3:] == ["bf16", "123.4", "5.6", "3.21 GiB", "41.0%"] for r in rows[1:])
    args = (tmp_path / "matrix.md.logs" / "sdpa_zero3_ckpt-on.log").read_text().splitlines()[0]
    for expected in (
        "--steps 5",
        "model.attention=sdpa",
        "deepspeed.zero_stage=3",
        "model.grad_checkpointing=true",
        "train.micro_batch=128",
        "train.global_batch=256",
        "model.precision=bf16",
    ):
        assert expected in args


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_labels_match_the_real_throughput_output(tmp_path: Path) -> None:
    """The labels gpu_matrix.sh reads, in what benchmarks/throughput.py prints today (CPU run)."""
    model = tmp_path / "tiny-vit.json"
    model.write_text(json.dumps(TINY_MODEL))
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "throughput.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--steps",
        "2",
        "--warmup",
        "1",
        f"model.name={model}",
        "train.global_batch=8",
        "train.micro_batch=8",
    ]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    found = _matrix_table().figures(done.stdout)
    assert "?" not in found.values(), (found, done.stdout)
    assert found["precision"] == "fp32" and float(found["samples/s"]) > 0 and found["MFU"].endswith("%")
