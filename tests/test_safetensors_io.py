"""Our NumPy safetensors reader/writer against the reference `safetensors` library."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from lcm_jax.errors import WeightsError
from lcm_jax.safetensors_io import (
  SafetensorsFile,
  ShardedSafetensors,
  write_safetensors,
)


def _arrays():
  rng = np.random.default_rng(0)
  return {
      "a.weight": rng.standard_normal((3, 4, 2, 2)).astype(np.float32),
      "b.bias": rng.standard_normal(5).astype(np.float16),
      "c.ids": np.arange(7, dtype=np.int64),
      "d.scalar": np.array(1.5, dtype=np.float32),
  }


def test_reads_what_the_reference_writes(tmp_path):
  arrays = _arrays()
  safetensors.numpy.save_file(arrays, tmp_path / "x.safetensors", metadata={"format": "pt"})
  f = SafetensorsFile(tmp_path / "x.safetensors")
  assert set(f) == set(arrays)
  assert f.metadata == {"format": "pt"}
  for k, v in arrays.items():
    assert f[k].dtype == v.dtype and f.shape(k) == v.shape
    np.testing.assert_array_equal(f[k], v)


def test_reference_reads_what_we_write_including_bf16(tmp_path):
  arrays = _arrays()
  bf16 = torch.randn(4, 3, dtype=torch.bfloat16)
  arrays["e.bf16"] = bf16.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  write_safetensors(tmp_path / "y.safetensors", arrays, metadata={"format": "pt"})
  loaded = safetensors.torch.load_file(tmp_path / "y.safetensors")
  assert set(loaded) == set(arrays)
  assert loaded["e.bf16"].dtype == torch.bfloat16
  assert torch.equal(loaded["e.bf16"], bf16)
  for k in ("a.weight", "b.bias", "c.ids", "d.scalar"):
    assert tuple(loaded[k].shape) == arrays[k].shape, k  # a 0-d tensor stays 0-d
    np.testing.assert_array_equal(loaded[k].numpy(), arrays[k])
  # and our reader gives back the same bytes
  np.testing.assert_array_equal(SafetensorsFile(tmp_path / "y.safetensors")["e.bf16"].view(np.int16),
                                bf16.view(torch.int16).numpy())


def test_sharded_union_and_duplicate_names(tmp_path):
  safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, tmp_path / "1.safetensors")
  safetensors.numpy.save_file({"y": np.zeros(3, np.float32)}, tmp_path / "2.safetensors")
  s = ShardedSafetensors([str(tmp_path / "1.safetensors"), str(tmp_path / "2.safetensors")])
  assert sorted(s) == ["x", "y"] and s.shape("y") == (3,)
  safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, tmp_path / "3.safetensors")
  with pytest.raises(WeightsError, match="appears in both"):
    ShardedSafetensors([str(tmp_path / "1.safetensors"), str(tmp_path / "3.safetensors")])


def test_garbage_and_truncated_files_are_clear_errors(tmp_path):
  (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
  with pytest.raises(WeightsError, match="not a readable safetensors file"):
    SafetensorsFile(tmp_path / "bad.safetensors")
  safetensors.numpy.save_file({"x": np.ones(100, np.float32)}, tmp_path / "t.safetensors")
  data = (tmp_path / "t.safetensors").read_bytes()
  (tmp_path / "t.safetensors").write_bytes(data[:-40])
  with pytest.raises(WeightsError, match="truncated"):
    SafetensorsFile(tmp_path / "t.safetensors")["x"]


def _with_header(path, header: dict, data: bytes = b"") -> None:
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_hostile_headers_are_refused_before_anything_is_allocated(tmp_path):
  """A header length of 2^62, headers that are not objects, tensors whose byte ranges lie
  outside the file or do not match their shape: each one line, at open."""
  path = tmp_path / "h.safetensors"
  path.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
  with pytest.raises(WeightsError, match=r"header claims 4611686018427387904 bytes"):
    SafetensorsFile(path)
  _with_header(path, [1, 2])
  with pytest.raises(WeightsError, match="not a JSON object"):
    SafetensorsFile(path)
  _with_header(path, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
  with pytest.raises(WeightsError, match="truncated .tensor 'x' ends at byte 16 of 8"):
    SafetensorsFile(path)
  _with_header(path, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16)
  with pytest.raises(WeightsError, match=r"shape \[4\] \(F32\) does not match its byte range \[0, 12\)"):
    SafetensorsFile(path)
  _with_header(path, {"x": {"dtype": "F32", "shape": [4]}}, b"\0" * 16)
  with pytest.raises(WeightsError, match="malformed header entry"):
    SafetensorsFile(path)
  _with_header(path, {"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
  with pytest.raises(WeightsError, match="unsupported dtype C64"):
    SafetensorsFile(path)
  _with_header(path, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
  assert SafetensorsFile(path)["x"].tolist() == [0.0, 0.0]  # and a sound one opens


def _sparse(path, size: int) -> None:
  """A file of `size` bytes that takes no disk space (and would take minutes to read)."""
  with open(path, "wb") as f:
    f.truncate(size)


def test_json_files_over_the_bound_are_refused_without_reading_them(tmp_path):
  """A 64 GiB model_index.json, latent-cache metadata.json or data-iterator state file: one
  LcmJaxError naming the size, at once (reading any of them would take minutes and all memory)."""
  import time

  from etils import epath

  from lcm_jax.checkpoint import DataIteratorHandler
  from lcm_jax.data.latents import read_metadata
  from lcm_jax.errors import LcmJaxError
  from lcm_jax.load import load_pipeline

  huge = 2 ** 36
  t0 = time.perf_counter()
  (tmp_path / "model").mkdir()
  _sparse(tmp_path / "model" / "model_index.json", huge)
  with pytest.raises(LcmJaxError, match=f"model_index.json is {huge} bytes, more than the {2 ** 26} bytes"):
    load_pipeline(str(tmp_path / "model"))
  (tmp_path / "cache").mkdir()
  _sparse(tmp_path / "cache" / "metadata.json", huge)
  with pytest.raises(LcmJaxError, match=f"metadata.json is {huge} bytes"):
    read_metadata(str(tmp_path / "cache"))
  _sparse(tmp_path / "process_0-of-1.json", huge)
  with pytest.raises(LcmJaxError, match=f"process_0-of-1.json is {huge} bytes"):
    DataIteratorHandler._read(epath.Path(tmp_path / "process_0-of-1.json"))
  assert time.perf_counter() - t0 < 30


def test_sample_cli_refuses_an_oversized_model_index_with_one_line(tmp_path):
  import subprocess
  import sys

  from tests.helpers import REPO

  (tmp_path / "model").mkdir()
  _sparse(tmp_path / "model" / "model_index.json", 2 ** 36)
  r = subprocess.run([sys.executable, "-m", "lcm_jax.sample", "--model=model", "--prompt=a", "--output=out"],
                     cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=300)
  lines = r.stderr.splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  assert "model_index.json is 68719476736 bytes" in lines[0]
  assert not (tmp_path / "out").exists()
