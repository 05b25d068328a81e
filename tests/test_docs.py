"""Every shell command of the README, docs/*.md and bench/README.md runs, at tiny settings, or is
skipped for a reason listed below: the documentation cannot go stale silently.

Commands are the fenced ```bash / ```sh / ```shell / ```console blocks (console: the `$ `
lines), plus the `python -m ddpm_jax...` cells of the README's table; `\\` continuations are
joined, comments dropped, and `a && b` split into its parts. Every part is either run or matched
by a row of SKIPS; a part that is neither fails the test, so a new kind of command needs a
decision here.

How they run (cheaply): in a temporary folder that links configs/, launch/ and bench/ of the
repository, the package's command lines in-process through tests/docs_runner.py, one process per
module (ddpm_jax.main with the Inception conversion, ddpm_jax.metrics, ddpm_jax.convert), the main
job first so that one tiny trained workdir serves every later command; launch scripts with
--dry-run. OVERRIDES lists what is added to each command.

Also: the README's test command is .ci/run's; every relative link of the documents reaches a file
and heading; every reference of the code (ddpm_jax/, bench/, configs/, launch/) to README.md,
docs/*.md or bench/README.md names a file, and a section, that exist.
"""

import concurrent.futures
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from conftest import REPO

DOCS = ["README.md", *sorted(f"docs/{n}" for n in os.listdir(os.path.join(REPO, "docs")))]
DOCS = [d for d in DOCS if d.endswith(".md")] + ["bench/README.md"]
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")

# Parts of commands that are not run: (regex searched in the part, why). Each row must match
# something (tested), so the table cannot keep stale rows.
SKIPS = [
  (
    r"^python3? -m venv|^\. \.venv/bin/activate",
    "sets up a virtual environment (the test runs in one)",
  ),
  (r"^pip install", "installs packages (the test extra has them; no registry access in tests)"),
  (
    r"^ruff |^python3? -m pytest",
    "CI's own checks (.ci/run); the README's line is compared with it",
  ),
  (r"^(curl|wget|huggingface-cli|git lfs|git clone|unzip|find downloads)\b", "needs the internet"),
  (r"^gcloud ", "needs Google Cloud (a TPU slice, credentials)"),
  (
    r"^sbatch ",
    "needs SLURM (tests/test_launch.py runs the script's dry run and a fake SLURM job)",
  ),
  (r"downloads/", "reads a published model downloaded from the internet"),
  (r"convert_inception \S+\.pth ", "converts the file the `curl` before it downloads (internet)"),
  (r"^python bench/", "a benchmark: minutes of measurement each (bench/README.md)"),
  (r"--workdir=runs/ddpm-cifar10", "reads the imported published CIFAR10 model (internet)"),
  (
    r"^(?!launch/).*--config=configs/(cifar10|celebahq256|lsun_\w+)\.py",
    "needs a TFDS dataset download (internet) and the 35.7M/114M-parameter model",
  ),
  (
    r"--config\.distributed\.initialize=on",
    "needs a second process at the same time (tests/test_train.py, tests/test_gcs.py run two)",
  ),
  (r"\bA B$", "placeholders (A, B: any two inputs; the full commands are in docs/evaluation.md)"),
]

