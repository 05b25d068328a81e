"""gs:// workdirs end to end against a real GCS emulator (fake-gcs-server, tests/gcs_emulator.py):
the file layer, training that is stopped, killed or finds a corrupt object and resumes exactly,
every mode, TensorBoard events, TFDS data, and storage failures as one sentence.

Each test gets its own bucket on one emulator per session. The emulator keeps objects in memory,
and the environment points gcsfs (everything etils.epath reaches), TensorStore (orbax's arrays) and
array_record (TFDS shards) at it without credentials.
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import config_flags
from conftest import run_cli
from conftest import tiny_config
from ddpm_jax import checkpoint
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax import storage

CONFIG = tiny_config(training__num_steps=6, training__num_grid_samples=4)
TINY = config_flags(CONFIG, "data", "model", "diffusion", "training", "sampling")


def cli(workdir, *extra, mode="train", env=None, **kwargs):
  return run_cli(
    "--config=configs/digits.py",
    f"--workdir={workdir}",
    f"--mode={mode}",
    *TINY,
    *extra,
    env=env,
    **kwargs,
  )


def popen(workdir, *extra, env=None):
  """The trainer in the background, its stderr read line by line."""
  args = ["--config=configs/digits.py", f"--workdir={workdir}", *TINY, *extra]
  return subprocess.Popen(
    [sys.executable, "-m", "ddpm_jax.main", *args],
    cwd=REPO,
    env=dict(os.environ, **(env or {})),
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
  )


def read_until(proc, text: str, timeout: float = 300) -> str:
  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = proc.stderr.readline()
    lines.append(line)
    if text in line or (not line and proc.poll() is not None):
      break
  return "".join(lines)


def restored(workdir, step: int):
  """A checkpoint's train state."""
  built = state_lib.build(CONFIG)
  manager = checkpoint.make_manager(str(workdir), keep=10, read_only=True)
  abstract = state_lib.abstract_state(
    built.model, built.tx, shape=state_lib.image_shape(CONFIG), mesh=parallel.make_mesh()
  )
  state = checkpoint.restore(manager, abstract_state=abstract, step=step)
  assert int(state.step) == step
  return state


def state_of(workdir, step: int):
  """Every array of a checkpoint's train state (params, EMA, optimizer, key), as NumPy."""
  return [np.asarray(x) for x in jax.tree.leaves(restored(workdir, step))]


