"""alignjax.train.metrics: the JSON-lines log (non-finite values as null + `nonfinite`), the
TensorBoard events read back through the TFRecord framing, purge on resume, process-0-only
writing, and the progress bar."""

import io
import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from alignjax.train import metrics as metrics_lib


def masked_crc(data):
    """TFRecord's masked CRC-32C (tensorflow/core/lib/hash/crc32c.h)."""
    crc = crc32c(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(tb_dir):
    """Every Event of every file in `tb_dir`: [u64 length][u32 crc][payload][u32 crc] records."""
    events = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
            payload = data[offset + 12 : offset + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
            assert header_crc == masked_crc(header) and payload_crc == masked_crc(payload)
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
            offset += 16 + length
    return events


def scalars(tb_dir):
    return [
        (value.tag, event.step, value.simple_value)
        for event in read_events(tb_dir)
        for value in event.summary.value
    ]


def strict_json(line):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def test_jsonl_and_tensorboard_contents(tmp_path):
    with metrics_lib.MetricsWriter(tmp_path) as writer:
        writer.write(
            1,
            {
                "loss": jnp.float32(0.5),
                "rewards/chosen": np.float64(0.25),
                "logps/rejected": jnp.bfloat16(-1.5),
                "num_tokens": np.int64(1024),
            },
        )
        writer.write(2, {"loss": float("nan"), "grad_norm": jnp.inf, "lr": 1e-3})
        writer.write(2, {"loss": 0.75}, prefix="eval/")
        # each row is on disk as soon as it is written
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line) for line in lines] == [
        {
            "step": 1,
            "loss": 0.5,
            "rewards/chosen": 0.25,
            "logps/rejected": -1.5,
            "num_tokens": 1024,
        },
        {
            "step": 2,
            "loss": None,
            "grad_norm": None,
            "lr": 1e-3,
            "nonfinite": ["loss", "grad_norm"],
        },
        {"step": 2, "eval/loss": 0.75},
    ]
    assert isinstance(strict_json(lines[0])["num_tokens"], int)
    assert metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") == [strict_json(x) for x in lines]

    got = scalars(tmp_path / "tb")
    finite = [(tag, step, value) for tag, step, value in got if math.isfinite(value)]
    assert finite == [
        ("loss", 1, 0.5),
        ("rewards/chosen", 1, 0.25),
        ("logps/rejected", 1, -1.5),
        ("num_tokens", 1, 1024.0),
        ("lr", 2, pytest.approx(1e-3)),
        ("eval/loss", 2, 0.75),
    ]
    nonfinite = {tag: value for tag, step, value in got if not math.isfinite(value)}
    assert math.isnan(nonfinite["loss"]) and nonfinite["grad_norm"] == math.inf


def test_purge_step_on_resume(tmp_path):
    with metrics_lib.MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
    with metrics_lib.MetricsWriter(tmp_path, purge_step=3) as writer:
        writer.write(3, {"loss": 30.0})
    rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
    # TensorBoard purges at read time: the second file announces the restart at step 3
    tb_files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(tb_files) == 2  # the resumed writer did not overwrite the first file
    events = read_events(tmp_path / "tb")
    starts = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [3]
    assert [s for s in scalars(tmp_path / "tb") if s[1] >= 3][-1] == ("loss", 3, 30.0)


def test_read_jsonl_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2, "lo')
    assert metrics_lib.read_jsonl(path) == [{"step": 1, "loss": 0.5}]


def test_bad_metrics(tmp_path):
    with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 3})
        with pytest.raises(TypeError, match="'eval/v' must be a scalar"):
            writer.write(1, {"v": np.ones(2)}, prefix="eval/")
    assert not (tmp_path / "tb").exists()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(2, {"loss": 1.0})


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with metrics_lib.MetricsWriter(tmp_path / "run") as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()
    out = io.StringIO()
    with metrics_lib.Progress(5, file=out) as bar:
        bar.update(tokens=10, loss=1.0)
    assert not bar.enabled and out.getvalue() == ""


def test_progress_bar(monkeypatch):
    out = io.StringIO()
    with metrics_lib.Progress(4, enabled=False, file=out) as bar:
        bar.update(tokens=100, loss=0.5)
    assert out.getvalue() == "" and bar.tokens == 0

    clock = iter([0.0, 1.0, 2.0, 3.0])  # creation, then one second per step
    monkeypatch.setattr(metrics_lib, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    with metrics_lib.Progress(5, initial=1, file=out, smoothing=0.5, mininterval=0) as bar:
        bar.update(tokens=1000, loss=jnp.float32(0.6931472))
        bar.update(tokens=3000, loss=0.25, phase="dpo")
        bar.update(2, tokens=0, loss=0.125)
    text = out.getvalue()
    assert bar.tokens == 4000
    assert bar.tokens_per_second == pytest.approx(0.5 * 3000 + 0.5 * 1000)
    assert "loss=0.6931" in text and "phase=dpo" in text and "tok/s=2e+03" in text
    assert "loss=0.125" in text and "5/5" in text
    assert "2/5" in text and "<" in text  # steps done / total, elapsed<remaining (ETA)