# What is added or replaced so that a command runs offline in seconds.
TINY_T = 100  # >= every documented sampling.num_steps (100), so those stay as written
# appended to each `ddpm_jax.main` / `convert import` with configs/digits*.py, replacing the
# command's own value of the same key (a key given twice is an error on the command line)
TINY = [
  "--config.data.image_size=8",
  "--config.model.ch_mult=(1,2)",
  "--config.model.attn_resolutions=(4,)",
  f"--config.diffusion.num_timesteps={TINY_T}",
  "--config.training.num_steps=4",
  "--config.training.batch_size=8",
  "--config.training.warmup_steps=2",
  "--config.training.log_every=2",
  "--config.training.checkpoint_every=4",  # one checkpoint: evaluate_watch evaluates it alone
  "--config.training.num_grid_samples=4",
  "--config.sampling.batch_size=8",
  "--config.sampling.num_samples=8",
  "--config.sampling.num_progressive=2",
  "--config.interpolation.num_pairs=2",
  "--config.interpolation.timesteps=(50,100)",
  "--config.evaluation.batch_size=8",
  "--config.evaluation.num_examples=8",
  "--config.evaluation.num_fid_samples=8",
  "--config.evaluation.sample_chunk_size=8",
  "--config.evaluation.num_fid_reference=8",
  "--config.evaluation.watch_poll_secs=1",
  "--config.inpaint.num_images=2",
  "--config.inpaint.num_samples=2",
  "--config.inpaint.num_resamplings=2",
]
TINY_CONFIGS = re.compile(r"^--config=configs/digits\w*\.py$")  # the configs TINY applies to
METRICS_FLAGS = ["--batch_size=8", "--progress=false"]  # after `python -m ddpm_jax.metrics`
IMAGE_FOLDER = "images"  # 8 digits as PNGs, written by the test
CLASS_FOLDER = "class_folders"  # two classes (a, b) of the 8 digits, written by the test
MASK = "mask.png"  # a 16x16 mask (white = keep: the left half), written by the test
REPLACE = {  # documented paths -> what the tiny run has
  "path/to/images": IMAGE_FOLDER,
  "path/to/mask.png": MASK,
  "path/to/class_folders": CLASS_FOLDER,
  "path/to/train_images": IMAGE_FOLDER,
  "my_images": IMAGE_FOLDER,
  "ckpt_3000_n1000_seed0_ancestral200": f"ckpt_4_n8_seed0_ancestral{TINY_T}",
  "samples.npz": f"runs/digits/samples/ckpt_4_n8_seed0_ancestral{TINY_T}/samples.npz",  # bare name
}
OVERRIDES = {
  "ddpm_jax.main / convert import with configs/digits*.py": "TINY (replacing the same keys)",
  "python -m ddpm_jax.metrics": "METRICS_FLAGS inserted",
  "launch/*.sh": "--dry-run inserted (prints the commands, runs none)",
  "paths": "REPLACE",
  "duplicates": "a command equal to an earlier one up to --workdir runs once",
}
MIN_COMMANDS, MIN_RUN = 50, 25  # the extraction cannot silently find nothing


@dataclasses.dataclass
class Part:
  """One command (a part of an `a && b` line) of a document."""

  doc: str
  line: int
  text: str
  skip: str = ""  # why it is not run; "" when it runs

  @property
  def where(self) -> str:
    return f"{self.doc}:{self.line}: {self.text}"


def shell_lines(doc: str, root: str = REPO):
  """(line number, logical command line) of each fenced shell block of `doc`, and of the README
  table's inline `python -m ddpm_jax...` cells."""
  with open(os.path.join(root, doc)) as f:
    lines = f.read().splitlines()
  fence, language, pending, start = None, "", "", 0
  for number, line in enumerate(lines, 1):
    opening = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", line)
    if fence is None:
      if opening:
        fence, language = opening.group(1), opening.group(2).lower()
      elif doc == "README.md" and line.startswith("|"):
        for cell in re.findall(r"`(python -m ddpm_jax[^`]*)`", line):
          yield number, cell
      continue
    if line.strip().startswith(fence):
      fence = None
      continue
    if language not in SHELL_LANGUAGES:
      continue
    text = line.strip()
    if language == "console":
      if not text.startswith("$ ") and not pending:
        continue
      text = text[2:] if text.startswith("$ ") else text
    if not pending:
      start = number
    if text.endswith("\\"):
      pending += text[:-1] + " "
      continue
    full, pending = (pending + text).strip(), ""
    if full and not full.startswith("#"):
      yield start, full


def parts_of(doc: str, number: int, line: str):
  """The commands of one line: shell comments dropped, split at `&&`."""
  tokens = shlex.split(line, comments=True)
  current = []
  for token in [*tokens, "&&"]:
    if token == "&&":
      if current:
        yield Part(doc, number, shlex.join(current))
      current = []
    else:
      current.append(token)