def assert_bitwise_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def split(url: str) -> tuple[str, str]:
  """gs://bucket/a/b -> (bucket, a/b)."""
  bucket, _, name = url[len("gs://") :].partition("/")
  return bucket, name


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  """The uninterrupted reference: 6 steps on the local disk, checkpoints at 2, 4 and 6."""
  workdir = tmp_path_factory.mktemp("local") / "run"
  result = cli(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# ----------------------------------------------------------------------------- the file layer


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("bucket") + "/root"


def test_the_file_layer_behaves_alike_on_disk_and_in_a_bucket(root):
  data = os.urandom(3 << 20)  # > one 1 MiB read: the digest is streamed
  big = storage.join(root, "a", "big.bin")
  storage.write_bytes(big, data)
  assert storage.read_bytes(big) == data and storage.size(big) == len(data)
  assert storage.sha256(big) == hashlib.sha256(data).hexdigest()
  storage.write_json(storage.join(root, "a", "b", "c.json"), {"x": [1, 2]})
  assert storage.read_json(storage.join(root, "a", "b", "c.json")) == {"x": [1, 2]}
  storage.save_npz(storage.join(root, "a", "arrays.npz"), arr_0=np.arange(5, dtype=np.uint8))
  np.testing.assert_array_equal(
    storage.load_npz(storage.join(root, "a", "arrays.npz"))["arr_0"], range(5)
  )
  assert storage.files_under(storage.join(root, "a")) == ["arrays.npz", "b/c.json", "big.bin"]
  assert storage.list_names(storage.join(root, "a")) == ["arrays.npz", "b", "big.bin"]
  assert storage.is_dir(storage.join(root, "a", "b")) and storage.is_file(big)
  assert storage.list_names(storage.join(root, "missing")) == []
  # A folder moves whole, and the name it moves to is never one that exists.
  target = storage.fresh_path(storage.join(root, "a"))
  assert target == storage.join(root, "a_1")
  storage.move(storage.join(root, "a"), target)
  assert not storage.exists(storage.join(root, "a"))
  assert storage.files_under(target) == ["arrays.npz", "b/c.json", "big.bin"]
  assert storage.read_bytes(storage.join(target, "big.bin")) == data
  storage.remove_tree(target)
  assert storage.files_under(root) == []
  with pytest.raises(FileNotFoundError, match="Could not read .*missing.bin"):
    storage.read_bytes(storage.join(root, "missing.bin"))


# Where the package may touch files without `storage`, and why: none of them is a run's file.
FILE_CALLS_ALLOWED = {
  "ddpm_jax/storage.py": "the file layer itself",
  "ddpm_jax/console.py": "the --config Python file, and /dev/null for a quiet import",
  "ddpm_jax/main.py": "the package's own folder (which log records are its own)",
  "ddpm_jax/convert/tf_format.py": "an official TF checkpoint, read by TensorFlow's own reader",
  "ddpm_jax/metrics/convert_inception.py": "a downloaded PyTorch file (torch.load needs a file)",
}
FILE_CALLS = re.compile(
  r"\bopen\(|os\.path\.|os\.makedirs|os\.rename|os\.replace|os\.remove|os\.listdir|os\.walk"
  r"|os\.stat|shutil|tempfile|pathlib|glob\.glob|np\.savez|np\.load\("
)


def test_no_module_but_storage_touches_a_run_s_files():
  """Every file of a run goes through ddpm_jax/storage.py (so gs:// works everywhere): no `open`,
  `os.path`, `shutil`, ... elsewhere, but where FILE_CALLS_ALLOWED says why."""
  found = []
  for folder, _, names in os.walk(os.path.join(REPO, "ddpm_jax")):
    for name in names:
      path = os.path.relpath(os.path.join(folder, name), REPO)
      if name.endswith(".py") and path not in FILE_CALLS_ALLOWED:
        with open(os.path.join(REPO, path)) as f:
          found += [
            f"{path}:{i}: {line.strip()}"
            for i, line in enumerate(f, 1)
            if FILE_CALLS.search(line) and "storage.open_read" not in line
          ]
  assert not found, "\n".join(found)


def test_a_missing_bucket_is_one_sentence(gcs_server):
  with pytest.raises(OSError, match="the bucket gs://no-such-bucket does not exist"):
    storage.check_reachable("gs://no-such-bucket/run", what="--workdir")
  with pytest.raises(FileNotFoundError, match="Could not write gs://no-such-bucket/x.json"):
    storage.write_json("gs://no-such-bucket/x.json", {})


# ----------------------------------------------------------------------------- training


def test_a_gs_run_stopped_by_sigterm_resumes_to_the_bits_of_an_uninterrupted_local_run(
  local_run, bucket, gcs_server
):
  workdir = f"{bucket}/run"
  proc = popen(workdir, "--config.training.log_every=1", "--config.training.checkpoint_every=0")
  log = read_until(proc, "step 3/")
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=300)
  assert proc.returncode == 0, (log + rest)[-3000:]
  assert "Stopped by SIGTERM" in rest
  stopped = checkpoint.checkpoint_steps(workdir)
  assert len(stopped) == 1 and 3 <= stopped[0] < 6, stopped
  result = cli(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {stopped[0]}" in result.stderr
  assert_bitwise_equal(state_of(workdir, 6), state_of(local_run, 6))
  # What a run writes besides checkpoints is in the bucket too, digests and TensorBoard events
  # included.
  names = gcs_server.objects(*split(bucket))
  assert "run/config.json" in names and "run/samples/step_6.png" in names
  assert f"run/checkpoints/6/{checkpoint.DIGEST_FILE}" in names
  assert checkpoint.find_damage(storage.join(workdir, "checkpoints", "6")) is None
  events = [n for n in names if n.startswith("run/events.out.tfevents")]
  assert events, sorted(names)
  assert_tensorboard_reads(gcs_server, bucket, events, tags={"train/loss", "samples"})


def assert_tensorboard_reads(gcs_server, bucket, names, *, tags, tmp=None):
  """TensorBoard's own reader finds `tags` in the event files `names` (copied out of the bucket)."""
  import tempfile  # pylint: disable=g-import-not-at-top

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as folder:
    for name in names:
      with open(os.path.join(folder, os.path.basename(name)), "wb") as f:
        f.write(gcs_server.read(split(bucket)[0], name))
    accumulator = event_accumulator.EventAccumulator(folder)
    accumulator.Reload()
    found = set(accumulator.Tags()["scalars"]) | set(accumulator.Tags()["images"])
  assert tags <= found, found


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_newest_intact_one(
  local_run, bucket, gcs_server
):
  """kill -9 while the step-4 checkpoint is half in the bucket (a proxy holds its commit marker):
  the rerun ignores that step, resumes from step 2, writes step 4 again, and ends where an
  uninterrupted run ends, bit for bit."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  workdir = f"{bucket}/run"
  proxy = gcs_emulator.FaultProxy(gcs_server, hold=["run/checkpoints/4/commit_success.txt"])
  try:
    proc = popen(workdir, "--config.training.num_steps=100", env=gcs_server.env(proxy.url))
    assert proxy.held.wait(timeout=300), read_until(proc, "never")
    names = gcs_server.objects(*split(bucket))
    assert any(n.startswith("run/checkpoints/4/state/") for n in names)
    assert "run/checkpoints/4/commit_success.txt" not in names
    proc.kill()
    proc.wait()
  finally:
    proxy.stop()
  assert checkpoint.checkpoint_steps(workdir) == [2]
  result = cli(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from the checkpoint of step 2" in result.stderr
  assert checkpoint.checkpoint_steps(workdir) == [2, 4, 6]
  assert_bitwise_equal(state_of(workdir, 6), state_of(local_run, 6))


@pytest.fixture(scope="module")
def gs_run(gcs_server):
  """A finished 6-step run in a bucket (checkpoints 2, 4, 6); tests that change it copy it."""
  bucket = gcs_server.create_bucket("module-run")
  result = cli(f"{bucket}/run")
  assert result.returncode == 0, result.stderr[-3000:]
  return f"{bucket}/run"


def copy_run(gcs_server, run: str, bucket: str) -> str:
  """Copies every object of the workdir `run` into `bucket` (as gsutil cp -r would)."""
  source_bucket, prefix = split(run)
  for name in gcs_server.objects(source_bucket, prefix + "/"):
    gcs_server.write(split(bucket)[0], name, gcs_server.read(source_bucket, name))
  return f"{bucket}/{prefix}"


def test_a_corrupt_object_in_the_bucket_is_found_moved_aside_and_training_falls_back(
  gs_run, local_run, bucket, gcs_server
):
  workdir = copy_run(gcs_server, gs_run, bucket)
  name, _ = max(
    gcs_server.objects(split(bucket)[0], "run/checkpoints/6/state/").items(), key=lambda kv: kv[1]
  )
  data = gcs_server.read(split(bucket)[0], name)
  gcs_server.write(split(bucket)[0], name, data[: len(data) // 2])  # an object cut short
  result = cli(workdir, "--config.training.num_steps=8")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Skipping a checkpoint: The checkpoint of step 6" in result.stderr
  assert "cut short or overwritten" in result.stderr
  assert "Resumed from the checkpoint of step 4" in result.stderr
  # Moved aside under the workdir (never deleted), and step 6 written again by the resumed run.
  moved = gcs_server.objects(split(bucket)[0], "run/corrupt_checkpoints/6/")
  assert f"run/corrupt_checkpoints/6/{name.split('/checkpoints/6/')[1]}" in moved
  assert checkpoint.checkpoint_steps(workdir) == [2, 4, 6, 8]
  assert_bitwise_equal(state_of(workdir, 6), state_of(local_run, 6))


# ----------------------------------------------------------------------------- every mode


def gs_eval_config(bucket: str, weights: str = ""):
  """CONFIG with evaluation sizes a CPU test affords, statistics cached in the bucket."""
  config = tiny_config(training__num_steps=6)
  ev = config.evaluation
  ev.split, ev.num_examples, ev.batch_size = "train", 6, 4
  ev.num_fid_samples, ev.sample_chunk_size = 12, 5
  ev.fid_reference_splits, ev.num_fid_reference = ("train",), 4
  ev.inception_weights, ev.stats_dir = weights, f"{bucket}/fid_stats"
  ev.watch_modes, ev.watch_poll_secs = ("bpd",), 1
  config.interpolation.timesteps, config.interpolation.num_pairs = (5, 10), 2
  return config


def test_sample_bpd_interpolate_and_the_watcher_read_and_write_a_gs_workdir(
  gs_run, bucket, gcs_server
):
  from ddpm_jax import main  # pylint: disable=g-import-not-at-top

  workdir = copy_run(gcs_server, gs_run, bucket)
  result = cli(workdir, mode="sample")  # the command line, end to end
  assert result.returncode == 0, result.stderr[-3000:]
  folder = "run/samples/ckpt_6_n6_seed0_ancestral10"
  arrays = storage.load_npz(f"{bucket}/{folder}/samples.npz")
  assert arrays["arr_0"].shape == (6, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
  names = gcs_server.objects(split(bucket)[0], "run/")
  assert {f"{folder}/{n}" for n in ("grid.png", "chain_xt.png", "sampler.json")} <= set(names)
  config = gs_eval_config(bucket)
  result = storage.read_json(main.run(config, workdir, "bpd"))
  assert result["step"] == 6 and result["num_examples"] == 6
  out = main.run(config, workdir, "interpolate")
  assert out.startswith(workdir) and storage.is_file(storage.join(out, "interpolations.npz"))
  done = main.run(config, workdir, "evaluate_watch")
  assert sorted(done) == ["2", "4", "6"] and storage.read_json(f"{workdir}/eval/done.json") == done
  events = [n for n in gcs_server.objects(split(bucket)[0], "run/eval/") if "tfevents" in n]
  assert_tensorboard_reads(gcs_server, bucket, events, tags={"bpd_train/total"})


def test_fid_and_the_metrics_command_with_weights_and_statistics_in_the_bucket(
  gs_run, bucket, gcs_server, tmp_path
):
  from conftest import write_test_inception_weights  # pylint: disable=g-import-not-at-top
  from ddpm_jax import main  # pylint: disable=g-import-not-at-top

  workdir = copy_run(gcs_server, gs_run, bucket)
  weights = write_test_inception_weights(f"{bucket}/inception.npz")
  config = gs_eval_config(bucket, weights)
  result = storage.read_json(main.run(config, workdir, "fid"))
  assert result["num_samples"] == 12 and np.isfinite(result["fid"]["train"])
  stats = result["reference"]["train"]["path"]
  assert stats.startswith(f"{bucket}/fid_stats/") and storage.is_file(stats)
  # The FID command line between a sample chunk and the cached statistics, both in the bucket.
  chunk = f"{workdir}/eval/{result['samples_dir']}/chunk_0000000_0000005.npz"
  command = [sys.executable, "-m", "ddpm_jax.metrics", "--progress=false", "--batch_size=4"]
  command += [f"--inception_weights={weights}", chunk, stats, f"--json={bucket}/fid.json"]
  cli_result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert cli_result.returncode == 0, cli_result.stderr[-3000:]
  assert "FID: " in cli_result.stdout
  assert storage.read_json(f"{bucket}/fid.json")["inputs"][1]["kind"] == "stats"


def test_convert_exports_from_and_imports_into_gs_workdirs(gs_run, bucket, gcs_server):
  workdir = copy_run(gcs_server, gs_run, bucket)
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "ddpm_jax.convert", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  exported = run("export", f"--workdir={workdir}", f"{bucket}/exported")
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert storage.is_file(f"{bucket}/exported/diffusion_pytorch_model.safetensors")
  imported = run(
    "import",
    f"{bucket}/exported",
    "--config=configs/digits.py",
    f"--workdir={bucket}/imported",
    *TINY,
  )
  assert imported.returncode == 0, imported.stderr[-3000:]
  # The import holds the exported EMA params as its params and EMA params.
  exported_ema = jax.tree.leaves(restored(workdir, 6).ema_params)
  imported = restored(f"{bucket}/imported", 0)
  for params in (imported.params, imported.ema_params):
    assert_bitwise_equal(jax.tree.leaves(params), exported_ema)


# ---------------------------------------------------------------------- TFDS data in a bucket


def prepare_fake_cifar10(tmp_path, *, train: int, test: int) -> str:
  """TFDS's own cifar10 builder, prepared as ArrayRecord from generated files in CIFAR's binary
  format (label byte + 3072 pixel bytes per image) instead of the download: a real TFDS dataset
  folder, offline. Returns its data_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source = tmp_path / "cifar_source" / "cifar-10-batches-bin"
  source.mkdir(parents=True)
  rng = np.random.default_rng(0)
  (source / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
  record = lambda: bytes([int(rng.integers(10))]) + rng.integers(0, 256, 3072, np.uint8).tobytes()
  for name, count in [(f"data_batch_{i}.bin", train // 5) for i in range(1, 6)] + [
    ("test_batch.bin", test)
  ]:
    (source / name).write_bytes(b"".join(record() for _ in range(count)))
  data_dir = tmp_path / "tfds"
  download = tfds.download.DownloadManager.download_and_extract
  tfds.download.DownloadManager.download_and_extract = lambda self, url: str(source.parent)
  try:
    builder = tfds.builder("cifar10", data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
  finally:
    tfds.download.DownloadManager.download_and_extract = download
  return str(data_dir)


def test_tfds_reads_a_dataset_prepared_into_a_bucket(bucket, tmp_path):
  from ddpm_jax import data  # pylint: disable=g-import-not-at-top

  local = prepare_fake_cifar10(tmp_path, train=40, test=10)
  for name in storage.files_under(local):  # as `gcloud storage cp -r` would upload it
    storage.write_bytes(f"{bucket}/tfds/{name}", storage.read_bytes(os.path.join(local, name)))
  config = tiny_config(data__dataset="cifar10", data__image_size=32, data__num_channels=3).data
  in_bucket = data.load_images(dict_with(config, tfds_data_dir=f"{bucket}/tfds"), split="train")
  on_disk = data.load_images(dict_with(config, tfds_data_dir=local), split="train")
  assert len(in_bucket) == len(on_disk) == 40
  every = lambda source: np.stack([source[i] for i in range(len(source))])
  np.testing.assert_array_equal(every(in_bucket), every(on_disk))
  batches = data.train_iterator(
    dict_with(config, tfds_data_dir=f"{bucket}/tfds"), global_batch_size=8, seed=0
  )
  assert next(batches).shape == (8, 32, 32, 3)
  batches.close()  # its reading threads would retry against the emulator after the session ends


def dict_with(section, **values):
  section = section.copy_and_resolve_references()
  for key, value in values.items():
    section[key] = value
  return section


# ----------------------------------------------------------------------------- storage failures


def last_sentence(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("ddpm_jax: ")]
  assert lines, stderr[-3000:]
  return lines[-1]


def test_a_bucket_that_refuses_a_write_stops_training_with_one_sentence_and_keeps_the_rest(
  bucket, gcs_server
):
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  workdir = f"{bucket}/run"
  proxy = gcs_emulator.FaultProxy(gcs_server, forbid=["run/checkpoints/4/"])
  try:
    result = cli(workdir, env=gcs_server.env(proxy.url))
  finally:
    proxy.stop()
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  sentence = last_sentence(result.stderr)
  assert re.search("Could not (start )?writ(e|ing) the checkpoint of step 4", sentence), sentence
  assert "permission denied" in sentence
  assert "the earlier checkpoints (step 2) were not touched" in sentence
  assert checkpoint.checkpoint_steps(workdir) == [2]
  assert checkpoint.find_damage(f"{workdir}/checkpoints/2") is None


def test_a_missing_bucket_or_an_unreachable_service_is_one_sentence(gcs_server):
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  result = cli("gs://no-such-bucket/run")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "the bucket gs://no-such-bucket does not exist" in last_sentence(result.stderr)
  closed = f"http://127.0.0.1:{gcs_emulator.free_port()}"  # nothing listens there
  result = cli("gs://any-bucket/run", env=gcs_server.env(closed))
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "cannot be reached" in last_sentence(result.stderr)


# ----------------------------------------------------------------------------- two processes


def start_process(workdir, rank: int, port: int, *extra, env=None):
  """Process `rank` of a 2-process job (2 CPU devices each) on one gs:// workdir, logging to a
  file."""
  log = open(f"/tmp/ddpm_jax_gcs_{port}_{rank}.log", "w")  # pylint: disable=consider-using-with
  args = ["--config=configs/digits.py", f"--workdir={workdir}", *TINY, *extra]
  args += [
    "--config.distributed.initialize=on",
    f"--config.distributed.coordinator_address=localhost:{port}",
  ]
  args += ["--config.distributed.num_processes=2", f"--config.distributed.process_id={rank}"]
  args += ["--experimental_orbax_use_distributed_barrier"]
  proc = subprocess.Popen(
    [sys.executable, "-m", "ddpm_jax.main", *args],
    cwd=REPO,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", **(env or {})),
    stdout=subprocess.DEVNULL,
    stderr=log,
  )
  proc.log_path = log.name
  return proc


def log_of(proc) -> str:
  with open(proc.log_path) as f:
    return f.read()


def written(proxy, name: str) -> bool:
  return any(name in seen for _, seen in proxy.writes)


def test_two_processes_share_a_gs_workdir_stop_together_when_one_is_preempted_and_resume(
  bucket, gcs_server, tmp_path
):
  """SIGTERM reaches one process only: both stop after the same step with one checkpoint (JAX's
  preemption sync point), process 0 alone writes what one process should (each through its own
  proxy, so the writes can be told apart), and the resumed job equals a 1-device run to float32
  rounding (the gradient mean is reduced over 4 devices in another order)."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  workdir = f"{bucket}/run"
  proxies = [gcs_emulator.FaultProxy(gcs_server) for _ in range(2)]
  port = gcs_emulator.free_port()
  extra = ("--config.training.num_steps=100000", "--config.training.log_every=1")
  procs = [
    start_process(
      workdir,
      rank,
      port,
      *extra,
      "--config.training.checkpoint_every=0",
      env=gcs_server.env(proxies[rank].url),
    )
    for rank in range(2)
  ]
  try:
    deadline = time.time() + 600
    while "step 3/" not in log_of(procs[0]) and procs[0].poll() is None and time.time() < deadline:
      time.sleep(0.5)
    assert "step 3/" in log_of(procs[0]), log_of(procs[0])[-3000:]
    procs[1].send_signal(signal.SIGTERM)
    for proc in procs:
      assert proc.wait(timeout=300) == 0, log_of(proc)[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    for proxy in proxies:
      proxy.stop()
  stopped = [
    line for line in log_of(procs[0]).splitlines() if "Stopped by preemption at step" in line
  ]
  assert len(stopped) == 1, log_of(procs[0])[-3000:]
  step = int(stopped[0].split("at step ")[1].split(";")[0])
  assert checkpoint.checkpoint_steps(workdir) == [step]
  # What one process writes, process 0 wrote; both wrote their shares of the checkpoint.
  for name in ("run/config.json", checkpoint.DIGEST_FILE, "events.out.tfevents"):
    assert written(proxies[0], name) and not written(proxies[1], name), name
  assert written(proxies[1], f"run/checkpoints/{step}/state/ocdbt.process_1")

  final = step + 2
  port = gcs_emulator.free_port()
  procs = [
    start_process(workdir, r, port, f"--config.training.num_steps={final}") for r in range(2)
  ]
  for proc in procs:
    assert proc.wait(timeout=600) == 0, log_of(proc)[-3000:]
  assert f"Resumed from the checkpoint of step {step}" in log_of(procs[0])
  reference = tmp_path / "one_device"
  result = cli(reference, f"--config.training.num_steps={final}")
  assert result.returncode == 0, result.stderr[-3000:]
  # Adam turns reduction-order differences into ~1e-5 changes of weights whose gradients are near
  # zero; a skipped, repeated or reordered batch moves weights by ~lr = 1e-3.
  weights = lambda state: jax.tree.leaves((state.params, state.ema_params))
  for a, b in zip(weights(restored(workdir, final)), weights(restored(reference, final))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4)
