"""Two processes joined by jax.distributed train one model together."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import train_fixtures

_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    sys.path.insert(0, {tests_dir!r})
    jax.distributed.initialize(coordinator_address={address!r},
                               num_processes=2, process_id={process_id})
    from mtl_lm import train
    import train_fixtures

    config = train_fixtures.tiny_config({corpus!r}, steps={steps})
    train.train_and_evaluate(config, {workdir!r})
""")


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _train_two_processes(corpus, workdir, *, steps):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  processes = []
  for process_id in range(2):
    script = _SCRIPT.format(
        tests_dir=os.path.dirname(os.path.abspath(__file__)),
        address=address, process_id=process_id, corpus=corpus, steps=steps,
        workdir=workdir)
    processes.append(subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  corpus = train_fixtures.write_corpus(str(tmp_path / "corpus.txt"))
  workdir = str(tmp_path / "run")
  _train_two_processes(corpus, workdir, steps=2)

  data_state = os.path.join(workdir, "checkpoints", "2", "data")
  # One iterator state per process.
  state_files = sorted(name for name in os.listdir(data_state)
                       if name.endswith(".json"))
  assert state_files == ["process_0-of-2.json", "process_1-of-2.json"]
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  # Only process 0 writes metrics.
  assert [record["step"] for record in records] == [2]

  _train_two_processes(corpus, workdir, steps=4)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [record["step"] for record in records] == [2, 4]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