def collect() -> list[Part]:
  found = []
  for doc in DOCS:
    for number, line in shell_lines(doc):
      for part in parts_of(doc, number, line):
        part.skip = next((why for pattern, why in SKIPS if re.search(pattern, part.text)), "")
        found.append(part)
  return found


PARTS = collect()


def kind_of(tokens) -> str:
  """Which runner takes a command: a module name, "launch", or "" (not runnable here)."""
  while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
    tokens = tokens[1:]
  if tokens[:2] in (["python", "-m"], ["python3", "-m"]):
    return {
      "ddpm_jax.main": "main",
      "ddpm_jax.metrics": "metrics",
      "ddpm_jax.convert": "convert",
      "ddpm_jax.metrics.convert_inception": "convert_inception",
    }.get(tokens[2], "")
  if tokens and re.match(r"^launch/\w+\.sh$", tokens[0]):
    return "launch"
  return ""


def tiny_argv(part: Part):
  """(kind, argv) of a command to run, with OVERRIDES applied."""
  tokens = shlex.split(part.text)
  for old, new in REPLACE.items():
    if old == "samples.npz":  # the bare name only
      tokens = [new if t == old else t for t in tokens]
    else:
      tokens = [t.replace(old, new) for t in tokens]
  kind = kind_of(tokens)
  if kind == "launch":
    return kind, [tokens[0], "--dry-run", *tokens[1:]]
  argv = [f"python -m {tokens[2]}", *tokens[3:]]
  if kind == "metrics":
    argv[1:1] = METRICS_FLAGS
  if any(TINY_CONFIGS.match(t) for t in tokens):  # TINY's keys replace the command's own
    keys = {flag.split("=")[0] for flag in TINY}
    argv = [t for t in argv if t.split("=")[0] not in keys] + TINY
  return kind, argv


def runnable():
  return [p for p in PARTS if not p.skip]


# ----------------------------------------------------------------------------- extraction


def test_every_command_is_run_or_skipped_for_a_listed_reason():
  assert len(PARTS) >= MIN_COMMANDS, [p.where for p in PARTS]
  assert len(runnable()) >= MIN_RUN, [p.where for p in runnable()]
  unknown = [p.where for p in runnable() if not kind_of(shlex.split(p.text))]
  assert not unknown, f"commands neither run nor skipped (add a SKIPS row or a runner): {unknown}"
  used = {why for p in PARTS for why in [p.skip] if why}
  assert [why for _, why in SKIPS if why not in used] == [], "a SKIPS row matches nothing"
  for doc in DOCS:  # every document with commands has some that run
    if any(p.doc == doc for p in PARTS) and doc != "bench/README.md":
      assert any(p.doc == doc for p in runnable()), doc


def test_the_extraction_joins_continuations_drops_comments_and_splits_and(tmp_path):
  text = (
    "x\n```bash\n# a comment\nA=1 python -m ddpm_jax.main --a \\\n  --b  # note\ncd x && ls\n```\n"
  )
  text += "```console\n$ echo 1\noutput\n```\n```python\nprint(1)\n```\n"
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "x.md").write_text(text)
  lines = list(shell_lines("docs/x.md", root=str(tmp_path)))
  assert lines == [
    (4, "A=1 python -m ddpm_jax.main --a  --b  # note"),
    (6, "cd x && ls"),
    (9, "echo 1"),
  ]
  assert [p.text for p in parts_of("d", 1, lines[1][1])] == ["cd x", "ls"]
  assert [p.text for p in parts_of("d", 1, lines[0][1])] == ["A=1 python -m ddpm_jax.main --a --b"]


def test_the_readme_test_command_is_what_ci_runs():
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = [line for line in f.read().splitlines() if "pytest" in line]
  readme = [line for _, line in shell_lines("README.md") if "pytest" in line]
  assert len(ci) == 1 and readme == ci, (readme, ci)


# ----------------------------------------------------------------------------- running them


def write_image_folder(folder: str) -> None:
  os.makedirs(folder)
  for i, digit in enumerate(load_digits().images[:8]):
    pixels = np.kron(digit * 255 / 16, np.ones((2, 2))).astype(np.uint8)
    Image.fromarray(pixels, "L").save(os.path.join(folder, f"{i}.png"))


def run_runner(cwd: str, commands: list[dict], name: str):
  """tests/docs_runner.py on `commands` in `cwd`: ({id: result}, the runner's stderr)."""
  path, out = os.path.join(cwd, f"{name}.json"), os.path.join(cwd, f"{name}_results.json")
  with open(path, "w") as f:
    json.dump(commands, f)
  proc = subprocess.run(
    [sys.executable, os.path.join(REPO, "tests", "docs_runner.py"), path, out],
    cwd=cwd,
    env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])),
    capture_output=True,
    text=True,
    timeout=900,
  )
  results = {}
  if os.path.exists(out):
    with open(out) as f:
      results = {r["id"]: r for r in json.load(f)}
  return results, proc.stderr


PLANTED = {  # must fail: shows that a failing documented command fails the test
  "id": "planted",
  "kind": "main",
  "argv": [
    "python -m ddpm_jax.main",
    "--config=configs/digits.py",
    "--workdir=runs/digits",
    "--mode=sample",
    "--config.sampling.num_sample=4",
  ],
}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  """Runs every runnable command in one temporary folder: {id: result}, the commands, the logs."""
  cwd = str(tmp_path_factory.mktemp("docs"))
  for name in ("configs", "launch", "bench"):
    os.symlink(os.path.join(REPO, name), os.path.join(cwd, name))
  write_image_folder(os.path.join(cwd, IMAGE_FOLDER))
  for name in ("a", "b"):
    write_image_folder(os.path.join(cwd, CLASS_FOLDER, name))
  keep = np.zeros((16, 16), np.uint8)
  keep[:, :8] = 255
  Image.fromarray(keep, "L").save(os.path.join(cwd, MASK))
  groups = {"main": [], "metrics": [], "convert": [], "launch": []}
  seen = set()
  for i, part in enumerate(runnable()):
    kind, argv = tiny_argv(part)
    # the same command in two documents, or differing only in its workdir, runs once
    same = (kind, tuple(a for a in argv if not a.startswith("--workdir=")))
    if same in seen:
      continue
    seen.add(same)
    command = {"id": str(i), "kind": kind, "argv": argv, "where": part.where}
    # the Inception conversion needs no flags: the main runner does it first, for --mode=fid
    group = "main" if kind == "convert_inception" else kind
    groups[group].insert(0 if kind == "convert_inception" else len(groups[group]), command)
  groups["main"].append(PLANTED)
  start, results, logs = time.time(), {}, {}
  found, logs["main"] = run_runner(cwd, groups["main"], "main")
  results.update(found)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both read what the main runner wrote
    names = ("metrics", "convert")
    for name, (found, log) in zip(names, pool.map(lambda n: run_runner(cwd, groups[n], n), names)):
      results.update(found)
      logs[name] = log
  for command in groups["launch"]:
    proc = subprocess.run(
      ["bash", *command["argv"]], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    results[command["id"]] = {"ok": proc.returncode == 0, "error": proc.stderr[-2000:]}
  print(f"documented commands: {len(results) - 1} run in {time.time() - start:.0f} s")
  for log in logs.values():
    print(
      "\n".join(line for line in log.splitlines() if " after " in line and "docs_runner" in line)
    )
  commands = [c for group in groups.values() for c in group]
  return results, commands, logs


def test_every_runnable_documented_command_succeeds(ran):
  results, commands, logs = ran
  failed = [c for c in commands if c is not PLANTED and not results.get(c["id"], {}).get("ok")]
  report = "\n".join(
    f"{c['where']}\n  ran: {' '.join(c['argv'])}\n  {results.get(c['id'], {}).get('error', '')}"
    for c in failed
  )
  assert not failed, report + "\n" + "\n".join(f"--- {k}\n{v[-4000:]}" for k, v in logs.items())


def test_a_failing_documented_command_fails_the_test(ran):
  results, _, logs = ran
  assert results["planted"]["ok"] is False and results["planted"]["status"] == 1, logs["main"][
    -3000:
  ]
  assert "unknown config key in the command line overrides: num_sample" in logs["main"]


def github_anchor(heading: str) -> str:
  """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_reaches_a_file_and_heading():
  broken = []
  for doc in DOCS + ["CHANGELOG.md"]:
    with open(os.path.join(REPO, doc)) as f:
      text = f.read()
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"^\[\w+\]: (\S+)$", text, re.M)
    for link in links:
      if re.match(r"^[a-z]+://", link):
        continue
      path, _, anchor = link.partition("#")
      target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
      if not os.path.exists(os.path.join(REPO, target)):
        broken.append(f"{doc}: {link}")
        continue
      if anchor:
        with open(os.path.join(REPO, target)) as f:
          headings = re.findall(r"^#+ (.+)$", f.read(), re.M)
        if anchor not in {github_anchor(h) for h in headings}:
          broken.append(f"{doc}: {link}")
  assert not broken, broken


# The documents the code names: README (README.md), bench/README.md or docs/NAME.md, optionally
# followed by a section in quotes ('README.md ("The main job: what to expect")',
# 'docs/evaluation.md, "Inception weights"', 'README "Performance"'), on one line.
DOC_REFERENCE = re.compile(
  r"(?P<doc>bench/README\.md|docs/[\w-]+\.md|\bREADME(?:\.md)?\b)"
  r"(?:'s)?(?:,? \(?(?:section )?(?P<quote>[\"'])(?P<section>[^\"']+)(?P=quote))?"
)
CODE_FOLDERS = ("ddpm_jax", "bench", "configs", "launch")


def doc_references(text: str):
  """(document path in the repository, section or "") of each reference in `text`."""
  for match in DOC_REFERENCE.finditer(text):
    doc = match.group("doc")
    yield ("README.md" if doc.startswith("README") else doc), match.group("section") or ""


def code_files():
  for top in CODE_FOLDERS:
    for folder, _, names in os.walk(os.path.join(REPO, top)):
      for name in names:
        if name.endswith((".py", ".sh", ".sbatch")):
          yield os.path.relpath(os.path.join(folder, name), REPO)


def headings_of(doc: str) -> set[str]:
  with open(os.path.join(REPO, doc)) as f:
    return {h.strip() for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}


def broken_references(path: str, text: str) -> list[str]:
  broken = []
  for number, line in enumerate(text.splitlines(), 1):
    for doc, section in doc_references(line):
      if not os.path.exists(os.path.join(REPO, doc)):
        broken.append(f"{path}:{number}: {doc} does not exist")
      elif section and section not in headings_of(doc):
        broken.append(f"{path}:{number}: {doc} has no section {section!r}")
  return broken


def test_the_references_of_the_code_to_the_docs_name_files_and_sections_that_exist():
  broken, found = [], 0
  for path in code_files():
    with open(os.path.join(REPO, path)) as f:
      text = f.read()
    found += sum(1 for _ in doc_references(text))
    broken += broken_references(path, text)
  assert found >= 10, found  # the pattern still finds the references
  assert not broken, "\n".join(broken)
  # A stale reference fails: the old README section, a missing file, a misnamed section.
  assert broken_references("x.py", 'see README "Performance"') == [
    "x.py:1: README.md has no section 'Performance'"
  ]
  assert broken_references("x.py", "in docs/nowhere.md") == [
    "x.py:1: docs/nowhere.md does not exist"
  ]
  assert broken_references("x.py", "(see the README's 'Inception weights and FID')") != []
  assert broken_references("x.py", 'docs/evaluation.md, "Inception weights"') == []
